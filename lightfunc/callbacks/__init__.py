"""Callbacks: small objects that observe the loop's stream of trainer states.

Pass them to `lightfunc.loop(..., callbacks=[...])` or `lightfunc.fit`. See
`Callback` for the protocol (hooks, stopping, checkpointed state).
"""

from ._base import Callback as Callback
from ._checkpoint import ModelCheckpoint as ModelCheckpoint
from ._early_stopping import EarlyStopping as EarlyStopping
