"""Learning-rate schedules: the WSD invariants of SPECS §5, cosine, constant, and the LambdaLR wiring."""

from __future__ import annotations

import math

import pytest
import torch

from rlcpm.config import ScheduleConfig
from rlcpm.learner.schedules import build_lr_scheduler, lr_multiplier, wsd_decay_steps

TOTAL = 200


@pytest.mark.parametrize("form", ["exponential", "linear", "cosine"])
def test_wsd_invariants(form):
    cfg = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, decay_form=form)
    warmup, decay_start = 10, TOTAL - wsd_decay_steps(cfg, TOTAL)
    assert decay_start == 160
    f = lambda s: lr_multiplier(s, cfg, TOTAL)
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5)  # linear warmup
    # continuous at W and at T
    assert f(warmup - 1e-9) == pytest.approx(f(warmup), abs=1e-8)
    assert f(decay_start - 1e-9) == pytest.approx(f(decay_start), abs=1e-8)
    # constant in the stable phase
    assert {f(s) for s in range(warmup, decay_start + 1)} == {1.0}
    # monotone non-increasing after W, strictly decaying in the decay phase
    values = [f(s) for s in range(warmup, TOTAL + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))
    assert f(TOTAL) < f(decay_start + 1) < 1.0


def test_wsd_exponential_half_life():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.2)  # T_half = D / 4 = 10
    assert lr_multiplier(160 + 10, cfg, TOTAL) == pytest.approx(0.5)
    assert lr_multiplier(160 + 20, cfg, TOTAL) == pytest.approx(0.25)
    cfg = ScheduleConfig(name="wsd", decay_fraction=0.2, half_life_steps=7)
    assert lr_multiplier(167, cfg, TOTAL) == pytest.approx(0.5)


def test_wsd_linear_and_cosine_end_at_min_ratio():
    for form in ("linear", "cosine"):
        cfg = ScheduleConfig(name="wsd", decay_fraction=0.1, decay_form=form, min_lr_ratio=0.1)
        assert lr_multiplier(TOTAL, cfg, TOTAL) == pytest.approx(0.1)
        assert lr_multiplier(190, cfg, TOTAL) == pytest.approx(0.55)  # half-way


def test_cosine_and_constant():
    cfg = ScheduleConfig(name="cosine", warmup_steps=20)
    assert lr_multiplier(20, cfg, TOTAL) == pytest.approx(1.0)
    assert lr_multiplier(110, cfg, TOTAL) == pytest.approx(0.5)
    assert lr_multiplier(TOTAL, cfg, TOTAL) == pytest.approx(0.0, abs=1e-12)
    constant = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_multiplier(s, constant, TOTAL) for s in (1, 4, 100, 200)] == [0.25, 1.0, 1.0, 1.0]


def test_lambda_lr_runs_update_k_at_step_k_plus_one():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    cfg = ScheduleConfig(name="wsd", warmup_steps=4, decay_fraction=0.5, decay_form="linear")
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=8)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-3 * m for m in (0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0)]
    assert seen == pytest.approx(expected)
    assert not math.isnan(seen[-1])


def test_a_warmup_reaching_into_the_decay_shortens_it_to_end_at_the_last_step(caplog):
    """QAT's 10-step re-warmup on a 10-step run with a 2-step linear decay: the decay used to be
    skipped (the last update ran at the peak rate); it now still ends at step S."""
    cfg = ScheduleConfig(name="wsd", warmup_steps=8, decay_fraction=0.5, decay_form="linear")
    assert [lr_multiplier(s, cfg, 10) for s in range(1, 11)] == pytest.approx(
        [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 0.5, 0.0]
    )
    param = torch.nn.Parameter(torch.zeros(1))
    with caplog.at_level("WARNING", logger="rlcpm"):
        build_lr_scheduler(torch.optim.SGD([param], lr=1.0), cfg, total_steps=10)
    assert "the decay is shortened to 2 steps" in caplog.text
    everything = ScheduleConfig(name="wsd", warmup_steps=10, decay_fraction=0.2, decay_form="linear")
    assert lr_multiplier(10, everything, 10) == 1.0  # no room left: no decay (and a warning)
