"""xentlib: cross-entropy done right for PyTorch.

Importing xentlib imports neither triton nor transformers; `xentlib.reference` imports no torch.
"""

__version__ = "0.1.0"

try:  # torch is optional for the NumPy reference; the torch API needs it.
    import torch as _torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised by the torch-blocked reference test
    pass
else:
    from xentlib import functional, nn  # noqa: F401
    from xentlib.distill import distillation_loss, linear_distillation_loss  # noqa: F401
    from xentlib.functional import (  # noqa: F401
        binary_cross_entropy,
        binary_cross_entropy_with_logits,
        cross_entropy,
        linear_cross_entropy,
        log_softmax,
        nll_loss,
        softmax,
    )
    from xentlib.policy import linear_policy_loss, policy_loss  # noqa: F401
    from xentlib.rl import linear_log_probs, log_probs  # noqa: F401
