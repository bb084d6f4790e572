"""A user's own reward module, written as a user would: used by `fn:` path and by registered name."""

from __future__ import annotations

import asyncio
import re
import time

import rlcpm


@rlcpm.reward("user_short_answer")
def short_answer(sample: rlcpm.Sample, limit: int = 20) -> float:
    """1.0 for responses of at most `limit` characters."""
    return 1.0 if len(sample.response) <= limit else 0.0


def keyword(sample: rlcpm.Sample, word: str = "yes") -> dict:
    """Undecorated: reachable only by path. Returns named components and a total."""
    return {"total": float(word in sample.response), "mentions": float(sample.response.count(word))}


def fragile(sample: rlcpm.Sample) -> float:
    """Raises ZeroDivisionError for rows whose `denominator` is 0."""
    return 1.0 / sample.denominator


@rlcpm.reward("user_async_exact", timeout_s=5.0)
async def async_exact(sample: rlcpm.Sample) -> float:
    await asyncio.sleep(0.01)
    return float(sample.response.strip() == sample.answer)


@rlcpm.reward("user_lengths", batched=True)
def lengths(samples: list[rlcpm.Sample]) -> list[float]:
    return [float(len(s.response)) for s in samples]


def sleepy(sample: rlcpm.Sample, seconds: float = 60.0) -> float:
    """Hangs (sleeping) on rows marked `hang`."""
    if sample.get("hang"):
        time.sleep(seconds)
    return 1.0


def gil_hog(sample: rlcpm.Sample) -> float:
    """Hangs on rows marked `spin` inside the regex engine, which never releases the GIL."""
    if sample.get("spin"):
        re.match(r"(a+)+$", "a" * 64 + "b")
    return 1.0


def not_a_number(sample: rlcpm.Sample) -> str:
    return "high"


class Scaled:
    """A callable object, not a function: `fn: rlcpm_user_rewards:scaled`."""

    def __init__(self, factor: float):
        self.factor = factor

    def __call__(self, sample: rlcpm.Sample, offset: float = 0.0) -> float:
        return self.factor / sample.denominator + offset


scaled = Scaled(2.0)


_ready = asyncio.Event()  # module-level asyncio state, as an async HTTP client's pool or a rate limiter holds


async def async_shared_state(sample: rlcpm.Sample) -> float:
    """Awaits a module-level Event, which binds it to the event loop of the first call."""
    _ready.clear()
    asyncio.get_running_loop().call_later(0.001, _ready.set)
    await _ready.wait()
    return 1.0
