"""Loggers: callbacks that write a run's metrics and hyper-parameters to files.

    logger = lightfunc.loggers.TensorBoardLogger("logs", name="mnist", log_every_n_steps=50)
    for ls in lightfunc.loop(step, state, data, callbacks=[logger], ...):
        ...

Train metrics are logged under their own names every `log_every_n_steps`
steps, evaluation metrics as `val_<name>` whenever an evaluation ran, each
record with its step and epoch; metrics leave the device on those steps
only, and only rank 0 writes. See `Logger` for the details shared by all of
them, and for writing your own backend. `WandbLogger` and `MLflowLogger`
write to those trackers (the extras `lightfunc[wandb]`, `lightfunc[mlflow]`).
"""

from ._base import Logger as Logger
from ._csv_logger import CSVLogger as CSVLogger
from ._default import default_logger as default_logger
from ._jsonl_logger import JSONLLogger as JSONLLogger
from ._mlflow_logger import MLflowLogger as MLflowLogger
from ._tensorboard_logger import TensorBoardLogger as TensorBoardLogger
from ._wandb_logger import WandbLogger as WandbLogger
