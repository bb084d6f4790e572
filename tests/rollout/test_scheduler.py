"""Scheduler policy without a model: token budgets with decodes first, chunked prefill,
max_num_seqs, preemption (most recent first) and reclaiming paused KV before preempting."""

from __future__ import annotations

from rlcpm.rollout.block_manager import BlockManager
from rlcpm.rollout.sampling import SamplingParams
from rlcpm.rollout.scheduler import Scheduler
from rlcpm.rollout.sequence import Request, Sequence, SequenceStatus

NO_EOS = frozenset()


def _seq(seq_id: int, num_tokens: int, max_new_tokens: int = 100, block_size: int = 4) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return Sequence(seq_id, Request(seq_id, [seq_id + 1] * num_tokens), params, seed=0, block_size=block_size)


def _step(scheduler: Scheduler):
    batch = scheduler.schedule()
    num_sampling = sum(batch.is_sampling(i) for i in range(len(batch.seqs)))
    done = scheduler.postprocess(batch, [7] * num_sampling, [0.0] * num_sampling, NO_EOS)
    return batch, done


def test_long_prompts_are_prefilled_in_chunks_and_decodes_go_first():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10, max_model_len=200)
    short = _seq(0, 3)
    scheduler.add(short)
    batch, _ = _step(scheduler)
    assert batch.num_query_tokens == [3]
    scheduler.add(_seq(1, 25))
    budgets = []
    for _ in range(4):
        batch, _ = _step(scheduler)
        assert batch.seqs[0] is short and batch.num_query_tokens[0] == 1  # the decode is never starved
        assert batch.num_tokens <= 10
        budgets.append(batch.num_query_tokens[1:])
    assert budgets == [[9], [9], [7], [1]]  # 25 prompt tokens in chunks, then its first decode


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100, max_model_len=200)
    for i in range(3):
        scheduler.add(_seq(i, 2, max_new_tokens=2))
    batch, _ = _step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [0, 1]
    _, done = _step(scheduler)
    assert {s.seq_id for s in done} == {0, 1} and all(s.finish_reason == "length" for s in done)
    batch, _ = _step(scheduler)
    assert [s.seq_id for s in batch.seqs] == [2]


def test_blocks_running_short_preempt_the_newest_sequence_which_resumes_later():
    bm = BlockManager(5, 4)  # 20 slots
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, max_model_len=20)
    first, second = _seq(0, 8, max_new_tokens=6), _seq(1, 7, max_new_tokens=6)
    scheduler.add(first)
    scheduler.add(second)
    _step(scheduler)  # 2 + 2 blocks
    _step(scheduler)  # first needs a 3rd block at token 9; second (the newest) fits in its 2
    batch, _ = _step(scheduler)  # second needs a 3rd block: none left -> preempted
    assert scheduler.num_preemptions == 1 and second.status is SequenceStatus.WAITING
    assert batch.seqs == [first] and second.block_table == [] and second.num_computed_tokens == 0
    assert len(second) == 9  # its generated tokens are kept and will be prefilled again
    finished = []
    for _ in range(20):
        if not scheduler.has_unfinished:
            break
        finished += _step(scheduler)[1]
    assert [s.seq_id for s in finished] == [0, 1]
    assert [len(s.output_token_ids) for s in finished] == [6, 6]
    assert bm.num_free_blocks == 5


def test_paused_kv_is_reclaimed_before_anything_is_preempted():
    bm = BlockManager(4, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, max_model_len=16)
    paused = _seq(0, 7)
    paused.start_call(chunk_budget=1)
    scheduler.add(paused)
    _, done = _step(scheduler)
    assert done == [paused] and paused.status is SequenceStatus.PAUSED and len(paused.block_table) == 2
    runner = _seq(1, 12)
    scheduler.add(runner)
    batch, _ = _step(scheduler)  # needs 3 blocks, 2 are free: the paused KV goes
    assert batch.seqs == [runner] and not scheduler.paused and paused.block_table == []
    assert scheduler.num_preemptions == 0


def test_prefix_hits_count_the_blocks_of_admitted_sequences_only():
    """A waiting sequence takes its cached prefix at every admission try; a try that finds too
    few free blocks hands them back, and used to count them as hits all the same."""
    bm = BlockManager(6, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, max_model_len=24)
    scheduler.add(_seq(0, 8, max_new_tokens=1))  # two full blocks, cached once it finishes
    _step(scheduler)
    runner = _seq(1, 16, max_new_tokens=4)
    waiter = Sequence(
        2, Request(2, [1] * 8 + [3] * 4), SamplingParams(max_new_tokens=1, ignore_eos=True), 0, 4
    )
    scheduler.add(runner)
    scheduler.add(waiter)
    tries = 0
    while waiter.status is SequenceStatus.WAITING:
        _step(scheduler)
        tries += 1
    assert tries > 1  # it waited for the runner's blocks
    assert bm.num_prefix_hits == waiter.num_cached_prompt_tokens // 4
