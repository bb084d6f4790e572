"""Rotary position embedding (RoPE) with the scalings real checkpoints use.

Plain RoPE rotates each pair (x_i, x_{i+D/2}) of a head by the angle p * f_i, with
f_i = theta^(-2i/D), i = 0..D/2-1 ("rotate_half" layout, as HF Llama):

    rope(x, p) = x * cos(p f) + rotate_half(x) * sin(p f),  rotate_half(x) = [-x2, x1]

Scalings change the frequencies f (and, for longrope, the amplitude of cos/sin):

- linear:  f_i / factor.
- llama3:  wavelengths 2*pi/f_i longer than original_max / low_freq_factor are divided by
  `factor`, shorter than original_max / high_freq_factor kept, and in between interpolated
  with s = (original_max / wavelen - low) / (high - low): f' = (1 - s) f / factor + s f.
- yarn (Qwen3's long-context setting; YaRN, arXiv 2309.00071): with r(d) = D ln(L / (2 pi d)) /
  (2 ln theta) the pair index that turns d times over the original context L, pairs below
  r(beta_fast) keep f_i, pairs above r(beta_slow) take f_i / factor, and a linear ramp blends the
  two in between (bounds floored / ceiled unless `truncate: false`); cos/sin are multiplied by
  `attention_factor`, default 0.1 ln(factor) + 1 (or the mscale / mscale_all_dim ratio).
- longrope (MiniCPM4's modeling_minicpm.py, MiniCPMLongRoPE): f_i / ext_i with
  ext = long_factor if max_position_embeddings > original_max_position_embeddings else
  short_factor (MiniCPM picks one table for the whole cache, not per position), and cos/sin
  multiplied by sqrt(1 + ln(max_pos / original_max) / ln(original_max)) (1 when equal, below
  1 when max_pos is the smaller).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlcpm.errors import CheckpointError


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """f_i = theta^(-2i / D), [D/2] float32."""
    # Always on the CPU (also when the model is built under `with torch.device("meta")`).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(is_medium, interpolated, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(
    inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [D/2], cos/sin amplitude) of YaRN (module docstring)."""
    original = float(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else max_position_embeddings / original
    amplitude = scaling.get("attention_factor")
    if amplitude is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            amplitude = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            amplitude = _yarn_mscale(factor)

    def pair_turning(rotations: float) -> float:  # r(d) of the module docstring
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = (
        pair_turning(float(scaling.get("beta_fast") or 32)),
        pair_turning(float(scaling.get("beta_slow") or 1)),
    )
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return inv_freq * (1 - ramp) + inv_freq / factor * ramp, float(amplitude)


def rope_frequencies(
    head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """(inv_freq [D/2] float32, amplitude of cos/sin, position scale [D/2] or None).

    Angles are (p * position_scale) * inv_freq: longrope keeps its 1/ext factors apart so the
    float32 rounding is the same as MiniCPM's `outer(t, 1/ext) * inv_freq`.
    """
    inv_freq = default_inv_freq(head_dim, theta)
    rope_type = (scaling or {}).get("rope_type", "default")
    try:
        if rope_type == "default":
            return inv_freq, 1.0, None
        if rope_type == "linear":
            return inv_freq / float(scaling["factor"]), 1.0, None
        if rope_type == "llama3":
            return llama3_inv_freq(inv_freq, scaling), 1.0, None
        if rope_type == "yarn":
            return (*yarn_frequencies(inv_freq, head_dim, theta, scaling, max_position_embeddings), None)
        if rope_type == "longrope":
            original = int(scaling["original_max_position_embeddings"])
            use_long = max_position_embeddings > original
            ext = torch.tensor(
                scaling["long_factor" if use_long else "short_factor"], dtype=torch.float32, device="cpu"
            )
            if ext.numel() != head_dim // 2:
                raise CheckpointError(
                    f"rope_scaling longrope factors have {ext.numel()} entries, expected head_dim/2 = {head_dim // 2}"
                )
            ratio = max_position_embeddings / original
            # below 1 when max_position_embeddings < original, as MiniCPMLongRoPE computes it
            amplitude = math.sqrt(1 + math.log(ratio) / math.log(original))
            return inv_freq, amplitude, 1.0 / ext
    except KeyError as err:
        raise CheckpointError(f"rope_scaling of type {rope_type!r} is missing key {err}") from err
    raise CheckpointError(f"rope_scaling type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """positions [T] -> (cos, sin) [T, D] in float32, shared by every layer of one forward."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.inv_freq, self.amplitude, self.position_scale = rope_frequencies(
            head_dim, theta, scaling, max_position_embeddings
        )
        # Plain attributes, not buffers: they must stay float32 under model.to(bfloat16) and
        # survive building the model on the meta device; moved to the input's device lazily.

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
            if self.position_scale is not None:
                self.position_scale = self.position_scale.to(positions.device)
        scaled = positions.float()[:, None]
        if self.position_scale is not None:
            scaled = scaled * self.position_scale[None, :]
        angles = scaled * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((angles, angles), dim=-1)  # [T, D]
        return emb.cos() * self.amplitude, emb.sin() * self.amplitude


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D] -> x rotated, in x's dtype."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin
