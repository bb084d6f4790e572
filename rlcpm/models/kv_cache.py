"""Paged KV cache: fixed-size blocks of key/value slots, owned by the engine, read and written
by the model only through `AttentionMetadata.slot_mapping` / `block_tables`.

Layout (one pair of tensors per layer)::

    k[layer], v[layer]: [num_blocks, block_size, num_kv_heads, head_dim]

Token t of a sequence lives in block `block_table[t // block_size]` at offset
`t % block_size`; its flat slot is `block_id * block_size + offset`, i.e. the row of
`k[layer].view(num_blocks * block_size, num_kv_heads, head_dim)`. Keys are stored after RoPE
(and after the q/k norm of Qwen3), so cached keys are never rotated again. The engine's block
manager decides which block ids a sequence owns; blocks can be shared between sequences
(prefix caching) and copied before a write (copy-on-write) with `copy_blocks`.
"""

from __future__ import annotations

import torch

from rlcpm.errors import EngineError


class PagedKVCache:
    """Per-layer paged key/value storage.

    Args:
        num_layers: decoder layers (one K and one V tensor each).
        num_blocks: blocks per layer; block ids are 0 .. num_blocks - 1.
        block_size: token slots per block.
        num_kv_heads, head_dim: the model's KV head count and head size.
        dtype, device: storage dtype and device (usually the model's).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim) <= 0:
            raise EngineError(
                f"PagedKVCache sizes must be positive: num_layers={num_layers}, num_blocks={num_blocks}, "
                f"block_size={block_size}, num_kv_heads={num_kv_heads}, head_dim={head_dim}"
            )
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        # One allocation: [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim].
        self.storage = torch.zeros(
            2, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device
        )
        self.k = list(self.storage[0].unbind(0))
        self.v = list(self.storage[1].unbind(0))

    @classmethod
    def for_model(
        cls,
        config,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> PagedKVCache:
        """A cache shaped for a `rlcpm.models.ModelConfig` (dtype defaults to the config's)."""
        return cls(
            num_layers=config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            dtype=dtype or config.torch_dtype,
            device=device,
        )

    @staticmethod
    def block_bytes(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one block across all layers, K and V: 2 * L * block_size * Hkv * D * itemsize."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @property
    def bytes_per_block(self) -> int:
        """Memory one block id costs (all layers, K and V); budget / bytes_per_block = num_blocks."""
        return self.block_bytes(
            self.num_layers, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer `layer` as [num_slots, num_kv_heads, head_dim] (indexed by slot)."""
        shape = (self.num_slots, self.num_kv_heads, self.head_dim)
        return self.k[layer].view(shape), self.v[layer].view(shape)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new keys/values [T, Hkv, D] at their flat slots [T]; slots < 0 are skipped."""
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            raise EngineError(
                "the paged KV cache is for inference: run forwards that use kv_cache under "
                "torch.no_grad() or torch.inference_mode() (no gradient flows through cached keys)"
            )
        k_flat, v_flat = self.flat(layer)
        keep = slot_mapping >= 0
        if not bool(keep.all()):
            k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
        k_flat.index_copy_(0, slot_mapping, k.to(self.dtype))
        v_flat.index_copy_(0, slot_mapping, v.to(self.dtype))

    def copy_blocks(self, src: list[int] | torch.Tensor, dst: list[int] | torch.Tensor) -> None:
        """Copy blocks src[i] -> dst[i] in every layer, K and V (copy-on-write of shared blocks)."""
        src_t = torch.as_tensor(src, dtype=torch.int64, device=self.device)
        dst_t = torch.as_tensor(dst, dtype=torch.int64, device=self.device)
        if src_t.shape != dst_t.shape:
            raise EngineError(f"copy_blocks: src has {src_t.numel()} ids but dst has {dst_t.numel()}")
        if src_t.numel() == 0:
            return
        bad = torch.cat([src_t, dst_t])
        bad = bad[(bad < 0) | (bad >= self.num_blocks)]
        if bad.numel():
            raise EngineError(f"copy_blocks: block ids {bad.tolist()} out of range [0, {self.num_blocks})")
        # storage: [2, L, num_blocks, ...]; gather before scatter so overlapping pairs read old data.
        self.storage[:, :, dst_t] = self.storage[:, :, src_t]

    def zero_(self) -> None:
        """Clear every block (tests; the engine never needs to clear reused blocks)."""
        self.storage.zero_()
