"""lightfunc.kernels: Triton kernels registered as torch custom ops, each beside its
pure-torch reference.

- `adamw_update`: an Adam / AdamW step for a whole list of tensors in one
  launch (what ``lightfunc.optim.adamw(..., fused=True)`` runs);
- `linear_cross_entropy`: ``F.cross_entropy(F.linear(x, W, b), y)`` in chunks,
  never materialising the logits;
- `rms_norm`: RMSNorm, forward and backward.

Each runs its Triton kernels where they can run (CUDA with Triton installed,
or CPU under ``TRITON_INTERPRET=1``; see `uses_triton`) and its reference
(`*_reference`, or the same chunked algorithm in torch ops) everywhere else.
The ops are registered as ``torch.ops.lightfunc.*``, so `torch.compile(fullgraph=True)`
traces through them. Importing this package imports triton (when installed)
and torch's compiler; ``import lightfunc`` does not import it.

The sources live in the repository's top-level `kernels/` folder and are
installed as `lightfunc.kernels`.
"""

from ._adamw import adamw_update as adamw_update
from ._adamw import adamw_update_reference as adamw_update_reference
from ._linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from ._linear_cross_entropy import (
    linear_cross_entropy_reference as linear_cross_entropy_reference,
)
from ._rms_norm import rms_norm as rms_norm
from ._rms_norm import rms_norm_reference as rms_norm_reference
from ._triton import disabled as disabled
from ._triton import set_enabled as set_enabled
from ._triton import uses_triton as uses_triton

__all__ = [
    "adamw_update",
    "adamw_update_reference",
    "disabled",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "set_enabled",
    "uses_triton",
]
