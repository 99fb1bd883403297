"""Running under ``torchrun``: ranks from its environment, the process group, and who does what.

kdcache never launches processes itself: ``torchrun --nproc-per-node K -m kdcache ...`` (with
``--nnodes`` and a rendezvous endpoint for several machines) starts K copies of the ordinary
command, and each finds its place here from the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). Without them everything runs in one
process, exactly as before, and no process group is created.

* :func:`rank_session` opens the process group (gloo on CPU, nccl on CUDA; each rank on
  ``cuda:LOCAL_RANK``) and closes it again;
* :meth:`RankSession.on_main` runs a step on rank 0 alone (create the store, prepare the run
  folder) and hands its error, if any, to every rank, so no rank waits forever on a rank 0
  that gave up;
* each rank's share of an epoch comes from :class:`kdcache.data.loaders.EpochShardSampler`, and
  a dump's writer (a sequence store's too) from :mod:`kdcache.dump.ranks`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kdcache.data.loaders import EpochShardSampler
from kdcache.errors import ConfigError, KdcacheError
from kdcache.runtime import resolve_device
from kdcache.store.ranks.partition import SequencePlan, dump_batches, sequence_plan

T = TypeVar("T")

#: How often a waiting rank 0 looks at the barrier (and offers to renew its writer lock).
BARRIER_POLL_S = 0.05
#: How long a collective waits for a slow rank (a rank 0 creating a big store, say).
COLLECTIVE_TIMEOUT = _dt.timedelta(hours=2)


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={text!r} is not an integer; launch with torchrun, "
            "which sets it, or unset it to run in one process"
        ) from None


def rank_info() -> RankInfo:
    """This process's rank: the live process group's, else torchrun's variables, else 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        local = _env_int("LOCAL_RANK", dist.get_rank())
        return RankInfo(
            dist.get_rank(),
            dist.get_world_size(),
            local,
            _env_int("LOCAL_WORLD_SIZE", dist.get_world_size()),
        )
    world = _env_int("WORLD_SIZE", 1)
    info = RankInfo(
        _env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world)
    )
    if not 0 <= info.rank < max(world, 1):
        raise ConfigError(
            f"RANK={info.rank} must lie in [0, WORLD_SIZE={world}); launch with torchrun"
        )
    return info


def rank_device(name: str | None, info: RankInfo) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun when CUDA is used."""
    if not info.is_distributed:
        return resolve_device(name)
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if name is not None and device.index is not None:
        raise ConfigError(
            f"--device {name} pins every rank to one GPU; under torchrun pass --device cuda "
            "(each rank then uses cuda:LOCAL_RANK) or limit the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if info.local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"local rank {info.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "launch at most that many processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", info.local_rank)


class RankSession:
    """This rank's view of the job; a single process is the session of rank 0 of 1."""

    def __init__(self, info: RankInfo, device: torch.device) -> None:
        self.info = info
        self.device = device

    @classmethod
    def single(cls, device: torch.device) -> RankSession:
        """The session of a process that runs alone."""
        return cls(RankInfo(), device)

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def is_distributed(self) -> bool:
        return self.info.is_distributed

    def on_main(self, action: Callable[[], T]) -> T | None:
        """Run ``action`` on rank 0 only, then let every rank go on; rank 0's error fails all ranks.

        Returns ``action()`` on rank 0 and ``None`` elsewhere. A :class:`KdcacheError` on rank 0
        is raised again, with the same one line, on every rank.
        """
        if not self.is_distributed:
            return action()
        result, error = None, None
        if self.is_main:
            try:
                result = action()
            except KdcacheError as raised:
                error = raised
        outcome: list[KdcacheError | None] = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise outcome[0]
        return result

    def on_local_main(self, action: Callable[[], T]) -> T:
        """Run ``action`` on the local rank 0 of each machine and hand its result to the other
        ranks there; its :class:`KdcacheError` is raised again on each of them.

        torchrun numbers a machine's ranks consecutively from its local rank 0.
        """
        if not self.is_distributed:
            return action()
        offer: tuple[T | None, KdcacheError | None] = (None, None)
        if self.info.local_rank == 0:
            try:
                offer = (action(), None)
            except KdcacheError as raised:
                offer = (None, raised)
        result, error = self.all_gather(offer)[self.info.rank - self.info.local_rank]
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def barrier(self, *, while_waiting: Callable[[], None] | None = None) -> None:
        """Wait for every rank; call ``while_waiting`` now and then meanwhile (a lock refresh)."""
        if not self.is_distributed:
            return
        if while_waiting is None:
            dist.barrier()
            return
        work = dist.barrier(async_op=True)
        assert work is not None
        while not work.is_completed():
            while_waiting()
            time.sleep(BARRIER_POLL_S)
        work.wait()

    def all_sum(self, *values: float) -> tuple[float, ...]:
        """Element-wise sums of ``values`` over every rank (float64)."""
        if not self.is_distributed:
            return tuple(float(v) for v in values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tuple(tensor.cpu().tolist())

    def all_gather(self, value: T) -> list[T]:
        """``value`` of every rank, in rank order (picklable objects)."""
        if not self.is_distributed:
            return [value]
        gathered: list[T | None] = [None] * self.info.world_size
        dist.all_gather_object(gathered, value)
        return gathered  # type: ignore[return-value]

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def dump_batches(
        self, pending: np.ndarray, *, num_samples: int, chunk_rows: int, batch_size: int
    ) -> list[list[int]]:
        """:func:`dump_batches` for this rank."""
        return dump_batches(
            pending,
            num_samples=num_samples,
            chunk_rows=chunk_rows,
            batch_size=batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )

    def sequence_plan(
        self, pending: np.ndarray, *, offsets: np.ndarray, chunk_rows: int, batch_size: int
    ) -> SequencePlan:
        """:func:`sequence_plan` for this rank (a sequence store's dump)."""
        return sequence_plan(
            pending,
            offsets=offsets,
            chunk_rows=chunk_rows,
            batch_size=batch_size,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )

    def epoch_sampler(self, num_samples: int, *, seed: int) -> EpochShardSampler | None:
        """This rank's share of a seeded shuffle per epoch; ``None`` (the loader shuffles) alone."""
        if not self.is_distributed:
            return None
        return EpochShardSampler(
            num_samples, rank=self.info.rank, world_size=self.info.world_size, seed=seed
        )

    def shard_sampler(self, num_samples: int) -> EpochShardSampler | None:
        """This rank's contiguous slice of ``range(num_samples)`` (evaluation); ``None`` alone."""
        if not self.is_distributed:
            return None
        return EpochShardSampler(
            num_samples,
            rank=self.info.rank,
            world_size=self.info.world_size,
            order=lambda epoch: np.arange(num_samples),
        )

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (batch-norm statistics drift apart between ranks)."""
        if not self.is_distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def refuse_unsharded(self, used: bool, what: str) -> None:
        """Refuse, under torchrun, an option whose sampler is not yet split between ranks (each
        rank would train on every sample)."""
        if used and self.is_distributed:
            raise ConfigError(
                f"{what} is not supported under torchrun yet: every rank would train on every "
                "sample; run it in one process"
            )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """``model`` inside DistributedDataParallel when there are several ranks."""
        if not self.is_distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context in which backward passes through DDP ``model`` leave their gradients on
        this rank, to be all-reduced with a later backward's (gradient accumulation)."""
        if not self.is_distributed:
            return contextlib.nullcontext()
        return model.no_sync()  # type: ignore[operator]

    def gradient_sum(self, model: nn.Module, *, batches: int) -> GradientSum | None:
        """Where a step's ``batches`` batches are each all-reduced through DDP (an epoch's
        uneven tail, where a joined rank answers with zeros), a :class:`GradientSum` to add
        their gradients up in; None where ``param.grad`` may hold the sum."""
        if not self.is_distributed or batches < 2:
            return None
        return GradientSum(model)

    def joined(self, model: nn.Module, batches: Iterable[T]) -> Iterator[T]:
        """``batches``, letting ranks run different numbers of steps through DDP ``model``.

        An epoch of N samples rarely splits evenly: a rank that has run out of batches keeps
        answering the others' gradient all-reduces with zeros (DDP's join) until all are done,
        so no sample is repeated to even the counts out. The join then gives every rank the
        model of the last rank to finish; :meth:`align_optimizer` does the same for the
        optimizer's state.
        """
        if not self.is_distributed:
            yield from batches
            return
        from torch.distributed.algorithms.join import Join

        with Join([model]):  # type: ignore[list-item]
            yield from batches

    def share_tensors(self, tensors: Iterable[torch.Tensor], *, src: int) -> None:
        """Give every rank rank ``src``'s values of ``tensors`` (alike in shape on every rank)."""
        if not self.is_distributed:
            return
        device = self._collective_device()
        for tensor in tensors:
            moved = tensor.to(device)
            dist.broadcast(moved, src=src)
            tensor.copy_(moved)

    def align_optimizer(
        self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *, src: int
    ) -> None:
        """Give every rank rank ``src``'s optimizer and loss-scaler state.

        A rank that ran out of batches before the others (:meth:`joined`) took fewer optimizer
        steps: without this its Adam moments (and step count) would lag from then on, and the
        replicas would drift apart within every later epoch.
        """
        if not self.is_distributed:
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        layouts = self.all_gather([_state_layout(optimizer.state[p]) for p in parameters])
        if any(layout != layouts[src] for layout in layouts):
            # A rank whose state differs in shape (one that never took a step, say): the whole
            # state, as one object.
            whole = [optimizer.state_dict()]
            dist.broadcast_object_list(whole, src=src)
            optimizer.load_state_dict(whole[0])
        else:
            device = self._collective_device()
            for parameter in parameters:
                state = optimizer.state[parameter]
                for name in sorted(state):
                    value = state[name]
                    if isinstance(value, torch.Tensor):
                        moved = value.to(device)
                        dist.broadcast(moved, src=src)
                        value.copy_(moved)
                    else:
                        shared = [value]
                        dist.broadcast_object_list(shared, src=src)
                        state[name] = shared[0]
        if scaler.is_enabled():
            scaler_state = [scaler.state_dict()]
            dist.broadcast_object_list(scaler_state, src=src)
            scaler.load_state_dict(scaler_state[0])


def _state_layout(state: dict[str, Any]) -> list[tuple[str, tuple[int, ...] | None]]:
    """The names of a parameter's optimizer state, with the shape of each tensor among them."""
    return [
        (name, tuple(value.shape) if isinstance(value, torch.Tensor) else None)
        for name, value in sorted(state.items())
    ]


class GradientSum:
    """One step's gradients, batch by batch, added up outside ``param.grad``.

    DDP all-reduces the whole of ``param.grad`` at each synchronised backward, and divides by
    the number of ranks. While every rank takes part, the part already reduced is the same on
    all of them and comes out unchanged; once a rank has joined (answering with zeros) it would
    be divided again. Taking each batch's reduced gradient aside before the next backward
    keeps every batch's share as the other ranks see it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.sums: dict[nn.Parameter, torch.Tensor] = {}

    def set_aside(self) -> None:
        """Add the gradients of the backward passes so far to the sum, leaving none behind."""
        for parameter in self.parameters:
            if parameter.grad is None:
                continue
            kept = self.sums.get(parameter)
            self.sums[parameter] = parameter.grad if kept is None else kept + parameter.grad
            parameter.grad = None

    def put_back(self) -> None:
        """Leave the step's whole gradient in ``param.grad``, for clipping and the optimizer."""
        self.set_aside()
        for parameter, total in self.sums.items():
            parameter.grad = total
        self.sums = {}


@contextmanager
def rank_session(device: str | None) -> Iterator[RankSession]:
    """This process's :class:`RankSession`, with a process group while several ranks run.

    A process group someone else created (a user's own torchrun script) is used and left open.
    """
    info = rank_info()
    session = RankSession(info, rank_device(device, info))
    if not info.is_distributed or dist.is_initialized():
        yield session
        return
    if session.device.type == "cuda":
        torch.cuda.set_device(session.device)
    backend = "nccl" if session.device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(
            f"cannot join the torchrun job as rank {info.rank} of {info.world_size} ({error}); "
            "launch with torchrun (it sets MASTER_ADDR and MASTER_PORT)"
        ) from None
    try:
        yield session
    finally:
        dist.destroy_process_group()
