"""Reward registry: `@rlcpm.reward("name")`, lookup by name, and import by "package.module:function"."""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from rlcpm.errors import RewardError


@dataclass(frozen=True)
class RewardFunction:
    """A reward callable and how to call it.

    fn(sample, **kwargs) -> float | dict (a dict holds named components and a "total");
    batched: fn(samples, **kwargs) -> list of those. Sync or `async def`.
    timeout_s: default time limit per call (a recipe's `timeout_s` overrides it).
    """

    name: str
    fn: Callable[..., Any]
    batched: bool = False
    timeout_s: float | None = None

    @property
    def path(self) -> str:
        """ "module:qualname", for messages (and for importing it elsewhere); a callable object's class."""
        fn = self.fn if hasattr(self.fn, "__qualname__") else type(self.fn)
        return f"{fn.__module__}:{fn.__qualname__}"


_REGISTRY: dict[str, RewardFunction] = {}
_LOCK = threading.Lock()


def reward(
    name: str | Callable | None = None, *, batched: bool = False, timeout_s: float | None = None
) -> Callable:
    """Register a reward function under `name` (default: the function's name).

    Usable as `@reward`, `@reward("name")` or `@reward("name", batched=True, timeout_s=10)`.
    The function is returned unchanged, so it stays a plain callable.
    """
    if callable(name):
        return reward()(name)

    def register(fn: Callable) -> Callable:
        if not callable(fn):
            raise RewardError(f"@reward must decorate a function, got {type(fn).__name__}")
        if name is None and not hasattr(fn, "__name__"):  # a functools.partial, a callable object
            raise RewardError(
                f"@reward: {type(fn).__name__} has no __name__ to register it under; "
                "give one: @rlcpm.reward('my_reward')"
            )
        reward_name = fn.__name__ if name is None else name
        if not isinstance(reward_name, str) or not reward_name:
            raise RewardError(f"@reward: the reward name must be a non-empty string, got {reward_name!r}")
        if timeout_s is not None and not _is_seconds(timeout_s):
            raise RewardError(
                f"@reward({name!r}): timeout_s must be a finite number of seconds > 0, got {timeout_s!r}"
            )
        entry = RewardFunction(reward_name, fn, batched, timeout_s)
        with _LOCK:
            previous = _REGISTRY.get(entry.name)
            if previous is not None and previous.path != entry.path:
                raise RewardError(
                    f"reward name {entry.name!r} is already registered by {previous.path}; "
                    f"pick another name for {entry.path}"
                )
            _REGISTRY[entry.name] = entry
        with suppress(AttributeError):  # a bound method takes no attributes: it is found by name only
            fn.__rlcpm_reward__ = entry
        return fn

    return register


def _is_seconds(value: Any) -> bool:
    """A finite number > 0 (not a bool): what a recipe's timeout_s accepts too."""
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def get_reward(name: str) -> RewardFunction:
    """The registered reward `name`; RewardError lists the known names (with a did-you-mean)."""
    import rlcpm.rewards.builtin  # noqa: F401 - registers math, code, tool_use, format, ...

    with _LOCK:
        entry = _REGISTRY.get(name)
        known = sorted(_REGISTRY)
    if entry is None:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"unknown reward name {name!r}{hint} Registered: {', '.join(known)}. A custom reward must be "
            "registered with @rlcpm.reward before use (import its module), or given as fn: 'module:function'"
        )
    return entry


def registered_rewards() -> dict[str, RewardFunction]:
    import rlcpm.rewards.builtin  # noqa: F401

    with _LOCK:
        return dict(_REGISTRY)


def import_function(path: str) -> Callable:
    """ "package.module:function" (or "module:Class.method") -> the callable."""
    module_name, sep, qualname = path.partition(":")
    if not sep or not module_name or not qualname:
        raise RewardError(f"reward fn must look like 'package.module:function', got {path!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure, reported with its cause
        raise RewardError(
            f"cannot import module {module_name!r} for reward fn {path!r}: {type(err).__name__}: {err} "
            "(is it installed, or on sys.path / PYTHONPATH?)"
        ) from err
    for part in qualname.split("."):
        if not hasattr(target, part):
            raise RewardError(f"module {module_name!r} has no attribute {qualname!r} (reward fn {path!r})")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(f"reward fn {path!r} is a {type(target).__name__}, not a function")
    return target


def as_reward_function(fn: Callable) -> RewardFunction:
    """The registered metadata of a decorated function, or plain defaults for an undecorated one."""
    entry = getattr(fn, "__rlcpm_reward__", None)
    if isinstance(entry, RewardFunction):
        return entry
    return RewardFunction(getattr(fn, "__name__", type(fn).__name__), fn)


def check_arguments(entry: RewardFunction, kwargs: dict, label: str) -> None:
    """The recipe's kwargs must fit the function's signature (after the sample argument)."""
    try:
        signature = inspect.signature(entry.fn)
    except (TypeError, ValueError):
        return  # builtins and C callables: nothing to check
    try:
        signature.bind(None, **kwargs)
    except TypeError as err:
        raise RewardError(
            f"reward {label!r} ({entry.path}): kwargs {sorted(kwargs)} do not fit {entry.path.rpartition(':')[2]}{signature}: {err}"
        ) from err
