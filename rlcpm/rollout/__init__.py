"""The rollout engine: continuous batching over a paged KV cache, exact sampling with
behaviour log-probs, chunk budgets, live weight updates, and a Ray actor around it.

    from rlcpm.rollout import Engine, SamplingParams
    engine = Engine.from_pretrained(path)
    outs = engine.generate(prompt_token_ids, SamplingParams(max_new_tokens=64, temperature=1.0, seed=0))

See docs/engine.md.
"""

from rlcpm.rollout.engine import Engine
from rlcpm.rollout.sampling import SamplingParams, sampling_logprobs
from rlcpm.rollout.sequence import Request, RequestOutput

__all__ = ["Engine", "Request", "RequestOutput", "RolloutWorker", "SamplingParams", "sampling_logprobs"]


def __getattr__(name: str):
    # The Ray actor imports ray; load it only when asked for.
    if name == "RolloutWorker":
        from rlcpm.rollout.worker import RolloutWorker

        return RolloutWorker
    raise AttributeError(f"module 'rlcpm.rollout' has no attribute {name!r}")
