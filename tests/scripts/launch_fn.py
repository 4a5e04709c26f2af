"""`lightfunc.distributed.launch` from Python; run by tests/test_launch.py.

Prints one JSON line per launch: the results by rank, or the RuntimeError's
message (that launch forks, as in a notebook); then OMP_NUM_THREADS after both.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightfunc.distributed._launch import launch


def where() -> dict[str, object]:
    """What a worker sees: its rank, the world size, the restart count, its threads."""
    return {
        "rank": int(os.environ["RANK"]),
        "world": int(os.environ["WORLD_SIZE"]),
        "restart": int(os.environ["TORCHELASTIC_RESTART_COUNT"]),
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }


def fail_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("boom in a function")


if __name__ == "__main__":
    spawned = launch(where, nproc_per_node=2)  # spawned: the default outside notebooks
    print(json.dumps({str(r): v for r, v in spawned.items()}), flush=True)
    try:
        launch(fail_on_rank_1, nproc_per_node=2, start_method="fork")
    except RuntimeError as error:
        print(json.dumps({"error": str(error)}), flush=True)
    print(json.dumps({"omp_after": os.environ.get("OMP_NUM_THREADS")}), flush=True)
