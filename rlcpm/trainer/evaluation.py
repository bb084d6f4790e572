"""Held-out accuracy on the rollout workers: at the rollout temperature (seeded) and greedy."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rlcpm.config import Recipe
from rlcpm.errors import TrainingError
from rlcpm.rollout import SamplingParams
from rlcpm.trainer.scoring import reward_metrics

log = logging.getLogger("rlcpm.trainer")


def eval_sampling_params(recipe: Recipe, temperature: float, num_prompts: int) -> list[SamplingParams]:
    """The rollout's sampling settings at an evaluation temperature (0: greedy, no filters), one
    per prompt, each with its own seed (a shared seed would draw every prompt's tokens with the
    same uniforms)."""
    rollout = recipe.rollout
    return [
        SamplingParams(
            max_new_tokens=rollout.max_new_tokens,
            temperature=temperature,
            top_p=rollout.top_p if temperature > 0 else 1.0,
            top_k=rollout.top_k if temperature > 0 else -1,
            seed=recipe.seed * 7919 + i,
            stop=list(rollout.stop),
            stop_token_ids=list(rollout.stop_token_ids),
        )
        for i in range(num_prompts)
    ]


def check_not_refused(outputs: Sequence) -> Sequence:
    """The engine's outputs, unless it refused a request (TrainingError): the empty outputs of
    refused requests must never be scored as wrong answers."""
    aborted = [out for out in outputs if out.finish_reason == "aborted"]
    if aborted:
        raise TrainingError(
            f"evaluation: the engine refused {len(aborted)} of {len(outputs)} requests: {aborted[0].error}"
        )
    return outputs


def evaluate(
    recipe: Recipe, rollout_pool, reward_pool, examples: Sequence, tokenize, decode
) -> dict[str, float]:
    """`eval/accuracy` (one seeded sample per prompt at the eval temperature) and
    `eval/greedy_accuracy`, plus the reward means, on the first `eval.num_prompts` examples."""
    from rlcpm.rewards import Sample

    examples = list(examples)[: recipe.eval.num_prompts]
    if not examples:
        return {}
    prompts = [tokenize(ex) for ex in examples]
    temperature = (
        recipe.eval.temperature if recipe.eval.temperature is not None else recipe.rollout.temperature
    )
    modes = {"eval": temperature}
    if recipe.eval.greedy:
        modes["eval/greedy"] = 0.0
    labels = [term.label for term in reward_pool.terms]
    metrics: dict[str, float] = {}
    for prefix, temp in modes.items():
        params = eval_sampling_params(recipe, temp, len(examples))
        outputs = check_not_refused(rollout_pool.generate_plain(prompts, params))
        samples = [
            Sample(
                id=ex.id,
                prompt=ex.prompt,
                response=decode(out.token_ids),
                messages=ex.messages,
                prompt_token_ids=prompt,
                response_token_ids=list(out.token_ids),
                answer=ex.answer,
                fields=dict(ex.fields),
                finish_reason=out.finish_reason,
            )
            for ex, prompt, out in zip(examples, prompts, outputs)
        ]
        results = reward_pool.score(samples)
        found = reward_metrics(results, labels, prefix=prefix)
        if f"{prefix}/accuracy" in found:
            metrics[f"{prefix}/accuracy"] = found[f"{prefix}/accuracy"]
            metrics[f"{prefix}/reward_mean"] = found[f"{prefix}/total_mean"]
        else:  # nothing to average: a reward with on_error: drop failed on every sample
            log.warning("%s: every one of %d samples was dropped by the rewards: no accuracy", prefix, len(results))
        metrics[f"{prefix}/response_len_mean"] = sum(len(o.token_ids) for o in outputs) / len(outputs)
    return metrics
