"""InfLLM v2 settings: a checkpoint's `sparse_config` (MiniCPM4) or the recipe's
`model.sparse_attention`, with the quantities derived from them (SPECS §2).

Defaults are MiniCPM4's: kernel_size 32, kernel_stride 16, block_size 64, init_blocks 1,
window_size 2048, topk 64, dense_len 8192, use_nope false. Derived, as in the reference code:

    coarse kernel (Kc2, LSE approximation)   4 * kernel_size = 128, stride 4 * kernel_stride = 64
    local_blocks                             window_size // block_size = 32
    num_selected (k_eff upper bound)         topk + local_blocks = 96
    pooling ratio r                          block_size // kernel_stride = 4
                                             (block b pools kernels r*b - 1 .. r*b + r - 1)
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any

from rlcpm.errors import EngineError, UnsupportedModelError


def check_page_fits_stride(page: int, stride: int) -> None:
    """The paged compressed keys need KV blocks of ``page`` slots that are a multiple or a
    divisor of the compression ``stride`` (EngineError otherwise)."""
    if page % stride and stride % page:
        raise EngineError(
            f"sparse attention: the engine's KV block_size ({page}) must be a multiple or a divisor "
            f"of each compression stride (kernel_stride and 4 * kernel_stride; here {stride}): "
            "choose a kernel_stride that is a power of two, or an engine block_size that fits"
        )


@dataclass(frozen=True)
class InfLLMv2Config:
    """Sparse-attention hyper-parameters; validated on construction (errors name the key)."""

    kernel_size: int = 32
    kernel_stride: int = 16
    block_size: int = 64
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False
    lse_approx: bool = True

    def __post_init__(self) -> None:
        problems = []
        for name in ("kernel_size", "kernel_stride", "block_size", "topk"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.init_blocks < 0 or self.window_size < 0 or self.dense_len < -1:
            problems.append(
                f"init_blocks, window_size must be >= 0 and dense_len >= -1, got "
                f"{self.init_blocks}, {self.window_size}, {self.dense_len}"
            )
        if not problems and self.kernel_size < self.kernel_stride:
            problems.append(
                f"kernel_size ({self.kernel_size}) must be >= kernel_stride ({self.kernel_stride}): "
                "shorter windows would leave keys out of stage-1 scoring"
            )
        if not problems and self.block_size % self.kernel_stride:
            problems.append(
                f"block_size ({self.block_size}) must be a multiple of kernel_stride ({self.kernel_stride})"
            )
        if not problems and self.window_size % self.block_size:
            problems.append(
                f"window_size ({self.window_size}) must be a multiple of block_size ({self.block_size})"
            )
        if not problems and self.init_blocks + 1 > self.topk:
            problems.append(
                f"topk ({self.topk}) must be >= init_blocks + 1 ({self.init_blocks + 1}) so that the "
                "init, local and current blocks always fit in the selection"
            )
        if self.use_nope:
            problems.append(
                "use_nope=true (stage-1 scores on keys before RoPE) is not supported: the attention "
                "backend receives rotated q/k; set use_nope: false"
            )
        if problems:
            raise UnsupportedModelError("sparse attention config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> InfLLMv2Config:
        """From a checkpoint's `sparse_config` / the recipe section; unknown keys are ignored
        (checkpoints carry extra keys), missing keys take the MiniCPM4 defaults."""
        if not values:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known and v is not None})

    @classmethod
    def merged(cls, base: dict[str, Any] | None, override: dict[str, Any] | None) -> dict[str, Any]:
        """A checkpoint's `sparse_config` (``base``) with the keys of ``override`` replacing its
        own, key by key; validated. Unknown keys in ``override`` raise (a typo would silently
        leave the setting at its default); unknown keys in ``base`` are kept."""
        override = dict(override or {})
        known = [f.name for f in fields(cls)]
        unknown = [key for key in override if key not in known]
        if unknown:
            hints = [difflib.get_close_matches(key, known, n=1) for key in unknown]
            raise UnsupportedModelError(
                "sparse attention config: unknown key(s) "
                + ", ".join(f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for key, hint in zip(unknown, hints))
                + f"; known: {', '.join(known)}"
            )
        values = {**(base or {}), **{key: value for key, value in override.items() if value is not None}}
        cls.from_dict(values)  # raises on invalid combined settings
        return values

    def check_kv_block_size(self, page: int) -> None:
        """EngineError unless an engine KV block of ``page`` slots fits both compression strides."""
        for stride in (self.kernel_stride, self.coarse_kernel_stride):
            check_page_fits_stride(page, stride)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def coarse_kernel_size(self) -> int:
        return 4 * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        return 4 * self.kernel_stride

    @property
    def local_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def num_selected(self) -> int:
        """Blocks kept per query token and KV head: topk + local_blocks (96 by default)."""
        return self.topk + self.local_blocks

    @property
    def pool_ratio(self) -> int:
        return self.block_size // self.kernel_stride

    def is_dense_query(self, q_pos):
        """The dense_len switch, per query (int or tensor of positions): a query at position i
        sees i + 1 keys and attends densely iff i + 1 < dense_len (-1 or 0: always sparse)."""
        return q_pos + 1 < self.dense_len
