"""Works out who this process is in a (possibly) distributed job and how it talks to the others.

One code path for 1 or N processes: `setup_topology` returns a `Topology` whose collectives are
no-ops for a single process, `torch.distributed` calls under DDP (torchrun, Azure ML
PyTorchConfiguration, or the older --dist-url/--rank/--world-size arguments) and Horovod calls
under `--distributed horovod` (horovodrun, Azure ML MpiConfiguration).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

DISTRIBUTED_CHOICES = ("auto", "ddp", "horovod", "none")
_COLLECTIVE_FAILURE = re.compile(r"gloo|nccl|timed out|connection (?:closed|reset)|broken pipe", re.IGNORECASE)


class TopologyError(RuntimeError):
    """The requested distributed mode cannot be set up from this environment."""


@dataclass
class Topology:
    kind: str  # "none" | "ddp" | "horovod"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # "nccl" | "gloo" for DDP, "horovod" for Horovod
    _hvd: Any = None

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes files, logs metrics and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind != "none"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all ranks (returns the summed tensor; single process: unchanged)."""
        if self.kind == "ddp":
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor
        if self.kind == "horovod":
            return self._hvd.allreduce(tensor, op=self._hvd.Sum)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Collect one picklable object from every rank, in rank order."""
        if self.kind == "ddp":
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, obj)
            return gathered
        if self.kind == "horovod":
            return list(self._hvd.allgather_object(obj))
        return [obj]

    @property
    def supports_channels_last(self) -> bool:
        """Horovod's collectives insist on (NCHW-)contiguous tensors; channels_last weights are not."""
        return self.kind != "horovod"

    def wrap(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The model and optimizer that train in step on every rank: DDP wraps the model (gradients
        are averaged in backward); Horovod starts every rank from rank 0's weights and optimizer
        state and averages gradients in the optimizer's step; one process trains as it is."""
        if self.kind == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids), optimizer
        if self.kind == "horovod":
            self._hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            return model, self._hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        return model, optimizer

    def is_collective_failure(self, exc: BaseException) -> bool:
        """True for the errors a collective raises when another rank stalled or died (a timeout, a
        closed connection): the run failed, but not because of anything in this rank's input."""
        if isinstance(exc, dist.DistError):
            return True
        if self.kind == "horovod":
            return type(exc).__name__ == "HorovodInternalError"
        # DDP's gradient all-reduce runs inside autograd, which re-raises the backend's error as a
        # plain RuntimeError ("[.../gloo/...] Timed out waiting 5000ms for recv operation").
        return self.kind == "ddp" and isinstance(exc, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(str(exc)))

    def close(self) -> None:
        if self.kind == "ddp" and dist.is_initialized():
            dist.destroy_process_group()
        elif self.kind == "horovod":
            self._hvd.shutdown()


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return int(value)


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _limit_cpu_threads(local_world_size: int) -> None:
    # Several ranks on one host each default to all cores and then fight over them. torchrun sets
    # OMP_NUM_THREADS=1 itself; horovodrun and plain launches do not, so share the cores out.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world_size)))


def resolve_mode(requested: str, dist_url: str | None) -> str:
    """Map `--distributed auto` onto what the environment says was launched."""
    if requested not in DISTRIBUTED_CHOICES:
        raise TopologyError(f"--distributed must be one of {DISTRIBUTED_CHOICES}, got {requested!r}")
    if requested != "auto":
        return requested
    if dist_url:
        return "ddp"
    if (_env_int("WORLD_SIZE", 1) or 1) > 1:
        return "ddp"
    if (_env_int("HOROVOD_SIZE", 1) or 1) > 1:
        return "horovod"
    return "none"


def setup_topology(
    requested: str = "auto",
    *,
    dist_backend: str | None = None,
    dist_url: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_s: float = 600.0,
) -> Topology:
    """Initialise the process group (if any) and return this process's place in it.

    `timeout_s` bounds how long joining the group and every collective wait for the other ranks:
    a rank whose peer stalled or died fails with an error instead of waiting forever (DDP: the
    process group's timeout, which NCCL enforces by aborting the communicator; Horovod: its stall
    shutdown, for a rank that stopped submitting collectives).
    """
    mode = resolve_mode(requested, dist_url)
    if mode == "none":
        topo = Topology(kind="none", device=_pick_device(0))
        _limit_cpu_threads(1)
        return topo
    if mode == "horovod":
        return _setup_horovod(timeout_s)
    return _setup_ddp(dist_backend, dist_url, rank, world_size, timeout_s)


def _setup_ddp(
    dist_backend: str | None,
    dist_url: str | None,
    rank: int | None,
    world_size: int | None,
    timeout_s: float,
) -> Topology:
    if dist_url:
        # The older Azure ML style: --dist-url $AZ_BATCHAI_PYTORCH_INIT_METHOD --rank $AZ_BATCHAI_TASK_INDEX
        if rank is None or world_size is None:
            raise TopologyError("--dist-url needs --rank and --world-size as well")
        init_method = dist_url
    else:
        rank = _env_int("RANK")
        world_size = _env_int("WORLD_SIZE")
        if rank is None or world_size is None:
            raise TopologyError(
                "DDP was requested but neither RANK/WORLD_SIZE (torchrun, Azure ML) nor "
                "--dist-url/--rank/--world-size were given; launch with "
                "`torchrun --nproc_per_node=N train.py ...` or use --distributed none"
            )
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise TopologyError(f"DDP needs {name} in the environment (torchrun sets it)")
        init_method = "env://"
    local_rank = _env_int("LOCAL_RANK")
    if local_rank is None:
        per_node = torch.cuda.device_count() if torch.cuda.is_available() else 1
        local_rank = rank % max(1, per_node)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", None) or (torch.cuda.device_count() if torch.cuda.is_available() else world_size)
    device = _pick_device(local_rank)
    backend = dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise TopologyError("the nccl backend needs CUDA GPUs; use --dist-backend gloo on CPU")
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        # Binding the group to the device up front lets NCCL connect eagerly and avoids
        # guessing the device in collectives.
        kwargs["device_id"] = device
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=_dt.timedelta(seconds=timeout_s),
        **kwargs,
    )
    if device.type == "cpu":
        _limit_cpu_threads(local_world_size)
    return Topology(
        kind="ddp",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=device,
        backend=backend,
    )


def _setup_horovod(timeout_s: float) -> Topology:
    try:
        import horovod.torch as hvd
    except ImportError as exc:  # pragma: no cover - depends on the image
        raise TopologyError("--distributed horovod needs the horovod package (built with PyTorch support)") from exc
    # Horovod reports ranks that stopped submitting collectives after HOROVOD_STALL_CHECK_TIME_SECONDS
    # (60) and, with a shutdown time set, ends the job after it; unset, it waits forever. Read by hvd.init().
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(max(61, round(timeout_s))))
    hvd.init()
    device = _pick_device(hvd.local_rank())
    if device.type == "cpu":
        _limit_cpu_threads(hvd.local_size())
    return Topology(
        kind="horovod",
        rank=hvd.rank(),
        world_size=hvd.size(),
        local_rank=hvd.local_rank(),
        local_world_size=hvd.local_size(),
        device=device,
        backend="horovod",
        _hvd=hvd,
    )
