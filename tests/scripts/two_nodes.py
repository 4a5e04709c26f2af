"""Prints what each worker of a (simulated) multi-node run sees; run by tests/test_launch.py."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import lightfunc.distributed as lfd

with lfd.init_mesh(accelerator="cpu") as mesh:
    total = mesh.all_reduce(torch.tensor(float(mesh.global_rank)), op="sum")
    print(f"rank {mesh.global_rank} of {mesh.world_size} on node {mesh.node_rank}: {float(total)}")
