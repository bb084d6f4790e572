"""Learning-rate schedules: constant, cosine, and WSD (warmup-stable-decay, MiniCPM; SPECS §5).

As a multiplier of the peak rate eta, at step s (the s-th optimizer update, counted from 1):

    warmup    s / W                         for s < W (all schedules)
    constant  1
    cosine    m + (1 - m) * (1 + cos(pi * (s - W) / (S - W))) / 2
    wsd       1 for W <= s < T;  m + (1 - m) * g(s - T) for s >= T,  T = S - D,  D = round(f_d * S)
              g(x) = 0.5 ** (x / T_half)          exponential (MiniCPM), T_half = D / 4 by default
              g(x) = 1 - x / D                    linear
              g(x) = (1 + cos(pi * x / D)) / 2    cosine

with S the total number of steps, f_d = `decay_fraction` and m = `min_lr_ratio`. A warmup that runs
past T (W > S - D, e.g. QAT's re-warmup on a short run) moves T to W and shortens D to S - W, with a
warning, so that the decay still ends at step S. Continuous at W and
at T, constant in the stable phase, non-increasing after W. Update k (0-based) uses s = k + 1, so the
first update does not waste a zero learning rate and the last one sees the fully decayed rate.
"""

from __future__ import annotations

import logging
import math

import torch

from rlcpm.config import ScheduleConfig

log = logging.getLogger("rlcpm.learner")


def lr_multiplier(step: int, schedule: ScheduleConfig, total_steps: int) -> float:
    """The factor applied to the peak learning rate at step `step` (1-based)."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return step / warmup
    floor = schedule.min_lr_ratio
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start, decay_steps = wsd_decay_phase(schedule, total_steps)
    if step < decay_start or decay_steps == 0:
        return 1.0
    elapsed = min(step - decay_start, decay_steps)
    return floor + (1.0 - floor) * _decay_shape(elapsed, decay_steps, schedule)


def wsd_decay_steps(schedule: ScheduleConfig, total_steps: int) -> int:
    """D: the number of steps in the WSD decay phase."""
    return int(round(schedule.decay_fraction * total_steps))


def wsd_decay_phase(schedule: ScheduleConfig, total_steps: int) -> tuple[int, int]:
    """(T, length) of the decay actually run: T = S - D, or the end of the warmup when that comes
    later, in which case the decay is shortened so that it still ends at step S."""
    decay_steps = wsd_decay_steps(schedule, total_steps)
    decay_start = max(total_steps - decay_steps, schedule.warmup_steps)
    return decay_start, max(min(decay_steps, total_steps - decay_start), 0)


def _decay_shape(elapsed: float, decay_steps: int, schedule: ScheduleConfig) -> float:
    if schedule.decay_form == "exponential":
        half_life = schedule.half_life_steps or decay_steps / 4
        return 0.5 ** (elapsed / half_life)
    if schedule.decay_form == "linear":
        return 1.0 - elapsed / decay_steps
    return 0.5 * (1.0 + math.cos(math.pi * elapsed / decay_steps))


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose update k (0-based) runs at eta * lr_multiplier(k + 1)."""
    if schedule.name == "wsd":
        decay_start, decay_steps = wsd_decay_phase(schedule, total_steps)
        planned = wsd_decay_steps(schedule, total_steps)
        if decay_steps < planned:
            log.warning(
                "lr schedule: the warmup (%d steps, QAT's re-warmup included) reaches into the WSD "
                "decay phase (the last %d of %d steps): the decay is shortened to %d steps",
                schedule.warmup_steps, planned, total_steps, decay_steps,
            )  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_multiplier(k + 1, schedule, total_steps))
