"""The sampler and THE log-prob definition: hand-computed filters, chi-square tests against the
intended distributions, counter-based seeds, batch independence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rlcpm.errors import RequestError
from rlcpm.rollout.sampling import (
    SamplingBatch,
    SamplingParams,
    counter_uniforms,
    filter_logits,
    inverse_cdf,
    sample,
    sampling_logprobs,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _batch(params: list[SamplingParams], counters=None, seeds=None) -> SamplingBatch:
    counters = list(range(len(params))) if counters is None else counters
    seeds = [p.seed if p.seed is not None else 0 for p in params] if seeds is None else seeds
    return SamplingBatch.from_params(params, seeds, counters)


def _intended(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """The intended distribution, spelled out in plain Python (no shared code with the sampler)."""
    scaled = [x / temperature for x in logits.tolist()]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    keep = set(order)
    if top_k > 0:
        kth = scaled[order[top_k - 1]]
        keep = {i for i in keep if scaled[i] >= kth}
    z = sum(math.exp(scaled[i]) for i in keep)
    probs = {i: math.exp(scaled[i]) / z for i in keep}
    if top_p < 1:
        kept, mass = set(), 0.0
        for i in sorted(keep, key=lambda i: -scaled[i]):
            if mass < top_p:
                kept.add(i)
            mass += probs[i]
        keep = kept
    z = sum(math.exp(scaled[i]) for i in keep)
    return np.array([math.exp(scaled[i]) / z if i in keep else 0.0 for i in range(len(scaled))])


def test_filter_top_k_keeps_ties_and_top_p_keeps_mass_before_p():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0], [3.0, 1.0, 1.0, 0.0]])
    out = filter_logits(logits, top_k=torch.tensor([2, -1]), top_p=torch.tensor([1.0, 1.0]))
    assert torch.isinf(out[0]).tolist() == [False, False, False, True]  # tie at the 2nd value kept
    assert torch.equal(out[1], logits[1])  # disabled row untouched
    # probs of [ln 6, ln 3, ln 1] = [0.6, 0.3, 0.1]: p=0.6 keeps only the first (mass before 2nd
    # is 0.6, not < 0.6); p=0.61 keeps two; p=0.95 keeps all three.
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]] * 3))
    out = filter_logits(logits, top_k=-1, top_p=torch.tensor([0.6, 0.61, 0.95]))
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 2, 3]
    # tied tokens are kept together: nothing is strictly more likely than any of the three 1.0s
    out = filter_logits(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), top_k=-1, top_p=0.5)
    assert torch.isfinite(out).tolist() == [[True, False, True, True]]


def test_top_p_nucleus_reaching_past_the_sorted_window_is_exact():
    # a flat distribution over 1000 tokens: the 0.9 nucleus needs ~900 tokens (> the first window)
    generator = torch.Generator().manual_seed(0)
    logits = 0.01 * torch.randn(3, 1000, generator=generator)
    kept = torch.isfinite(filter_logits(logits, top_k=-1, top_p=0.9))
    for row in range(3):
        probs = torch.softmax(logits[row].double(), -1)
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        expected = torch.zeros(1000, dtype=torch.bool)
        expected[order[mass_before < 0.9]] = True
        assert torch.equal(kept[row], expected)


def test_a_top_p_below_float32_range_still_keeps_the_most_likely_tokens():
    # top_p = 1e-46 is valid (> 0) but is 0.0 in float32: the top tokens (ties) must survive
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=-1, top_p=1e-46))
    assert kept.tolist() == [[False, True, True, False]]
    ids, logprobs = sample(logits, _batch([SamplingParams(top_p=1e-46, seed=0)]))
    assert ids.item() in (1, 2) and logprobs.item() == pytest.approx(math.log(0.5))


def test_sampling_logprobs_plain_and_greedy_definitions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(sampling_logprobs(logits, tokens, 0.7), expected)
    greedy = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(sampling_logprobs(logits, tokens, 0.0, top_k=2, top_p=0.5), greedy)


def test_sampling_logprobs_with_filters_match_the_intended_distribution():
    logits = LOGITS[None].repeat(6, 1)
    tokens = torch.arange(6)
    got = sampling_logprobs(logits, tokens, 0.8, top_k=4, top_p=0.9)
    with np.errstate(divide="ignore"):
        want = torch.tensor(np.log(_intended(LOGITS, 0.8, 4, 0.9)), dtype=torch.float32)
    torch.testing.assert_close(got, want)


def test_per_row_params_in_one_call_equal_separate_calls():
    torch.manual_seed(1)
    logits = torch.randn(4, 9)
    tokens = torch.tensor([0, 3, 5, 8])
    temps, ks, ps = [1.0, 0.0, 0.5, 1.3], [-1, 3, 2, 5], [1.0, 0.2, 0.9, 0.7]
    batched = sampling_logprobs(logits, tokens, torch.tensor(temps), torch.tensor(ks), torch.tensor(ps))
    for row in range(4):
        single = sampling_logprobs(logits[row : row + 1], tokens[row : row + 1], temps[row], ks[row], ps[row])
        torch.testing.assert_close(batched[row : row + 1], single)


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, -1, 1.0), (0.5, -1, 1.0), (1.7, -1, 1.0), (1.0, 3, 1.0), (1.0, -1, 0.8), (0.7, 4, 0.9)],
)
def test_chi_square_samples_follow_the_intended_distribution(temperature, top_k, top_p):
    num_draws = 20_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=1234)
    batch = _batch([params] * num_draws, counters=list(range(num_draws)))
    token_ids, logprobs = sample(LOGITS[None].expand(num_draws, -1), batch)
    probs = _intended(LOGITS, temperature, top_k, top_p)
    counts = np.bincount(token_ids.numpy(), minlength=6)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    support = probs > 0
    result = stats.chisquare(counts[support], probs[support] * num_draws)
    assert result.pvalue > 1e-3, (counts, probs * num_draws)
    np.testing.assert_allclose(logprobs.numpy(), np.log(probs[token_ids.numpy()]), rtol=1e-5, atol=1e-6)


def test_counter_uniforms_are_uniform_and_depend_only_on_seed_and_counter():
    u = counter_uniforms([7] * 50_000, range(50_000))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.02  # successive draws uncorrelated
    # different seeds give different streams; the same (seed, counter) the same number
    assert not np.allclose(counter_uniforms([1] * 10, range(10)), counter_uniforms([2] * 10, range(10)))
    assert counter_uniforms([5, 9], [3, 4])[1] == counter_uniforms([9], [4])[0]
    assert counter_uniforms([-1], [0])[0] == counter_uniforms([2**64 - 1], [0])[0]


def test_sampled_rows_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(2)
    logits = torch.randn(8, 50)
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, seed=s)
        for t, k, p, s in [(1.0, -1, 1.0, 1), (0.0, -1, 1.0, 2), (0.8, 5, 1.0, 3), (1.2, -1, 0.7, 4)] * 2
    ]
    counters = [0, 5, 9, 2, 11, 0, 3, 7]
    full_ids, full_lp = sample(logits, _batch(params, counters))
    for subset in ([0, 3], [5], [7, 1, 2]):
        sub_ids, sub_lp = sample(
            logits[subset], _batch([params[i] for i in subset], [counters[i] for i in subset])
        )
        assert sub_ids.tolist() == full_ids[subset].tolist()
        assert torch.equal(sub_lp, full_lp[subset])


def test_greedy_takes_argmax_and_records_plain_log_softmax():
    torch.manual_seed(3)
    logits = torch.randn(5, 20)
    ids, lp = sample(logits, _batch([SamplingParams(temperature=0)] * 5))
    assert ids.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).max(-1).values)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_token_ids=[100]), "stop token id 100"),
        (dict(stop=[""]), "stop strings"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(seed=True), "seed"),
        (dict(max_new_tokens=True), "max_new_tokens"),
        (dict(stop_token_ids=[True]), "stop token id True"),
    ],
)
def test_invalid_sampling_params_raise_request_error(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs).validate(vocab_size=100)


def test_numpy_integers_are_taken_as_ints():
    params = SamplingParams(
        max_new_tokens=np.int64(8), top_k=np.int32(5), seed=np.uint64(7), stop_token_ids=[np.int64(3)]
    )
    params.validate(vocab_size=100)
    assert (params.max_new_tokens, params.top_k, params.seed, params.stop_token_ids) == (8, 5, 7, (3,))
    assert all(
        type(v) is int for v in (params.max_new_tokens, params.top_k, params.seed, *params.stop_token_ids)
    )


@pytest.mark.parametrize(
    "stop_token_ids", [np.array([3, 4]), torch.tensor([3, 4]), (3, 4), [np.int64(3), 4]], ids=str
)
def test_stop_token_ids_take_arrays_and_tensors(stop_token_ids):
    # `stop_token_ids or ()` raised "truth value of an array ... is ambiguous" for these
    params = SamplingParams(stop_token_ids=stop_token_ids)
    params.validate(vocab_size=100)
    assert params.stop_token_ids == (3, 4) and all(type(t) is int for t in params.stop_token_ids)


def test_stop_token_ids_take_one_id_or_none():
    assert SamplingParams(stop_token_ids=7).stop_token_ids == (7,)
    assert SamplingParams(stop_token_ids=np.int64(7)).stop_token_ids == (7,)
    assert SamplingParams(stop_token_ids=None).stop_token_ids == ()


def test_two_level_inverse_cdf_equals_a_full_cumulative_sum_and_skips_zero_mass():
    generator = torch.Generator().manual_seed(4)
    probs = torch.rand(64, 1000, generator=generator) ** 4  # 1000: not a multiple of the block size
    probs[probs < 0.2] = 0.0  # many zero-probability entries, whole zero blocks too
    probs[:, 256:512] = 0.0
    uniforms = torch.rand(64, generator=generator, dtype=torch.float64)
    cdf = probs.double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    got = inverse_cdf(probs, uniforms)
    assert got.tolist() == expected.tolist()
    assert bool((probs.gather(1, got[:, None]) > 0).all())
    edge = inverse_cdf(probs, torch.full((64,), 1 - 2**-53, dtype=torch.float64))  # u -> 1
    last_positive = [max(i for i in range(1000) if row[i] > 0) for row in probs.tolist()]
    assert edge.tolist() == last_positive
