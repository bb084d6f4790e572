"""Live weight updates: stream (name, tensor) pairs into the engine's model, in place.

Each tensor is checked (known name, same shape, same dtype) and copied into the existing
parameter at once, so no second copy of the model is ever held. Tied parameters answer to
every one of their names. A stream that fails part-way (a bad tensor, or any exception of the
stream itself: a lost connection, an interrupt) leaves a mix of old and new weights: the engine
is then marked inconsistent and refuses to generate until an update succeeds that is complete
(strict) or re-sends at least every tensor the failed stream touched; it never claims the new
version.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable

import torch

from rlcpm.errors import EngineError, WeightSyncError


class WeightSync:
    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.version = 0
        self.failure: str | None = None
        self.failed_params: set[int] = set()  # the parameters a failed stream copied into
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

    @torch.no_grad()
    def update(
        self,
        named_tensors: Iterable[tuple[str, torch.Tensor]],
        version: int | None = None,
        strict: bool = True,
    ) -> dict[str, float]:
        """Copy every tensor in place; returns {version, num_tensors, num_bytes, seconds}."""
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise WeightSyncError(f"version must be an int, got {version!r}")
        start = time.perf_counter()
        updated: set[int] = set()
        num_tensors = num_bytes = 0
        try:
            for name, tensor in named_tensors:
                param = self._check(name, tensor)
                param.copy_(tensor)
                updated.add(id(param))
                num_tensors += 1
                num_bytes += tensor.numel() * tensor.element_size()
            if strict:
                missing = sorted(n for n, p in self.params.items() if id(p) not in updated)
                if missing:
                    raise WeightSyncError(
                        f"the update missed {len(missing)} parameter name(s), e.g. {missing[:3]}; "
                        "send every parameter or pass strict=False"
                    )
        except BaseException as error:
            if num_tensors:
                self.failure = f"failed at version {version}: {type(error).__name__}: {error}"
                self.failed_params |= updated
            raise
        if self.failure is not None and not strict and not self.failed_params <= updated:
            raise WeightSyncError(
                f"the engine's weights are still a partial update ({self.failure}): re-send every "
                "tensor of the failed update, or send a complete one (strict=True)"
            )
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
