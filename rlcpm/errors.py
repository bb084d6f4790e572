"""One error family for rlcpm. Every error says what is wrong and what to do about it."""

from __future__ import annotations


class RlcpmError(Exception):
    """Base class of every error rlcpm raises on purpose."""


class RecipeError(RlcpmError):
    """A recipe (YAML + overrides) is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")


class DataError(RlcpmError):
    """A dataset file or row is malformed (the message names the file and the row)."""


class CheckpointError(RlcpmError):
    """A model or training checkpoint is missing, incomplete or inconsistent."""


class UnsupportedModelError(CheckpointError):
    """The checkpoint's model_type is not one rlcpm implements."""


class EngineError(RlcpmError):
    """The rollout engine refused a request or a weight update."""


class RequestError(EngineError):
    """One generation request is invalid (empty prompt, too long, bad sampling params)."""


class WeightSyncError(EngineError):
    """A weight update did not match the model (name, shape or dtype)."""


class RewardError(RlcpmError):
    """A reward function is unknown, misconfigured, or failed on a sample."""


class SandboxError(RlcpmError):
    """The code sandbox could not be set up (not: a candidate program failed)."""


class TrainingError(RlcpmError):
    """The training loop cannot continue (diverged loss, lost workers, bad resume state)."""
