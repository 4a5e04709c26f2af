"""Pure, optax-style optimizers: ``state = tx.init(params)``; ``updates, state = tx.update(grads, state, params)``.

Optimizers (`sgd`, `adam`, `adamw`, `lion`, `muon`) are chains of small gradient
transformations that can be recombined (`chain`, `masked`, `freeze`,
`multi_transform`); learning rates are floats or schedules, pure functions of
the step count. Wrappers act around an update and keep what they remember in
the optimizer state: `apply_if_finite` (skip and count non-finite updates,
dynamic loss scaling) and `accumulate_gradients` (what
`build(..., accumulate_grad_batches=n)` installs per micro-batch); `ema` and
`swa` keep averaged parameters there (`averaged_params`,
`evaluate(..., weights="ema")`). Nothing is mutated and everything that changes per step is a
tensor, so an update runs inside a compiled step without recompiling.
"""

from ._alias import adam as adam
from ._alias import adamw as adamw
from ._alias import lion as lion
from ._alias import sgd as sgd
from ._averaging import AverageState as AverageState
from ._averaging import averaged_params as averaged_params
from ._averaging import ema as ema
from ._averaging import swa as swa
from ._base import GradientTransformation as GradientTransformation
from ._base import OptState as OptState
from ._base import ScalarOrSchedule as ScalarOrSchedule
from ._base import Schedule as Schedule
from ._base import apply_updates as apply_updates
from ._clipping import clip_by_global_norm as clip_by_global_norm
from ._clipping import clip_by_value as clip_by_value
from ._clipping import global_norm as global_norm
from ._health import HealthState as HealthState
from ._health import track_health as track_health
from ._masking import MaskedNode as MaskedNode
from ._masking import MaskedState as MaskedState
from ._masking import MultiTransformState as MultiTransformState
from ._masking import freeze as freeze
from ._masking import masked as masked
from ._masking import multi_transform as multi_transform
from ._masking import trainable_only as trainable_only
from ._muon import ScaleByMuonState as ScaleByMuonState
from ._muon import muon as muon
from ._muon import muon_step as muon_step
from ._muon import scale_by_muon as scale_by_muon
from ._schedules import constant_schedule as constant_schedule
from ._schedules import cosine_decay_schedule as cosine_decay_schedule
from ._schedules import join_schedules as join_schedules
from ._schedules import linear_schedule as linear_schedule
from ._schedules import one_cycle_schedule as one_cycle_schedule
from ._schedules import piecewise_constant_schedule as piecewise_constant_schedule
from ._schedules import step_decay_schedule as step_decay_schedule
from ._schedules import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from ._schedules import warmup_schedule as warmup_schedule
from ._transforms import EmptyState as EmptyState
from ._transforms import ScaleByAdamState as ScaleByAdamState
from ._transforms import ScaleByLionState as ScaleByLionState
from ._transforms import ScaleByScheduleState as ScaleByScheduleState
from ._transforms import TraceState as TraceState
from ._transforms import chain as chain
from ._transforms import scale as scale
from ._transforms import scale_by_adam as scale_by_adam
from ._transforms import scale_by_learning_rate as scale_by_learning_rate
from ._transforms import scale_by_lion as scale_by_lion
from ._transforms import set_to_zero as set_to_zero
from ._transforms import trace as trace
from ._weight_decay import add_decayed_weights as add_decayed_weights
from ._weight_decay import add_decoupled_weight_decay as add_decoupled_weight_decay
from ._wrappers import AccumulationState as AccumulationState
from ._wrappers import ApplyIfFiniteState as ApplyIfFiniteState
from ._wrappers import accumulate_gradients as accumulate_gradients
from ._wrappers import apply_if_finite as apply_if_finite
from ._wrappers import find_state as find_state
