"""Tuning before a run: the learning-rate range test and the batch-size finder.

Both run trial steps on the state you pass and hand it back untouched: a
`TrainState` is immutable, so there is nothing to save and restore around
the trials (Lightning's `Tuner` checkpoints the model and reloads it).

    import lightfunc as lf
    result = lf.tune.lr_find(step, state, loader, min_lr=1e-6, max_lr=1.0)
    result.suggestion            # the rate at the steepest descent of the loss
    result.plot("lr_find.png")   # needs matplotlib

    found = lf.tune.find_batch_size(step, state, lambda n: (x[:n], y[:n]),
                                    max_memory=4 * 2**30)
    found.batch_size, found.table()

Importing this module imports neither matplotlib nor the profiler; they load
when `plot` or a CPU batch-size search first needs them.
"""

from ._tune_batch import BatchSizeResult as BatchSizeResult
from ._tune_batch import BatchSizeTrial as BatchSizeTrial
from ._tune_batch import find_batch_size as find_batch_size
from ._tune_lr import LRFindResult as LRFindResult
from ._tune_lr import lr_find as lr_find
