import subprocess
import sys

CHECK = """
import sys
import torch  # measured against: `import torch` alone already imports tqdm (through torch.hub)
before = set(sys.modules)
import lightfunc
added = set(sys.modules) - before
heavy = [m for m in ("tqdm", "tensorboard", "triton", "sklearn", "matplotlib", "torch._inductor", "wandb", "mlflow") if m in added]
assert not heavy, f"import lightfunc imported {heavy}"
assert not torch.cuda.is_initialized(), "import lightfunc initialised CUDA"
from torch._dynamo.utils import counters
assert not counters["stats"], f"import lightfunc compiled something: {dict(counters['stats'])}"
print("lean")
"""


def test_import_lightfunc_has_no_heavy_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lean"
