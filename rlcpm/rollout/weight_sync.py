"""Live weight updates: stream (name, tensor) pairs into the engine's model, in place.

Each tensor is checked (known name, same shape, same dtype) and copied into the existing
parameter at once, so no second copy of the model is ever held. Tied parameters answer to
every one of their names. A stream that fails part-way (a bad tensor, or any exception of the
stream itself: a lost connection, an interrupt) leaves a mix of old and new weights: the engine
is then marked inconsistent and refuses to generate until an update succeeds that is complete
(strict) or re-sends at least every tensor the failed stream touched; it never claims the new
version.

An update may also arrive in parts (a learner streaming bucket by bucket to several engines):
`begin(version)`, `load(bucket)` per part, then `finish()`. From `begin` on the engine refuses to
generate; `finish` checks that every parameter arrived and only then claims the version.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rlcpm.errors import EngineError, WeightSyncError


@dataclass
class _Staged:
    """An update arriving in parts: its version and what has arrived so far."""

    version: int
    updated: set[int] = field(default_factory=set)
    num_tensors: int = 0
    num_bytes: int = 0
    start: float = field(default_factory=time.perf_counter)


class WeightSync:
    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.version = 0
        self.failure: str | None = None
        self.failed_params: set[int] = set()  # the parameters a failed stream copied into
        self.staged: _Staged | None = None  # an update in parts, between begin and finish
        self.last_sync: dict[str, float] = {}

    def check_consistent(self) -> None:
        if self.failure is not None:
            raise EngineError(
                f"the engine's weights are a partial update ({self.failure}); "
                "call update_weights again with the complete set of tensors"
            )

    def _check(self, name: str, tensor: torch.Tensor) -> torch.nn.Parameter:
        param = self.params.get(name)
        if param is None:
            close = difflib.get_close_matches(name, list(self.params), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise WeightSyncError(f"unknown tensor {name!r}: the model has no parameter of that name{hint}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise WeightSyncError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, the model's is {tuple(param.shape)}"
            )
        if tensor.dtype != param.dtype:
            raise WeightSyncError(
                f"tensor {name!r} has dtype {tensor.dtype}, the model's is {param.dtype} (cast before sending)"
            )
        return param

    def _copy(self, named_tensors: Iterable[tuple[str, torch.Tensor]], updated: set[int]) -> tuple[int, int]:
        """Check and copy each tensor in place, adding its parameter to `updated`; (tensors, bytes)."""
        num_tensors = num_bytes = 0
        for name, tensor in named_tensors:
            param = self._check(name, tensor)
            param.copy_(tensor)
            updated.add(id(param))
            num_tensors += 1
            num_bytes += tensor.numel() * tensor.element_size()
        return num_tensors, num_bytes

    def _check_complete(self, updated: set[int]) -> None:
        missing = sorted(n for n, p in self.params.items() if id(p) not in updated)
        if missing:
            raise WeightSyncError(
                f"the update missed {len(missing)} parameter name(s), e.g. {missing[:3]}; "
                "send every parameter or pass strict=False"
            )

    def _failed(self, version: int | None, error: BaseException, updated: set[int]) -> None:
        self.failure = f"failed at version {version}: {type(error).__name__}: {error}"
        self.failed_params |= updated

    @torch.no_grad()
    def update(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int | None = None,
        strict: bool = True,
    ) -> dict[str, float]:
        """Copy every tensor in place; returns {version, num_tensors, num_bytes, seconds}."""
        _check_version(version)
        start = time.perf_counter()
        self.staged = None  # an update in parts left unfinished is superseded (its tensors are in failed_params)
        updated: set[int] = set()
        try:
            num_tensors, num_bytes = self._copy(named_tensors, updated)
            if strict:
                self._check_complete(updated)
        except BaseException as error:
            if updated:
                self._failed(version, error, updated)
            raise
        if self.failure is not None and not strict and not self.failed_params <= updated:
            raise WeightSyncError(
                f"the engine's weights are still a partial update ({self.failure}): re-send every "
                "tensor of the failed update, or send a complete one (strict=True)"
            )
        return self._commit(version, num_tensors, num_bytes, start)

    def begin(self, version: int) -> None:
        """Start an update that arrives in parts (`load`, then `finish`). Until `finish` the
        weights may be a mix of old and new: generation is refused meanwhile."""
        if version is None:
            raise WeightSyncError("an update in parts needs its version")
        _check_version(version)
        self.staged = _Staged(version)
        self.failure = f"the update to version {version} is still arriving"

    @torch.no_grad()
    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy one part of the update begun by `begin` in place."""
        staged = self.staged
        if staged is None:
            raise WeightSyncError("load() without begin(version): no update in parts is in progress")
        try:
            num_tensors, num_bytes = self._copy(named_tensors, staged.updated)
        except BaseException as error:
            self.staged = None
            self._failed(staged.version, error, staged.updated)
            raise
        finally:
            self.failed_params |= staged.updated  # a later non-strict update must re-send them
        staged.num_tensors += num_tensors
        staged.num_bytes += num_bytes

    def finish(self) -> dict[str, float]:
        """End the update begun by `begin`: every parameter must have arrived; then the engine
        holds its version and generates again. Returns the stats of `update`."""
        staged, self.staged = self.staged, None
        if staged is None:
            raise WeightSyncError("finish() without begin(version): no update in parts is in progress")
        try:
            self._check_complete(staged.updated)
        except WeightSyncError as error:
            self._failed(staged.version, error, staged.updated)
            raise
        return self._commit(staged.version, staged.num_tensors, staged.num_bytes, staged.start)

    def _commit(self, version: int | None, num_tensors: int, num_bytes: int, start: float) -> dict[str, float]:
        self.failed_params = set()
        self.version = self.version + 1 if version is None else version
        self.failure = None
        seconds = time.perf_counter() - start
        self.last_sync = {
            "version": self.version,
            "num_tensors": num_tensors,
            "num_bytes": num_bytes,
            "seconds": seconds,
        }
        return dict(self.last_sync)


def _check_version(version: int | None) -> None:
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise WeightSyncError(f"version must be an int, got {version!r}")
