"""rlcpm: reinforcement-learning post-training for language models.

Public API (see README and docs/): load_recipe, train, reward, Sample, and the subpackages
rlcpm.models, rlcpm.rollout, rlcpm.rewards, rlcpm.learner, rlcpm.kernels, rlcpm.data.
"""

from rlcpm.config import Recipe, load_recipe
from rlcpm.errors import RlcpmError
from rlcpm.rewards import Sample, reward
from rlcpm.trainer import TrainResult, train

__version__ = "0.1.0"

__all__ = ["Recipe", "RlcpmError", "Sample", "TrainResult", "__version__", "load_recipe", "reward", "train"]
