"""Data parallelism over torch.distributed: the process group and FSDP2 sharding.

No home-made parallelism: ranks form a process group (gloo on CPU, nccl on GPU) and the model
is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer is one unit,
the root module (embeddings, final norm, LM head, log-prob head) another. Losses already divide
by the GLOBAL batch denominator, so gradients are SUMMED across ranks (divide factor 1).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from rlcpm.errors import TrainingError


def free_port() -> int:
    """A TCP port free on this host right now (rank 0 picks the rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_address() -> str:
    """This node's IP address as other nodes see it (rank 0's is the master address)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: a single-host run
        return "127.0.0.1"


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    """Join the learner process group (gloo on CPU, nccl when CUDA is available)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank, world_size=world_size
        )
    except Exception as err:
        raise TrainingError(
            f"learner rank {rank}/{world_size} could not join the process group at "
            f"{master_addr}:{master_port} ({backend}): {err}"
        ) from err


def destroy_process_group() -> None:
    """Leave the group; the barrier first, or gloo aborts at teardown (DESIGN.md)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def shard_model(root: nn.Module, blocks: Iterable[nn.Module]) -> nn.Module:
    """FSDP2: one shard unit per block (decoder layer), then the root; gradients summed over ranks."""
    for block in blocks:
        fully_shard(block)
    fully_shard(root)
    for module in root.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return root


def all_reduce_max(value: int) -> int:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=_comm_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 vector over ranks (for metrics)."""
    if not is_distributed():
        return values
    tensor = values.to(device=_comm_device(), dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (a single-element list outside a group)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _comm_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
