import os
import sys
from pathlib import Path

import pytest
import torch

# Triton fixes its interpreter mode when it is first imported. Without a GPU,
# set it before any test module (or torch.compile) can import triton, so that
# the Triton paths of lightfunc.kernels run on CPU tensors (tests/test_kernels.py).
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `tests.helpers` is imported as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def fresh_dynamo():
    """Reset torch.compile's caches and counters so compile counts start from zero."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
