"""Per-step attention metadata: one object that describes how the tokens of a forward pass
are grouped into sequences and where their keys/values live in the paged KV cache.

Every tensor is built once per forward by the caller (the learner's packer or the engine's
model runner) and read by every layer's attention backend; layer-invariant index tensors
derived from it (token -> sequence ids, the paged-key visibility mask) are computed lazily
once and cached on the object, so a 24-layer forward does the bookkeeping once.

Packed training (no KV cache)::

    input_ids  [T]        S sequences concatenated, no padding
    positions  [T]        restart at 0 for each sequence
    cu_seqlens_q [S+1]    int32 offsets: sequence s owns tokens cu[s]:cu[s+1]
    attention: causal within each sequence only
    prefix_seq [S]        optional (shared-prompt packing): sequence prefix_seq[s] >= 0 holds
                          the tokens that come BEFORE sequence s's own (its prompt, stored once
                          for every response to it); s's positions continue after them and its
                          queries see all of them, then its own keys causally; -1 = none.
                          A prefix sequence comes earlier and has no prefix itself.

Paged KV cache (engine; prefill chunks, single decode tokens and k+1 verification tokens
may be mixed freely in one batch)::

    input_ids  [T]           the NEW tokens of S sequences concatenated
    positions  [T]           absolute positions of the new tokens
    cu_seqlens_q [S+1]       int32 offsets of each sequence's n_s new tokens
    context_lens [S]         int32, tokens in the cache for sequence s AFTER this step
                             (cached before + n_s new)
    slot_mapping [T]         int64 flat cache slot of each new token,
                             block_id * block_size + offset_in_block; -1 = do not store
    block_tables [S, max_blocks]  int32 block ids of each sequence in order, padded with -1
                             (0 is accepted too: entries beyond context_lens are never read)

Visibility rule: new query token i of sequence s (0-based among its n_s new tokens) attends
cached keys j < context_lens[s] - n_s + i + 1. The attention layer first writes the new K/V
at slot_mapping, then attends over the sequence's cached keys, so a token whose slot is -1
is never seen by later steps (use -1 only for padding / discarded tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlcpm.errors import EngineError


@dataclass(eq=False)
class AttentionMetadata:
    """How the T tokens of one forward split into S sequences (and, with a cache, where they go).

    Fields (see the module docstring for the exact contract):
        cu_seqlens_q: [S+1] int32 offsets of each sequence's (new) tokens.
        context_lens: [S] int32 cached + new tokens per sequence after this step (cache only).
        slot_mapping: [T] int64 flat cache slot per new token, -1 = do not store (cache only).
        block_tables: [S, max_blocks] int32 block ids, padded with -1 (cache only).
        max_seqlen_q: max n_s; computed from cu_seqlens_q when not given.
        max_context_len: max context_lens; computed when not given.
        prefix_seq: [S] int64 shared-prefix sequence of each packed sequence, -1 = none
            (packed training only).
    """

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_context_len: int | None = None
    prefix_seq: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.cu_seqlens_q.dim() != 1 or self.cu_seqlens_q.numel() < 2:
            raise EngineError(
                f"AttentionMetadata.cu_seqlens_q must be 1-D [S+1] with S >= 1, got shape "
                f"{tuple(self.cu_seqlens_q.shape)}"
            )
        paged = (self.context_lens, self.slot_mapping, self.block_tables)
        if any(x is not None for x in paged) and any(x is None for x in paged):
            raise EngineError(
                "AttentionMetadata for a paged KV cache needs context_lens, slot_mapping and "
                "block_tables together (got "
                + ", ".join(
                    f"{n}={'set' if x is not None else 'None'}"
                    for n, x in zip(("context_lens", "slot_mapping", "block_tables"), paged)
                )
                + ")"
            )
        if self.prefix_seq is not None:
            self._check_prefixes()
        if self.max_seqlen_q is None:
            self.max_seqlen_q = int(self.seq_lens_q.max())
        if self.context_lens is not None and self.max_context_len is None:
            self.max_context_len = int(self.context_lens.max())

    def _check_prefixes(self) -> None:
        prefix = self.prefix_seq.tolist()
        if self.slot_mapping is not None or len(prefix) != self.num_seqs:
            raise EngineError(
                f"AttentionMetadata.prefix_seq is for packed training: one entry per sequence "
                f"({self.num_seqs}), no KV cache; got {len(prefix)} entries"
                + (" with a cache" if self.slot_mapping is not None else "")
            )
        for s, p in enumerate(prefix):
            if p >= 0 and not (p < s and prefix[p] < 0):
                raise EngineError(
                    f"AttentionMetadata.prefix_seq[{s}] = {p}: a prefix must be an earlier sequence "
                    "without a prefix of its own"
                )

    # ----------------------------------------------------------------------------- builders

    @classmethod
    def packed(
        cls,
        seq_lens: list[int] | torch.Tensor,
        device: torch.device | str = "cpu",
        prefix_seq: list[int] | torch.Tensor | None = None,
    ) -> AttentionMetadata:
        """Metadata of packed training sequences of the given lengths (no cache); `prefix_seq`
        marks shared prompts (see the module docstring)."""
        lens = torch.as_tensor(seq_lens, dtype=torch.int32, device=device)
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lens, 0)
        if prefix_seq is not None:
            prefix_seq = torch.as_tensor(prefix_seq, dtype=torch.int64, device=device)
            if not bool((prefix_seq >= 0).any()):
                prefix_seq = None
        return cls(cu_seqlens_q=cu, prefix_seq=prefix_seq)

    @classmethod
    def paged(
        cls,
        new_lens: list[int] | torch.Tensor,
        context_lens: list[int] | torch.Tensor,
        block_tables: list[list[int]] | torch.Tensor,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata of one paged-cache step, slot_mapping derived from the block tables.

        new_lens[s] new tokens of sequence s occupy cache positions
        context_lens[s] - new_lens[s] ... context_lens[s] - 1. Rows of a list-of-lists
        block table may differ in length (padded with -1 here).
        """
        new = torch.as_tensor(new_lens, dtype=torch.int64)
        ctx = torch.as_tensor(context_lens, dtype=torch.int64)
        if isinstance(block_tables, torch.Tensor):
            tables = block_tables.to(torch.int64).cpu()
        else:
            width = max((len(row) for row in block_tables), default=0)
            tables = torch.full((len(block_tables), max(width, 1)), -1, dtype=torch.int64)
            for s, row in enumerate(block_tables):
                tables[s, : len(row)] = torch.as_tensor(row, dtype=torch.int64)
        seq_of_token = torch.repeat_interleave(torch.arange(new.numel()), new)
        starts = torch.cumsum(new, 0) - new
        offset_in_seq = torch.arange(int(new.sum())) - starts[seq_of_token]
        pos = (ctx - new)[seq_of_token] + offset_in_seq  # absolute cache position of each token
        slots = tables[seq_of_token, pos // block_size] * block_size + pos % block_size
        cu = torch.zeros(new.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(new, 0)
        return cls(
            cu_seqlens_q=cu.to(device),
            context_lens=ctx.to(torch.int32).to(device),
            slot_mapping=slots.to(device),
            block_tables=tables.to(torch.int32).to(device),
        )

    # ----------------------------------------------------------------------- derived views

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens_q[-1])

    @property
    def has_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def seq_lens_q(self) -> torch.Tensor:
        """[S] int64 number of (new) tokens of each sequence."""
        return (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).long()

    @property
    def is_decode(self) -> bool:
        """True when every sequence has exactly one new token (the decode fast path)."""
        return self.max_seqlen_q == 1 and self.num_tokens == self.num_seqs

    def cached(self, key: str, build):
        """Memoise a layer-invariant tensor (built on first use by the first layer)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def seq_ids(self) -> torch.Tensor:
        """[T] int64: the sequence index of each token."""
        return self.cached(
            "seq_ids",
            lambda: torch.repeat_interleave(
                torch.arange(self.num_seqs, device=self.cu_seqlens_q.device), self.seq_lens_q
            ),
        )

    def offsets_in_seq(self) -> torch.Tensor:
        """[T] int64: index of each token among its sequence's (new) tokens."""

        def build() -> torch.Tensor:
            ids = self.seq_ids()
            return torch.arange(ids.numel(), device=ids.device) - self.cu_seqlens_q[:-1].long()[ids]

        return self.cached("offsets_in_seq", build)

    def default_positions(self) -> torch.Tensor:
        """[T] int64 positions of packed tokens given none: 0, 1, ... per sequence, continuing
        after the prefix for a sequence that continues one (prefix_seq)."""
        offsets = self.offsets_in_seq()
        if self.prefix_seq is None:
            return offsets
        prefix = self.prefix_seq.clamp(min=0)
        prefix_lens = torch.where(self.prefix_seq >= 0, self.seq_lens_q[prefix], 0)
        return offsets + prefix_lens[self.seq_ids()]
