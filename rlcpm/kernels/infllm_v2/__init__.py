"""InfLLM v2 trainable sparse attention (SPECS §2): PyTorch references and Triton kernels.

Pipeline for query tokens (q_seq, q_pos) over keys/values in a KeyLayout:

    kc1, cu1 = compress_keys(k, cu_seqlens, 32, 16)            # Kc1; Kc2 with (128, 64)
    idx = select_blocks(q, q_seq, q_pos, kc1, cu1, kc2, cu2, config, scale)   # [Tq, Hkv, k_eff]
    out = block_sparse_attention(q, k, v, layout, q_seq, q_pos, idx, block_size, scale)
    out = sparse_decode_attention(q, k_cache, v_cache, layout, q_pos, idx, block_size, scale)

`infllm_v2_attention(q, k, v, cu_seqlens, config)` runs the whole pipeline on packed
sequences. Each op below is a KernelOp (rlcpm.kernels.dispatch): Triton on CUDA tensors, the
reference on CPU; `op.reference` and `op.kernel` call one explicitly.
"""

from rlcpm.kernels.dispatch import KernelOp
from rlcpm.kernels.infllm_v2.block_sparse_attn import block_sparse_attention_reference
from rlcpm.kernels.infllm_v2.compress import compress_keys, mean_pool_windows_reference, num_windows
from rlcpm.kernels.infllm_v2.config import InfLLMv2Config
from rlcpm.kernels.infllm_v2.decode import sparse_decode_attention_reference
from rlcpm.kernels.infllm_v2.layout import KeyLayout
from rlcpm.kernels.infllm_v2.paged_compression import PagedCompressedKeys
from rlcpm.kernels.infllm_v2.select import select_blocks, topk_blocks
from rlcpm.kernels.infllm_v2.stage1 import block_scores_reference, kernel_scores_reference

_PKG = "rlcpm.kernels.infllm_v2"

mean_pool_windows = KernelOp(
    "infllm_v2.mean_pool_windows",
    mean_pool_windows_reference,
    f"{_PKG}.compress_triton:mean_pool_windows_triton",
)
block_scores = KernelOp(
    "infllm_v2.block_scores", block_scores_reference, f"{_PKG}.stage1_triton:block_scores_triton"
)
block_sparse_attention = KernelOp(
    "infllm_v2.block_sparse_attention",
    block_sparse_attention_reference,
    f"{_PKG}.block_sparse_attn_triton:block_sparse_attention_triton",
)
sparse_decode_attention = KernelOp(
    "infllm_v2.sparse_decode_attention",
    sparse_decode_attention_reference,
    f"{_PKG}.decode_triton:sparse_decode_attention_triton",
)

from rlcpm.kernels.infllm_v2.functional import infllm_v2_attention  # noqa: E402  (uses the ops above)

__all__ = [
    "InfLLMv2Config",
    "KeyLayout",
    "PagedCompressedKeys",
    "block_scores",
    "block_scores_reference",
    "block_sparse_attention",
    "compress_keys",
    "infllm_v2_attention",
    "kernel_scores_reference",
    "mean_pool_windows",
    "num_windows",
    "select_blocks",
    "sparse_decode_attention",
    "topk_blocks",
]
