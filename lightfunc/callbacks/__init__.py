"""Callbacks: small objects that observe the loop's stream of loop states (`LoopState`s).

Pass them to `lightfunc.loop(..., callbacks=[...])` or `lightfunc.fit`. See
`Callback` for the protocol (hooks, stopping, checkpointed state).
"""

from ._anomaly import NonFiniteCheck as NonFiniteCheck
from ._base import Callback as Callback
from ._checkpoint import ModelCheckpoint as ModelCheckpoint
from ._checkpoint import SaveHyperparameters as SaveHyperparameters
from ._early_stopping import EarlyStopping as EarlyStopping
from ._health import HealthMonitor as HealthMonitor
from ._lr_monitor import LearningRateMonitor as LearningRateMonitor
from ._profiler import ProfilerCallback as ProfilerCallback
from ._progress import ProgressBar as ProgressBar
from ._run_summary import RunReport as RunReport
from ._run_summary import RunSummary as RunSummary
from ._run_summary import summarize_run as summarize_run
from ._summary import ModelSummary as ModelSummary
from ._summary import summarize as summarize
from ._throughput import ThroughputMonitor as ThroughputMonitor
from ._throughput import count_step_flops as count_step_flops
from ._throughput import measure_peak_flops as measure_peak_flops
from ._timer import Timer as Timer
