"""Training on several processes and machines: `torchrun --nproc_per_node N -m exemplar train CONFIG`.

torchrun starts one process per GPU (or per CPU worker) with RANK, WORLD_SIZE and LOCAL_RANK set;
`init_distributed` joins the process group (NCCL on GPUs, Gloo on CPU), and the training loop asks
`current_world()` where it stands. Without torchrun (or with one rank) nothing here runs and the
single-process path is untouched.

What makes N ranks train exactly like one process:

- every rank builds the same plan (batching.TrainPlan with world_size=N); a step holds
  micro_batch_size x grad_accum x N sequences and rank r takes its contiguous share of it;
- the step's trained-token count is all-reduced before backward, so each rank divides its summed
  loss by the GLOBAL count, and gradients are SUMMED across ranks (FSDP2 with a divide factor of
  1, DDP with a summing comm hook): the gradient is the one-process gradient;
- every rank runs the same number of forward/backward passes (the busiest rank's count): a rank
  with fewer rows runs zero-weight filler micro-batches, or the collectives would hang.

Wrapping (`wrap_for_training`): FSDP2 (`fully_shard`) shards parameters, gradients and AdamW state;
each decoder block is its own unit and the loss module (embeddings, final norm, output layer, so
tied weights stay in one unit) is the root. DDP wraps the loss module, since it calls the decoder
and the head itself.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from exemplar.config import TrainConfig
from exemplar.errors import ConfigError, ExemplarError
from exemplar.model.lora import is_quantized

log = logging.getLogger(__name__)

# Data preparation runs on rank 0 while the others wait: far longer than a collective's timeout.
DATA_STAGE_TIMEOUT = datetime.timedelta(hours=24)


# ---------------------------------------------------------------------------------------------
# Where this process stands


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "nccl", "gloo", or None without a process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: this rank's GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = World()


def launched_world_size() -> int:
    """Ranks torchrun started (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def current_world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=str(dist.get_backend()),
        )
    return SINGLE


def init_distributed(train: TrainConfig | None = None) -> tuple[World, bool]:
    """Join the process group torchrun prepared; return (world, whether this call created it).

    A no-op outside torchrun or with a single rank. On CUDA machines each rank takes the GPU of its
    LOCAL_RANK and talks NCCL; on CPU, Gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return current_world(), False
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE, False
    if train is not None:  # refuse a strategy that cannot run before joining the group
        resolve_strategy(train, World(world_size=world_size))
    if not dist.is_available():
        raise ExemplarError(
            "this PyTorch build has no torch.distributed: multi-process training is unavailable"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ExemplarError(
                f"LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} GPUs: "
                "start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    return current_world(), True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(train: TrainConfig, world: World) -> str:
    """How `world`'s ranks train: 'none' for one process; else 'fsdp2' or 'ddp' (auto: fsdp2, ddp
    for QLoRA's 4-bit weights). The training loop resolves it once and hands it to the wrapping.

    Raises ConfigError for settings that cannot run on `world` (and warns for ignored ones).
    """
    if not world.distributed:
        strategy = "none"
    elif train.distributed == "none":
        raise ConfigError(
            f"train.distributed is 'none' but torchrun started {world.world_size} ranks: "
            "set train.distributed to auto, fsdp2 or ddp, or launch one process"
        )
    elif train.distributed == "auto":
        strategy = "ddp" if train.method == "qlora" else "fsdp2"
    else:
        strategy = train.distributed
    _check_offload(train, strategy)
    return strategy


def _check_offload(train: TrainConfig, strategy: str) -> None:
    if not train.cpu_offload_optimizer or strategy == "fsdp2":
        return
    if strategy == "none":
        log.warning("train.cpu_offload_optimizer applies to FSDP2 on several ranks: ignored in one process")
    else:
        raise ConfigError(
            "train.cpu_offload_optimizer offloads FSDP2's sharded optimizer state: it needs several "
            "ranks (torchrun) with train.distributed fsdp2 or auto"
        )


# ---------------------------------------------------------------------------------------------
# Small collectives


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], world: World) -> list[float]:
    """Element-wise sums over ranks, in float64 (exact for token counts below 2**53)."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_in_stages(world: World, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 first, then on each machine's local rank 0, then everywhere else.

    For work that fills a cache (the data pipeline): rank 0 writes it alone, and the others find it
    (on a shared filesystem) or, on a machine that does not share it, one process per machine
    writes it before that machine's other ranks read it. Never two writers of the same cache.
    """
    if not world.distributed:
        return fn()
    group = dist.new_group(backend="gloo", timeout=DATA_STAGE_TIMEOUT)
    stage = 0 if world.rank == 0 else (1 if world.local_rank == 0 else 2)
    result = None
    for s in range(3):
        if stage == s:
            result = fn()
        dist.barrier(group=group)
    dist.destroy_process_group(group)
    return result


def check_same_everywhere(value: Any, world: World, what: str) -> None:
    """Raise on every rank when `value` (picklable) differs from rank 0's."""
    if not world.distributed:
        return
    reference = broadcast_object(value, world)
    differs = all_reduce_sum([float(value != reference)], world)[0]
    if differs:
        raise ExemplarError(
            f"the ranks disagree on {what} (rank {world.rank}: {value!r}, rank 0: {reference!r})"
        )


def check_same_weights(model: nn.Module, world: World) -> None:
    """Raise when ranks start from different weights (FSDP2 keeps each rank's own shard of its copy).

    Compares one float64 sum per floating-point parameter: max and min over ranks must agree.
    """
    if not world.distributed:
        return
    names, sums = [], []
    for name, p in model.named_parameters():
        if p.is_floating_point():
            names.append(name)
            sums.append(p.detach().sum(dtype=torch.float64))  # no float64 copy of the weights
    if not sums:
        return
    local = torch.stack(sums).to(world.device)
    high, low = local.clone(), local.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    bad = torch.nonzero(high != low).flatten().tolist()
    if bad:
        raise ExemplarError(
            f"the ranks hold different initial weights (first: {names[bad[0]]}); every rank must load "
            "the same model (same files, same seed)"
        )


# ---------------------------------------------------------------------------------------------
# What train_step needs across ranks


class RankSync:
    """Cross-rank pieces of one optimizer step: the token count, gradient accumulation, clipping."""

    def __init__(self, world: World, strategy: str, ddp: nn.Module | None = None):
        self.world, self.strategy, self.ddp = world, strategy, ddp

    def count(self, n: int) -> int:
        """The step's trained tokens over all ranks (before backward: it is the loss's denominator)."""
        return int(all_reduce_sum([n], self.world)[0])

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Context for a micro-batch that is not the step's last: DDP skips its all-reduce."""
        if self.ddp is not None:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def totals(self, loss: torch.Tensor | float, tokens: int) -> tuple[float, int]:
        """(loss, tokens) of the whole step: each rank's loss is already divided by the global count."""
        if not self.world.distributed:
            return float(loss), tokens
        device = self.world.device
        value = loss.detach() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        t = torch.stack(
            [value.to(device, torch.float64), torch.tensor(float(tokens), dtype=torch.float64, device=device)]
        )
        dist.all_reduce(t)
        return float(t[0]), int(t[1])

    def clip(self, params: list[torch.Tensor], max_norm: float | None) -> float:
        """The global gradient norm (before clipping); grads are scaled when it exceeds `max_norm`."""
        if self.strategy != "fsdp2":
            return clip_local(params, max_norm)  # DDP: every rank holds the same, full gradients
        return clip_sharded(params, max_norm, self.world)


def clip_local(params: list[torch.Tensor], max_norm: float | None) -> float:
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def clip_sharded(params: list[torch.Tensor], max_norm: float | None, world: World) -> float:
    """Norm and clipping over FSDP2 gradients (DTensors sharded on a 1-D mesh, possibly in CPU RAM).

    Each rank takes the squared norm of its local shards; one all-reduce gives the global norm.
    Written out (rather than `clip_grad_norm_` on DTensors) so that CPU-offloaded shards on a GPU
    mesh work too.
    """
    from torch.distributed.tensor import DTensor

    local_grads, replicated = [], []
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            if all(pl.is_shard() for pl in g.placements):
                local_grads.append(g.to_local())
            else:
                replicated.append(g.to_local())
        else:
            replicated.append(g)
    square = torch.zeros((), dtype=torch.float64, device=world.device)
    if local_grads:
        square = square + _squared_norm(local_grads).to(world.device)
    if world.rank == 0 and replicated:  # the same on every rank: count it once
        square = square + _squared_norm(replicated).to(world.device)
    dist.all_reduce(square)
    total = math.sqrt(float(square))
    if max_norm is not None and math.isfinite(total):  # non-finite: the step is skipped anyway
        coef = max_norm / (total + 1e-6)
        if coef < 1.0:
            for g in local_grads + replicated:
                g.mul_(coef)
    return total


def _squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32).double() for t in tensors if t.numel()]
    if not norms:
        return torch.zeros((), dtype=torch.float64)
    devices = {n.device for n in norms}
    target = next(iter(devices))
    return torch.stack([n.to(target) for n in norms]).pow(2).sum().cpu()


# ---------------------------------------------------------------------------------------------
# Wrapping


@dataclass
class Wrapped:
    forward: nn.Module  # what train_step calls (the FSDP2 root, or the DDP wrapper)
    evaluator: nn.Module  # what evaluation calls (every rank, same number of times)
    sync: RankSync  # carries the strategy


def wrap_for_training(
    loss_fn: nn.Module, strategy: str, train: TrainConfig, world: World, device: torch.device, bf16: bool
) -> Wrapped:
    """Wrap the loss module (an `LMLoss`) for `world`'s ranks with FSDP2 or DDP (`strategy`, from
    `resolve_strategy`).

    Call after the model is on its device and gradient checkpointing is set, and build the
    optimizer afterwards (FSDP2 replaces the parameters with sharded ones).
    """
    if strategy == "fsdp2":
        shard_model(loss_fn, train, world, device, bf16)
        return Wrapped(loss_fn, loss_fn, RankSync(world, strategy))
    if strategy == "ddp":
        ddp = _ddp(loss_fn, device)
        return Wrapped(ddp, loss_fn, RankSync(world, strategy, ddp))
    raise ConfigError(f"unknown train.distributed strategy: {strategy}")


def shard_model(
    loss_fn: nn.Module, train: TrainConfig, world: World, device: torch.device, bf16: bool
) -> None:
    """FSDP2: each decoder block one unit, the loss module (embeddings, norm, head) the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (world.world_size,))
    mp_policy = MixedPrecisionPolicy()
    if bf16 and device.type == "cuda":
        # bf16 compute and all-gathers, fp32 gradient reduction and fp32 master weights.
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload: OffloadPolicy = OffloadPolicy()
    if train.cpu_offload_optimizer:
        if device.type == "cuda":
            offload = CPUOffloadPolicy()
        else:
            log.warning("train.cpu_offload_optimizer has no effect when training on the CPU")
    # QLoRA: the frozen 4-bit weights stay whole on every rank (bitsandbytes packs them itself);
    # only the trainable adapter is sharded.
    ignored = {p for p in loss_fn.parameters() if not p.requires_grad} if is_quantized(loss_fn) else None
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy, "offload_policy": offload}
    if ignored:
        kwargs["ignored_params"] = ignored
    for block in reversed(decoder_blocks(loss_fn)):  # innermost first
        fully_shard(block, **kwargs)
    fully_shard(loss_fn, **kwargs)
    for module in loss_fn.modules():
        if isinstance(module, FSDPModule):
            # Sum (not average) gradients over ranks: each rank's loss is already divided by the
            # global token count. Plain SUM collectives also work on Gloo (no PREMUL_SUM there).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def decoder_blocks(loss_fn: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, by the model's `_no_split_modules` class names.

    Falls back to the children of the longest `nn.ModuleList` for models that do not name them.
    """
    from exemplar.model.lora import unwrap_peft

    model = getattr(loss_fn, "model", loss_fn)
    names = set(getattr(unwrap_peft(model), "_no_split_modules", None) or ())
    blocks = [m for m in loss_fn.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in loss_fn.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _ddp(loss_fn: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in loss_fn.named_parameters() if not p.requires_grad]
    if frozen:
        # Frozen weights were loaded identically on every rank (checked): no need to broadcast them.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_fn, frozen)
    kwargs: dict[str, Any] = {"gradient_as_bucket_view": True}
    if device.type == "cuda":
        kwargs["device_ids"] = [device.index if device.index is not None else torch.cuda.current_device()]
    # Buffers (rotary tables) are identical on every rank: no per-forward broadcast.
    if "forward_sync_buffers" in DistributedDataParallel.__init__.__code__.co_varnames:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    ddp = DistributedDataParallel(loss_fn, **kwargs)
    ddp.register_comm_hook(state=None, hook=_sum_hook)
    return ddp


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and ours are strings
    """DDP comm hook: SUM gradients over ranks (DDP's default averages them)."""
    group = state if state is not None else dist.group.WORLD
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
