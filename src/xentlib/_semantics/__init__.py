"""The rules of the cross-entropy family, in one place.

Every public function validates its arguments here and receives a canonical description of the problem; the
backends (`backends/torch_chunked.py`, `backends/triton/`) and the distributed and linear variants only compute
per-row statistics and gradients from it. The checks run in the order torch 2.13 runs them and raise the same
exception types; the messages start with torch's words and then say what was expected.
See `/docs/numerics.md` for the maths and SEMANTICS.md (shared with the team) for every rule.
"""

from __future__ import annotations

from xentlib._semantics import arguments, cross_entropy, linear, post_training

# `from xentlib import _semantics as sem` then `sem.<rule>`: one namespace over the four modules, so a caller
# need not know which module holds a rule. The modules themselves import what they use from each other.
for _module in (arguments, cross_entropy, linear, post_training):
    globals().update({name: value for name, value in vars(_module).items() if not name.startswith("__")})
del _module
