"""The contract every backend fulfils.

A backend is a function `cross_entropy_rows(problem, grad_out, want_stats) -> RowResult`:

* `problem` is a validated `xentlib._semantics.CrossEntropyProblem`: (B, C, S) logits, the canonical targets,
  the ignore mask, the weights of the targets, the reduction's `grad_scale`, and the extensions. The rules that
  made it (shapes, ignore_index, weights, smoothing, denominators) live in the semantic core; a backend only
  computes.
* It returns the per-row loss (class weight and z-loss included, 0 on ignored rows) in the accumulation dtype,
  and, with `want_stats` (or a z-loss), the per-row lse; with `want_stats` also the arg-max and the entropy.
* When `grad_out` (a (B, C, S) tensor of the logits' dtype, which may be the logits themselves) is given, it
  fills it with `grad_scale * d(row loss)/d(logits)` in the same sweep: exact zeros on ignored rows, the
  float32 result rounded once to the logits' dtype.

Each backend also states how it takes `linear_cross_entropy`'s chunks of logits (`ChunkPolicy`, below), so that
linear.py asks instead of knowing.

Backends: "cpu" (backends/cpu_kernel.py), "torch" (backends/torch_chunked.py), "triton" (backends/triton/);
`backends/dispatch.py` chooses among them, `backends/ops.py` wraps the chosen one in a torch op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: backends/triton/__init__.py imports this module and must not import torch
    from torch import Tensor


@dataclass
class RowResult:
    loss: Tensor  # (B, S) accumulation dtype, per-row loss incl. class weight and z-loss, 0 on ignored rows
    lse: Tensor | None  # (B, S) accumulation dtype, when z-loss or stats need it
    argmax: Tensor | None = None  # (B, S) int64, with stats
    entropy: Tensor | None = None  # (B, S) accumulation dtype, with stats


@dataclass(frozen=True)
class ChunkPolicy:
    """How a backend takes a chunk of logits of `linear_cross_entropy` (`CHUNK_POLICY` in each backend module)."""

    rows_in_place: bool  # turns a chunk of any dtype into its gradient in place, no float32 copy (larger chunks)
    float32_weight_grad: bool  # a half-precision weight's gradient accumulates in float32 across the chunks
    own_chunks: int = 0  # > 0: it works through a chunk of logits in pieces of chunk // own_chunks rows

    def own_chunk_rows(self, chunk: int) -> int | None:
        """The rows per piece for a chunk of `chunk` rows (None: the backend has no pieces)."""
        return max(1, chunk // self.own_chunks) if self.own_chunks else None
