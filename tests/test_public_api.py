"""Every public name of DESIGN.md's API section resolves from where the docs say it lives."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import rlcpm


def test_top_level_api():
    for name in ("load_recipe", "train", "reward", "Sample", "RlcpmError", "__version__"):
        assert hasattr(rlcpm, name), name
    assert list(inspect.signature(rlcpm.train).parameters)[:1] == ["recipe"]


def test_subpackages_resolve_as_attributes():
    # docs/qat.md: `rlcpm.rollout.Engine.from_pretrained(...)` after a bare `import rlcpm`
    for name in ("data", "kernels", "learner", "models", "quant", "rewards", "rollout", "trainer"):
        assert inspect.ismodule(getattr(rlcpm, name)), name
    assert hasattr(rlcpm.rollout, "Engine") and hasattr(rlcpm.models, "load_model")
    assert not hasattr(rlcpm, "no_such_subpackage")


def test_subpackage_api():
    from rlcpm.learner.losses import policy_loss
    from rlcpm.models import load_model, save_model
    from rlcpm.rewards import code, math, tool_use
    from rlcpm.rollout import Engine, SamplingParams

    assert callable(load_model) and callable(save_model) and callable(policy_loss)
    assert callable(math.score) and callable(code.score) and callable(tool_use.score)
    assert hasattr(Engine, "from_pretrained") and hasattr(Engine, "generate")
    keywords = set(inspect.signature(policy_loss).parameters)
    assert {"eps_low", "eps_high", "dual_clip", "agg", "ref_logprobs", "kl_coef", "kl_estimator"} <= keywords
    params = SamplingParams(
        max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=-1, seed=0, stop_token_ids=[], ignore_eos=False
    )
    assert params.max_new_tokens == 4


def test_extras_offer_no_vllm_backend():
    """`pip install rlcpm[vllm]` pulled in vLLM (and the torch build it pins) for nothing:
    rollout.engine accepts `rlcpm` only (docs/scaling.md)."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "vllm" not in pyproject["project"]["optional-dependencies"]
