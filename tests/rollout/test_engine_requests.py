"""Bad requests are refused one by one without harming the rest of the batch; stop strings
end a request after the token that completes them (the stop string is in the output)."""

from __future__ import annotations

import pytest
import torch

from rlcpm.errors import RequestError
from rlcpm.rollout import Request, SamplingParams

OK = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)


@pytest.mark.parametrize(
    "request_,match",
    [
        (Request("empty", [], OK), "prompt is empty"),
        (Request("too-long", [1] * 256, OK), "no room in the context of 256"),
        (Request("zero-new", [1, 2], SamplingParams(max_new_tokens=0)), "max_new_tokens must be > 0"),
        (
            Request("bad-stop-id", [1, 2], SamplingParams(stop_token_ids=[512])),
            r"stop token id 512 .*\[0, 512\)",
        ),
        (Request("bad-temperature", [1, 2], SamplingParams(temperature=-1.0)), "temperature"),
        (Request("bad-top-p", [1, 2], SamplingParams(top_p=0.0)), "top_p"),
        (Request("bad-token", [1, 9999], OK), r"token ids \[9999\] are outside the vocabulary"),
        (Request("bool-token", [True, 2], OK), r"token ids must be ints, got True \(bool\)"),
        (
            Request(
                "string-temperature", [1, 2], SamplingParams(temperature="1e-3")
            ),  # YAML reads 1e-3 as a str
            r"temperature must be a number, got '1e-3' \(str\)",
        ),
        (Request("none-top-p", [1, 2], SamplingParams(top_p=None)), "top_p must be a number"),
        (
            Request("done-already", [1, 2], SamplingParams(max_new_tokens=2), output_token_ids=[3, 4]),
            "already has 2",
        ),
    ],
    ids=lambda x: x.request_id if isinstance(x, Request) else "",
)
def test_a_bad_request_is_aborted_and_the_others_are_unharmed(request_, match, make_engine, prompts):
    good = prompts(n=3, seed=9)
    engine = make_engine("llama", max_num_seqs=4)
    alone = engine.generate([Request(f"g{i}", p, OK) for i, p in enumerate(good)])
    mixed = engine.generate(
        [Request("g0", good[0], OK), request_, Request("g1", good[1], OK), Request("g2", good[2], OK)]
    )
    bad = mixed[1]
    assert bad.finish_reason == "aborted" and bad.token_ids == [] and bad.request_id == request_.request_id
    assert bad.error is not None
    with pytest.raises(RequestError, match=match):
        raise RequestError(bad.error)
    assert [o.token_ids for o in mixed[:1] + mixed[2:]] == [o.token_ids for o in alone]
    assert all(o.error is None and o.finish_reason == "length" for o in mixed[:1] + mixed[2:])


def test_malformed_calls_raise(make_engine):
    engine = make_engine("llama")
    with pytest.raises(RequestError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[1, 2]], [OK, OK])
    outs = engine.generate([Request("a", [1, 2], OK), Request("a", [3], OK)])
    assert outs[0].finish_reason == "length" and "appears twice" in outs[1].error
    for max_chunk_tokens in (0, 2.5, "4", True):  # 2.5 used to generate 3 tokens, "4" to raise a TypeError
        outs = engine.generate([[1, 2]], OK, max_chunk_tokens=max_chunk_tokens)
        assert outs[0].finish_reason == "aborted" and "max_chunk_tokens must be" in outs[0].error
    # one prompt not wrapped in a list, or text instead of token ids
    for prompts in ([1, 2, 3], torch.tensor([1, 2, 3]), "a prompt", ["a prompt"]):
        with pytest.raises(RequestError, match="generate takes a list of prompts, each a list of token ids"):
            engine.generate(prompts, OK)
    # settings as a dict (crashed with AttributeError 'validate'; an empty one silently used the defaults)
    for params in ({"max_new_tokens": 2}, {}, [{"max_new_tokens": 2}]):
        with pytest.raises(
            RequestError, match=r"params must be a SamplingParams.*got dict.*SamplingParams\(\*\*"
        ):
            engine.generate([[1, 2]], params)
    with pytest.raises(RequestError, match="params must be a SamplingParams"):
        engine.add_request(Request("by-hand", [1, 2], {"max_new_tokens": 2}))
    assert not engine.scheduler.has_unfinished


def test_a_step_by_hand_with_nothing_left_to_run_returns_no_sequences(make_engine):
    """add_request + step() (docs/engine.md): stepping once more after the last request finished
    is not an error (it said the KV cache was too small for a waiting request)."""
    engine = make_engine("llama")
    engine.add_request(Request("r", [1, 2], SamplingParams(max_new_tokens=2, seed=0, ignore_eos=True)))
    finished = [seq for _ in range(4) for seq in engine.step()]
    assert [seq.request_id for seq in finished] == ["r"]
    assert engine.step() == []


def test_stop_strings_end_the_request_after_the_completing_token(make_engine, prompts):
    engine = make_engine("llama", max_num_seqs=4)
    tokenizer = engine.tokenizer
    batch = prompts(n=4, seed=10)
    greedy = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    free = engine.generate(batch, greedy)
    stops = []
    for out in free:  # a stop string made of the text of tokens 5..6 (ends inside the output)
        text = tokenizer.decode(out.token_ids[5:7])
        stops.append(text.strip() or text)
    params = [
        SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "never-there"])
        for stop in stops
    ]
    outs = engine.generate(batch, params)
    for out, whole, stop in zip(outs, free, stops):
        text = tokenizer.decode(out.token_ids)
        assert out.finish_reason == "stop" and stop in text
        assert out.token_ids == whole.token_ids[: len(out.token_ids)]
        assert stop not in tokenizer.decode(out.token_ids[:-1])  # it stopped at the first occurrence
    # the stop string is searched in the output only, across chunk boundaries too
    chunked, done = [], False
    request_id, prompt, p = "c", batch[0], params[0]
    while not done:
        out = engine.generate([Request(request_id, prompt, p, chunked)], max_chunk_tokens=2)[0]
        chunked += out.token_ids
        done = out.finish_reason != "chunk"
    assert chunked == outs[0].token_ids


def test_stop_strings_need_a_tokenizer(tiny_dirs):
    from rlcpm.models import load_model
    from rlcpm.rollout import Engine

    engine = Engine(load_model(str(tiny_dirs["llama"])), tokenizer=None, kv_budget_bytes=1 << 20)
    out = engine.generate([[1, 2, 3]], SamplingParams(stop=["x"]))[0]
    assert out.finish_reason == "aborted" and "tokenizer" in out.error


def test_a_call_that_raises_leaves_no_request_behind(make_engine, prompts, monkeypatch):
    engine = make_engine("llama", max_num_seqs=4)
    free_blocks = len(engine.block_manager.free_block_ids)
    step, calls = engine.step, []

    def interrupted():  # Ctrl-C in the middle of decoding
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(engine, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.generate(
            [Request(f"r{i}", p, OK) for i, p in enumerate(prompts(n=6, seed=4))], max_chunk_tokens=2
        )
    monkeypatch.setattr(engine, "step", step)
    assert not engine.scheduler.has_unfinished and not engine.scheduler.paused
    assert len(engine.block_manager.free_block_ids) == free_blocks  # no KV leaked
    out = engine.generate([[4, 5, 6]], SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert len(out) == 1 and engine.engine_stats()["num_paused"] == 0


def test_prompts_as_arrays_and_a_single_id_to_drop(make_engine):
    import numpy as np
    import torch

    engine = make_engine("llama")
    reference = engine.generate([[1, 2, 3]], OK)[0].token_ids
    for prompt in (np.array([1, 2, 3]), torch.tensor([1, 2, 3]), [np.int64(1), np.int64(2), np.int64(3)]):
        assert engine.generate([prompt], OK)[0].token_ids == reference
    engine.generate([Request("traj-7", [1, 2, 3], OK)], max_chunk_tokens=2)
    assert engine.drop_paused("traj-7") == 1  # the id itself, not its characters


@pytest.mark.parametrize("setting", ["max_num_seqs", "max_num_batched_tokens", "block_size", "max_model_len"])
def test_engine_sizes_below_one_are_refused_at_construction(setting, make_engine):
    from rlcpm.errors import EngineError

    with pytest.raises(EngineError, match=f"{setting} must be an int >= 1.*, got 0"):
        make_engine("llama", **{setting: 0})
    if setting == "max_model_len":  # 0 used to mean the model's limit, -5 refused every request
        with pytest.raises(EngineError, match="got -5"):
            make_engine("llama", max_model_len=-5)


def test_a_prompt_longer_than_the_kv_cache_is_refused_naming_the_kv_budget(make_engine):
    """The model takes 256 tokens but a 4-block cache only 64: the refusal used to speak of a
    64-token context only, which no setting of the user's says."""
    engine = make_engine("llama", kv_budget_bytes=4 * 8192)
    long, short = engine.generate([[1] * 100, [1, 2, 3]], OK)
    assert long.finish_reason == "aborted" and short.finish_reason == "length"
    assert "context of 64 tokens" in long.error
    assert "the KV cache holds 64 tokens" in long.error and "kv_budget" in long.error
    assert "KV cache" not in make_engine("llama").generate([[1] * 256], OK)[0].error  # the model's limit


def test_two_kv_budgets_are_refused(make_engine):
    from rlcpm.errors import EngineError

    with pytest.raises(EngineError, match="kv_budget_bytes or kv_budget_gb, not both"):
        make_engine("llama", kv_budget_bytes=1 << 20, kv_budget_gb=0.5)


@pytest.mark.parametrize(
    "budget",
    [
        {"kv_budget_gb": float("nan")},
        {"kv_budget_gb": float("inf")},
        {"kv_budget_gb": "2"},
        {"kv_budget_bytes": 1e6},
    ],
    ids=["gb-nan", "gb-inf", "gb-str", "bytes-float"],
)
def test_a_malformed_kv_budget_is_refused_with_its_name(budget, make_engine):
    """It used to surface as a bare ValueError / OverflowError / TypeError from deep inside."""
    from rlcpm.errors import EngineError

    name = next(iter(budget))
    with pytest.raises(EngineError, match=f"{name} must be"):
        make_engine("llama", **{"kv_budget_bytes": None, **budget})


def test_a_failed_forward_leaves_no_unwritten_blocks_in_the_prefix_cache(make_engine, monkeypatch):
    """The blocks a step registers for prefix sharing get their KV from that step's forward:
    when the forward fails (out of memory, an interrupt), a later request with the same prompt
    must compute its KV again, not read blocks that were never written."""
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(10, 60))  # three full blocks
    reference = make_engine("llama").generate([prompt], greedy)[0].token_ids
    engine = make_engine("llama")
    run = engine.runner.run

    def out_of_memory(batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.runner, "run", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.generate([prompt], greedy)
    monkeypatch.setattr(engine.runner, "run", run)
    out = engine.generate([prompt], greedy)[0]
    assert out.num_cached_prompt_tokens == 0
    assert out.token_ids == reference
    assert engine.generate([prompt], greedy)[0].num_cached_prompt_tokens == 48  # the cache works again


def test_no_stop_strings_or_stop_ids_given_as_none(make_engine):
    """stop=None / stop_token_ids=None (as vLLM takes them) mean none, like the empty defaults."""
    engine = make_engine("llama")
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, stop=None, stop_token_ids=None)
    assert params.stop == () and params.stop_token_ids == ()
    default = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    out, reference = engine.generate([[1, 2, 3], [1, 2, 3]], [params, default])
    assert out.finish_reason == "length" and out.token_ids == reference.token_ids
