"""rlcpm: reinforcement-learning post-training for language models.

Public API (see README and docs/): load_recipe, train, reward, Sample, and the subpackages
rlcpm.models, rlcpm.rollout, rlcpm.rewards, rlcpm.learner, rlcpm.kernels, rlcpm.data.
"""

from rlcpm.config import Recipe, load_recipe
from rlcpm.errors import RlcpmError
from rlcpm.rewards import Sample, reward
from rlcpm.trainer import TrainResult, train

__version__ = "0.1.0"

# `import rlcpm` then `rlcpm.rollout.Engine`, `rlcpm.models.load_model`: the subpackages load on
# first attribute access, so importing rlcpm stays light.
_SUBPACKAGES = frozenset({"data", "kernels", "learner", "models", "quant", "rewards", "rollout", "trainer"})


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"rlcpm.{name}")
    raise AttributeError(f"module 'rlcpm' has no attribute {name!r}")


__all__ = ["Recipe", "RlcpmError", "Sample", "TrainResult", "__version__", "load_recipe", "reward", "train"]
