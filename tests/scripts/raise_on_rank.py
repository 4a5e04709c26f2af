"""Rank 1 raises while rank 0 waits; run by tests/test_launch.py under `lightfunc run`.

Rank 0 sleeps far longer than the test's timeout: only the launcher stopping
it lets the run end.
"""

import os
import time

rank = int(os.environ["RANK"])
print(f"rank {rank} of {os.environ['WORLD_SIZE']} started", flush=True)
if rank == 1:
    raise ValueError("boom on rank 1")
time.sleep(600)
