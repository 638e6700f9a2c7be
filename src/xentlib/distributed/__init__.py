"""Exact cross-entropy over torch.distributed: vocabulary-parallel losses and global token normalization.

* `vocab_parallel_cross_entropy(logits_shard, target, ..., group=, vocab_start=)`: logits sharded over the
  vocabulary (tensor parallelism); the full option set of `xentlib.functional.cross_entropy`.
* `vocab_parallel_linear_cross_entropy(input, weight_shard, target, ..., group=, vocab_start=)`: the same for
  an output layer whose weight is sharded over the vocabulary, without materializing the logits.
* `count_tokens(targets, ...)` and `data_parallel_normalizer(targets, ...)`: the global token count of one
  optimizer step (all micro-batches and data-parallel ranks), fed as `normalizer=` to a reduction='sum' loss
  so that accumulated, all-reduced gradients equal the single-process full-batch gradient.

See docs/distributed.md for the maths of the merge, the collective counts and how to wire it into a loop.
"""

from xentlib.distributed.linear import vocab_parallel_linear_cross_entropy
from xentlib.distributed.tokens import count_tokens, data_parallel_normalizer, vocab_shard_range
from xentlib.distributed.vocab_parallel import vocab_parallel_cross_entropy

__all__ = [
    "count_tokens",
    "data_parallel_normalizer",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_shard_range",
]
