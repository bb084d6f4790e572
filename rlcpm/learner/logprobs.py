"""Memory-lean log-probs and entropies of target tokens, from final hidden states and the LM head.

The naive path materialises float32 logits and a log-softmax for every token, [N, V] twice, and
autograd keeps them for backward: 8k tokens x 150k vocabulary is ~10 GB. Here the logits exist
one chunk of `chunk_tokens` rows at a time, in forward AND backward (each chunk's logits are
recomputed from the saved hidden states; nothing of size [N, V] is saved):

    z      = (h W^T) / T            then top-k / top-p filtering (-inf outside the kept set)
    log p  = log_softmax(z)          rlcpm.rollout.sampling.sampling_log_distribution, THE
                                     definition the engine samples with
    lp_t   = log p[y_t]              [N]
    H_t    = -sum_v p_v log p_v      [N]  (entropy of the sampling distribution)

Gradients, per chunk, with p = softmax(z) (0 outside the kept set) and upstream g, e:

    d lp_t / d z_v = 1[v = y_t] - p_v
    d H_t  / d z_v = -p_v (log p_v + H_t)
    d / d(hW^T)    = (1 / T) d / dz;   dh = G W,  dW = G^T h

A token outside the kept set has lp = -inf and receives no gradient. Temperature 0 means the
greedy convention: plain log_softmax(h W^T) (as the engine records for greedy decoding).
"""

from __future__ import annotations

import torch

from rlcpm.kernels.cpu_gemm import matmul_nt
from rlcpm.rollout.sampling import sampling_log_distribution


class ChunkedTargetLogprobs(torch.autograd.Function):
    """autograd.Function: (hidden [N, H], weight [V, H], targets [N]) -> (logprobs [N], entropy [N])."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, top_k, top_p, chunk_tokens, onednn):
        logprobs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            log_dist = _log_distribution(hidden[rows], weight, temperature, top_k, top_p, onednn)  # [C, V]
            logprobs[rows] = log_dist.gather(1, targets[rows, None]).squeeze(1)
            entropy[rows] = _entropy(log_dist, _is_filtered(temperature, top_k, top_p, weight.shape[0]))
            del log_dist
        ctx.set_materialize_grads(False)  # an unused output (often entropy) arrives as None
        ctx.save_for_backward(hidden, weight, targets, entropy)
        ctx.sampling = (temperature, top_k, top_p)
        ctx.chunk_tokens = chunk_tokens
        ctx.onednn = onednn
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, entropy = ctx.saved_tensors
        temperature, top_k, top_p = ctx.sampling
        scale = 1.0 / temperature if temperature > 0 else 1.0
        is_filtered = _is_filtered(temperature, top_k, top_p, weight.shape[0])
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            log_dist = _log_distribution(hidden[rows], weight, temperature, top_k, top_p, ctx.onednn)
            grad_z = _grad_logits(
                log_dist, targets[rows], entropy[rows], grad_logprobs, grad_entropy, rows, is_filtered
            )
            del log_dist
            if scale != 1.0:
                grad_z.mul_(scale)
            grad_z = grad_z.to(weight.dtype)  # d / d(h W^T)  [C, V]
            if grad_hidden is not None:
                grad_hidden[rows] = matmul_nt(grad_z, weight.t(), ctx.onednn)  # grad_z @ W
            grad_weight.addmm_(grad_z.t().float(), hidden[rows].float())
            del grad_z
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _grad_logits(log_dist, targets, entropy, grad_logprobs, grad_entropy, rows, is_filtered) -> torch.Tensor:
    """g (onehot(y) - p) - e p (log p + H) for one chunk: [C, V] float32 (module docstring).

    Consumes `log_dist`: its storage becomes the gradient (two [C, V] buffers in all).
    """
    probs = log_dist.exp()  # [C, V], 0 outside the kept set
    g = None
    if grad_logprobs is not None:
        # A target filtered out of the sampling distribution (log-prob -inf) gets no gradient.
        is_kept = torch.isfinite(log_dist.gather(1, targets[:, None]).squeeze(1))
        g = torch.where(is_kept, grad_logprobs[rows].float(), 0.0)  # [C]
    if grad_entropy is not None:
        grad_z = log_dist.add_(entropy[:, None]).mul_(probs)  # p (log p + H)
        if is_filtered:
            grad_z.nan_to_num_(nan=0.0)  # 0 * -inf outside the kept set
        grad_z.mul_(-grad_entropy[rows, None].float())
    else:
        grad_z = log_dist.zero_()
    if g is not None:
        grad_z.addcmul_(probs, g[:, None], value=-1.0)
        grad_z.scatter_add_(1, targets[:, None], g[:, None])
    return grad_z


def _log_distribution(hidden, weight, temperature, top_k, top_p, onednn) -> torch.Tensor:
    # Logits in the hidden states' dtype (bf16 under mixed precision, like the engine's LM head),
    # autocast off so that the backward's recomputation is the very same function.
    with torch.autocast(hidden.device.type, enabled=False):
        logits = matmul_nt(hidden, weight.to(hidden.dtype), onednn)  # [C, V]
    return sampling_log_distribution(logits, temperature, top_k, top_p)


def _entropy(log_dist: torch.Tensor, is_filtered: bool) -> torch.Tensor:
    """-sum p log p over the kept entries (filtered entries have p = 0 and log p = -inf)."""
    p_log_p = log_dist.exp().mul_(log_dist)  # [C, V]
    if is_filtered:
        p_log_p.nan_to_num_(nan=0.0)  # 0 * -inf outside the kept set
    return -p_log_p.sum(dim=-1)


def _is_filtered(temperature: float, top_k: int, top_p: float, vocab_size: int) -> bool:
    """Whether top-k / top-p can put -inf into the distribution (never for greedy's convention)."""
    return temperature > 0 and (0 < top_k < vocab_size or top_p < 1.0)


def target_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
    chunk_tokens: int = 1024,
    onednn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of `targets` under the sampling distribution, chunked over tokens.

    Args:
        hidden: [N, H] final hidden states (whatever the model feeds its LM head).
        lm_head_weight: [V, H] the LM head (or tied embedding) weight.
        targets: [N] int64 token ids (the next token of each position).
        temperature, top_k, top_p: exactly as the engine sampled (rlcpm.rollout.sampling).
        chunk_tokens: rows of logits alive at once.
        onednn: logits and the hidden-state gradient through oneDNN on a float32 CPU
            (rlcpm.kernels.cpu_gemm.matmul_nt; the learner's `cpu_gemm: onednn`).

    Returns:
        (logprobs [N], entropy [N]) in float32, differentiable w.r.t. hidden and weight.
    """
    return ChunkedTargetLogprobs.apply(
        hidden,
        lm_head_weight,
        targets.long(),
        float(temperature),
        int(top_k),
        float(top_p),
        int(chunk_tokens),
        bool(onednn),
    )


def naive_target_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = -1,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one float32 [N, V] log-softmax through plain autograd (same signature)."""
    log_dist = sampling_log_distribution(hidden @ lm_head_weight.t(), temperature, top_k, top_p)
    logprobs = log_dist.gather(1, targets.long()[:, None]).squeeze(1)
    finite = torch.isfinite(log_dist)
    entropy = -(log_dist.exp() * torch.where(finite, log_dist, 0.0)).sum(dim=-1)
    return logprobs, entropy
