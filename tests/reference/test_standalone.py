"""The reference needs nothing but NumPy, and its module docstring is a working example."""

import doctest
import subprocess
import sys
import textwrap
from pathlib import Path

import xentlib.reference

SRC = Path(__file__).resolve().parents[2] / "src"

# Runs in a fresh interpreter: any attempt to import torch (or a submodule) raises ImportError.
BLOCKED_TORCH = textwrap.dedent(
    """
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    sys.path.insert(0, sys.argv[1])

    import numpy as np
    import xentlib.reference as ref

    x = np.array([[2.0, 0.5, 0.3], [0.2, 2.0, 0.5]])
    loss = ref.cross_entropy(x, np.array([0, 1]), label_smoothing=0.1, z_loss=1e-3)
    grad = ref.cross_entropy_backward(1.0, x, np.array([0, 1])).input
    bce = ref.binary_cross_entropy_with_logits(x, np.ones_like(x))
    assert np.isfinite(loss) and np.isfinite(bce) and grad.shape == x.shape
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch got imported"
    print(f"loss={loss:.6f}")
    """
)


def test_reference_runs_with_torch_blocked():
    result = subprocess.run([sys.executable, "-c", BLOCKED_TORCH, str(SRC)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loss="), result.stdout


def test_module_docstring_examples():
    """The worked examples (textbook values) in the package docstring run and print what they show."""
    outcome = doctest.testmod(xentlib.reference, raise_on_error=False, verbose=False)
    assert outcome.attempted >= 5
    assert outcome.failed == 0
