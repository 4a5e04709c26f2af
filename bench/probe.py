"""`python -m bench.probe WORKLOAD IMPL`: time one implementation's first step in this fresh process.

Used by the harness for cold and warm compile times (it sets TORCHINDUCTOR_CACHE_DIR).
Prints one JSON line: {"first_call_s": ...}.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .harness import all_runners
from .workloads import make_workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("impl")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = all_runners()[args.impl](
        make_workload(args.workload, device=torch.device(args.device))
    )
    start = time.perf_counter()
    runner.first_losses(1)
    print(json.dumps({"first_call_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
