"""Which sequences run this step, with how many tokens each.

One step is one forward over a packed batch that mixes decodes (one token per running
sequence) and prefill chunks. Policy, in order:

1. Running sequences, decodes first, then unfinished prefills: each gets what it still needs,
   up to the step's token budget (``max_num_batched_tokens``) — long prompts are prefilled in
   chunks across steps, so they never starve the decodes.
2. Waiting sequences (FIFO) are admitted while the budget, ``max_num_seqs`` and free blocks
   allow; an admitted sequence first takes the cached KV blocks of its leading tokens.
3. When blocks run short, idle KV is reclaimed first: paused sequences (chunk budget
   reached, KV kept), oldest first, then resumed chunks still waiting; then the most recently admitted running sequence not yet scheduled
   is preempted: its blocks are freed and it waits at the head of the queue, to be
   prefilled again (prompt + tokens so far) — recomputation, no swapping.

After the forward, ``postprocess`` appends the sampled tokens and applies the stop rules;
a sequence whose call budget of new tokens (``max_chunk_tokens``) is used up is paused —
the chunk budget is a policy of this scheduler, not a second loop.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rlcpm.rollout.block_manager import BlockManager
from rlcpm.rollout.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_query_tokens: list[int]  # tokens computed for each sequence this step
    # The leading sequences that decode one token over KV computed in EARLIER steps. A sequence
    # admitted this step may have one token left after prefix sharing, but the blocks it shares
    # can be written by this very forward: it must read the cache after the write, not a copy.
    num_steady_decodes: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_query_tokens)

    def is_sampling(self, index: int) -> bool:
        """True when seq ``index`` reaches its last token this step (its logits are sampled)."""
        seq = self.seqs[index]
        return seq.num_computed_tokens + self.num_query_tokens[index] == len(seq)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        num_lookahead_tokens: int = 0,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # speculative decoding: KV slots for the draft tokens a decode step verifies
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: OrderedDict[Any, Sequence] = OrderedDict()
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; one that still holds KV (a resumed chunk) keeps it while it waits."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def take_paused(self, request_id: Any) -> Sequence | None:
        return self.paused.pop(request_id, None)

    def drop_paused(self, request_ids: Iterable[Any] | None = None) -> int:
        """Free the KV of paused sequences (all when request_ids is None); returns how many."""
        ids = list(self.paused) if request_ids is None else [r for r in request_ids if r in self.paused]
        for request_id in ids:
            self.block_manager.free(self.paused.pop(request_id))
        return len(ids)

    def discard(self, seqs: Iterable[Sequence]) -> None:
        """Remove these sequences from every queue and free their KV (an abandoned call)."""
        doomed = {id(seq) for seq in seqs}
        self.waiting = deque(seq for seq in self.waiting if id(seq) not in doomed)
        self.running = [seq for seq in self.running if id(seq) not in doomed]
        for request_id in [r for r, seq in self.paused.items() if id(seq) in doomed]:
            del self.paused[request_id]
        for seq in seqs:
            self.block_manager.free(seq)

    def drop_all_kv(self) -> None:
        """Free every sequence's KV (new weights make it stale); running ones queue up again."""
        for seq in reversed(self.running):
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        self.running = []
        for seq in self.waiting:
            self.block_manager.free(seq)
        self.drop_paused()

    # ------------------------------------------------------------------------------ schedule

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        num_query_tokens: list[int] = []
        queue = [s for s in self.running if len(s) - s.num_computed_tokens == 1]
        queue += [s for s in self.running if len(s) - s.num_computed_tokens > 1]
        next_index = 0
        while next_index < len(queue) and budget > 0:
            seq = queue[next_index]
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            while not bm.can_reserve(seq, self._num_slots(seq, num_tokens)):
                if not self._reclaim_idle_blocks():
                    victim = queue.pop()
                    self._preempt(victim)
                    if victim is seq:
                        break
            else:
                self._schedule(seq, num_tokens, seqs, num_query_tokens)
                budget -= num_tokens
                next_index += 1
                continue
            break
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]

        num_running = len(seqs)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            num_shared_blocks = 0
            if not seq.block_table:
                num_shared_blocks = bm.share_cached_prefix(seq) // bm.block_size
                seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            num_tokens = min(len(seq) - seq.num_computed_tokens, budget)
            while not bm.can_reserve(seq, self._num_slots(seq, num_tokens)):
                if not self._reclaim_idle_blocks(keep=seq):
                    break
            if not bm.can_reserve(seq, self._num_slots(seq, num_tokens)):
                bm.free(seq)
                break
            bm.num_prefix_hits += num_shared_blocks  # not on a try that gave them back
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule(seq, num_tokens, seqs, num_query_tokens)
            budget -= num_tokens
        # Steady decodes first (running before this step, one token), then everything else.
        is_steady = [i < num_running and num_query_tokens[i] == 1 for i in range(len(seqs))]
        order = sorted(range(len(seqs)), key=lambda i: not is_steady[i])
        return ScheduledBatch(
            [seqs[i] for i in order], [num_query_tokens[i] for i in order], num_steady_decodes=sum(is_steady)
        )

    def _num_slots(self, seq: Sequence, num_tokens: int) -> int:
        """KV slots seq needs this step: its tokens, plus the lookahead when it samples."""
        end = seq.num_computed_tokens + num_tokens
        if self.num_lookahead_tokens and end == len(seq):
            end = max(end, min(end + self.num_lookahead_tokens, self.max_model_len))
        return end

    def _schedule(self, seq: Sequence, num_tokens: int, seqs: list, num_query_tokens: list) -> None:
        self.block_manager.reserve(seq, self._num_slots(seq, num_tokens))
        self.block_manager.register_full_blocks(seq, seq.num_computed_tokens + num_tokens)
        seqs.append(seq)
        num_query_tokens.append(num_tokens)

    def _reclaim_idle_blocks(self, keep: Sequence | None = None) -> bool:
        """Free the KV of one idle sequence: the oldest paused one, else the last waiting one
        holding KV (a resumed chunk, prefilled again later). False when there is none."""
        if self.paused:
            _, seq = self.paused.popitem(last=False)
            self.block_manager.free(seq)
            return True
        for seq in reversed(self.waiting):
            if seq.block_table and seq is not keep:
                self.block_manager.free(seq)
                return True
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # --------------------------------------------------------------------------- postprocess

    def postprocess(
        self,
        batch: ScheduledBatch,
        token_ids: list[int] | list[list[int]],
        logprobs: list[float] | list[list[float]],
        eos_token_ids: frozenset,
    ) -> list[Sequence]:
        """Advance every scheduled sequence; append sampled tokens (one per sampling sequence,
        in batch order, or a list of verified tokens each with speculative decoding, appended
        until a stop rule fires); return the sequences that left the running set."""
        done: list[Sequence] = []
        sample_index = 0
        for index, seq in enumerate(batch.seqs):
            is_sampling = batch.is_sampling(index)
            seq.num_computed_tokens += batch.num_query_tokens[index]
            if not is_sampling:
                continue
            tokens, lps = token_ids[sample_index], logprobs[sample_index]
            sample_index += 1
            if isinstance(tokens, int):
                tokens, lps = [tokens], [lps]
            reason = None
            for token_id, logprob in zip(tokens, lps):
                seq.append(token_id, logprob)
                reason = self._finish_reason(seq, token_id, eos_token_ids)
                if reason is not None:
                    break
            # verified tokens before the last appended one had their KV computed this step;
            # the KV of rejected or unused ones is left behind (rolled back)
            seq.num_computed_tokens = len(seq) - 1
            if reason is not None:
                seq.finish_reason = reason
                done.append(seq)
        for seq in done:
            self.running.remove(seq)
            if seq.finish_reason == "chunk":
                seq.status = SequenceStatus.PAUSED
                self.paused[seq.request_id] = seq
            else:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
        return done

    def _finish_reason(self, seq: Sequence, token_id: int, eos_token_ids: frozenset) -> str | None:
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in eos_token_ids):
            return "stop"
        if seq.stop_checker is not None and seq.stop_checker.append_and_check(token_id):
            return "stop"
        if seq.num_generated >= params.max_new_tokens or len(seq) >= self.max_model_len:
            return "length"
        if seq.chunk_budget is not None and seq.chunk_budget <= 0:
            return "chunk"
        return None
