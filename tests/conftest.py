import sys
from pathlib import Path

import pytest
import torch

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
