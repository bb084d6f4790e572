"""Weight streaming to rollout workers: named tensors in buckets of bounded size.

The learner hands its weights to `engine.update_weights` as a stream of buckets, each a list of
(Hugging Face name, tensor) whose bytes add up to at most `bucket_bytes` (a tensor larger than
that travels alone), so neither side ever holds a second full copy of the model in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

NamedTensors = list[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 256 * 1024**2


def iter_weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dtype: torch.dtype | None = None,
) -> Iterator[NamedTensors]:
    """Group (name, tensor) pairs, in order, into buckets of at most `bucket_bytes` (CPU, contiguous)."""
    bucket: NamedTensors = []
    used = 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if bucket and used + size > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, tensor))
        used += size
    if bucket:
        yield bucket
