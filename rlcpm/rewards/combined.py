"""The recipe's `rewards:` list as one reward: resolved terms, weighted total, per-component values.

    rewards:
      - {name: math, weight: 1.0}
      - {fn: "my_pkg.rewards:brevity", weight: 0.2, timeout_s: 5, on_error: drop, kwargs: {limit: 200}}

total = sum_k weight_k * value_k, where value_k is a term's float, or its dict's "total".
Components (for logging): each term's value under its label, and a dict's other entries as
"label/key". A term that raises or passes its time limit is logged with the function and the
sample id and scored by its `on_error`: "zero" (value 0.0) or "drop" (the sample is dropped).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from rlcpm.config import RewardSpec, format_validation_errors
from rlcpm.errors import RecipeError, RewardError
from rlcpm.rewards.calling import CallOutcome, call_all, call_maybe_async
from rlcpm.rewards.registry import (
    RewardFunction,
    as_reward_function,
    check_arguments,
    get_reward,
    import_function,
)
from rlcpm.rewards.sample import Sample

logger = logging.getLogger("rlcpm.rewards")

DEFAULT_TIMEOUT_S = 60.0


@dataclass
class RewardResult:
    total: float
    components: dict[str, float] = field(default_factory=dict)
    dropped: bool = False
    error: str | None = None


@dataclass(frozen=True)
class RewardTerm:
    """One resolved entry of the recipe's rewards list."""

    label: str
    function: RewardFunction
    weight: float = 1.0
    timeout_s: float = DEFAULT_TIMEOUT_S
    on_error: str = "zero"
    kwargs: dict = field(default_factory=dict)


def resolve_terms(specs: Sequence[RewardSpec | dict]) -> list[RewardTerm]:
    """Look up names, import `fn` paths, check kwargs against signatures. Labels are made unique
    (`name_2`, ...), and a term named `total` is labelled `total_2`."""
    specs = [_as_spec(spec, index) for index, spec in enumerate(specs)]
    taken = {spec.label for spec in specs}  # a renamed duplicate must not take another term's label
    terms, used = [], {"total"}  # reward/total_mean is the weighted total's (summarize): never a term's
    for spec in specs:
        function = get_reward(spec.name) if spec.name else as_reward_function(import_function(spec.fn))
        label, n = spec.label, 1
        while label in used or (n > 1 and label in taken):
            n += 1
            label = f"{spec.label}_{n}"
        used.add(label)
        check_arguments(function, spec.kwargs, label)
        timeout_s = spec.timeout_s or function.timeout_s or DEFAULT_TIMEOUT_S
        terms.append(RewardTerm(label, function, spec.weight, timeout_s, spec.on_error, dict(spec.kwargs)))
    if not terms:
        raise RewardError("no rewards configured: add entries under `rewards:` in the recipe")
    return terms


def _as_spec(spec: RewardSpec | dict, index: int) -> RewardSpec:
    """A dict checked as a recipe's `rewards[index]` entry would be (RecipeError with a did-you-mean)."""
    if isinstance(spec, RewardSpec):
        return spec
    try:
        return RewardSpec.model_validate(spec)
    except ValidationError as err:
        raise RecipeError(format_validation_errors(err, RewardSpec), source=f"rewards[{index}]") from None


class CombinedReward:
    """Scores samples with every term, in this process (see RewardPool for Ray workers)."""

    def __init__(self, terms: Sequence[RewardTerm]):
        self.terms = list(terms)
        self.num_abandoned_calls = 0  # hung calls whose threads may still be running

    @classmethod
    def from_specs(cls, specs: Sequence[RewardSpec | dict]) -> CombinedReward:
        return cls(resolve_terms(specs))

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """One RewardResult per sample, in order. Never raises because of a reward function."""
        samples = list(samples)
        results = [RewardResult(0.0) for _ in samples]
        for term in self.terms:
            for sample, result, outcome in zip(samples, results, self._run_term(term, samples)):
                self._apply(term, sample, result, outcome)
        return results

    def _run_term(self, term: RewardTerm, samples: list[Sample]) -> list[CallOutcome]:
        fn, kwargs = term.function.fn, term.kwargs
        if not term.function.batched:
            calls = [functools.partial(call_maybe_async, fn, sample, **kwargs) for sample in samples]
            outcomes, abandoned = call_all(calls, [term.timeout_s] * len(samples))
            self.num_abandoned_calls += abandoned
            return outcomes
        (outcome,), abandoned = call_all(
            [functools.partial(call_maybe_async, fn, samples, **kwargs)], [term.timeout_s]
        )
        self.num_abandoned_calls += abandoned
        if outcome.error is not None:
            return [outcome] * len(samples)
        values = outcome.value
        if hasattr(values, "tolist"):  # a numpy array or a tensor of scores
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or len(values) != len(samples):
            got = (
                f"{len(values)} values" if isinstance(values, (list, tuple)) else type(outcome.value).__name__
            )
            error = f"batched reward returned {got} for {len(samples)} samples"
            return [CallOutcome(error=error)] * len(samples)
        return [CallOutcome(value=value) for value in values]

    def _apply(self, term: RewardTerm, sample: Sample, result: RewardResult, outcome: CallOutcome) -> None:
        error = outcome.error
        if error is None:
            try:
                value, extra = term_components(outcome.value)
            except RewardError as err:
                error = str(err)
        if error is not None:
            message = f"reward {term.label!r} ({term.function.path}) failed on sample {sample.id!r}: {error}"
            logger.warning(message)
            result.error = message if result.error is None else f"{result.error}; {message}"
            result.components[term.label] = 0.0
            result.dropped = result.dropped or term.on_error == "drop"
            return
        result.components[term.label] = value
        for key, component in extra.items():
            result.components[f"{term.label}/{key}"] = component
        result.total += term.weight * value


def term_components(value: Any) -> tuple[float, dict[str, float]]:
    """A reward's return value -> (its total, its other named components)."""
    if isinstance(value, dict):
        if "total" not in value:
            raise RewardError(f"returned a dict without a 'total' (keys: {sorted(value)})")
        components = {str(k): _number(v, f"component {k!r}") for k, v in value.items() if k != "total"}
        return _number(value["total"], "'total'"), components
    return _number(value, "the reward"), {}


def _number(value: Any, what: str) -> float:
    numpy_or_torch_bool = str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    refused = numpy_or_torch_bool or isinstance(value, bool | str | bytes)  # float() would take "1" and True
    if refused or not isinstance(value, (int, float)):
        try:
            if refused:
                raise TypeError
            value = float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            kind = "bool" if numpy_or_torch_bool else type(value).__name__
            raise RewardError(
                f"{what} is a {kind}; a reward returns a float or a dict of floats with a 'total'"
            ) from None
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{what} is {value}, not a finite number")
    return value
