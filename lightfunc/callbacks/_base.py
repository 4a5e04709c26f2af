"""`Callback`, re-exported: the protocol lives in `lightfunc._callback`, below the loop.

`lightfunc.callbacks.Callback` stays the name users subclass; the class
itself sits in `lightfunc._callback` so that the loop can call its hooks
without importing this package (which sits above the loop).
"""

from __future__ import annotations

from .._callback import Callback as Callback
