"""The training loop: plain PyTorch, one optimizer step readable top to bottom (`train_step`).

run_training
  -> plan the batches (batching.TrainPlan: deterministic, resumable from a step number)
  -> for each optimizer step: fetch its micro-batches, forward/backward each with the loss divided
     by the trained tokens of the WHOLE step, clip, AdamW step
  -> log, evaluate, checkpoint, summarize.

Under torchrun with several ranks (see distributed.py) the same loop runs on every rank: each
takes its share of every step, the token count is all-reduced before backward, the model is
wrapped with FSDP2 or DDP, checkpoints are sharded, and only rank 0 logs and writes metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exemplar.config import Config, TrainConfig
from exemplar.errors import ExemplarError
from exemplar.evaluate import likelihood
from exemplar.model.lora import is_quantized
from exemplar.model.special_ids import pad_token_id
from exemplar.train import distributed as dist_utils
from exemplar.train.attention import needs_flat_batches
from exemplar.train.batch import Batch, BatchLoader
from exemplar.train.batching import TrainPlan, checked_lengths
from exemplar.train.checkpoint import (
    config_hash,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_stale,
    save_checkpoint,
)
from exemplar.train.loss import LMLoss
from exemplar.train.metrics import MetricsLogger, peak_memory
from exemplar.train.precision import autocast_factory
from exemplar.train.run_guard import StopRequests, TrainingInterrupted, output_dir_lock
from exemplar.train.schedule import build_optimizer, lr_at, schedule_state, set_lr

log = logging.getLogger(__name__)

# callback(event, payload), event one of "step_end", "eval", "checkpoint", "end".
Callback = Callable[[str, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepResult:
    loss: float  # sum of token CE / trained tokens of the step: what was backpropagated
    grad_norm: float  # before clipping
    num_tokens: int
    num_trained: int
    skipped: bool  # no trained token, or a non-finite loss or gradient: the weights were left unchanged
    nonfinite: bool = False  # the loss or the gradient norm was NaN or infinite


def train_step(
    loss_fn: LMLoss,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    *,
    max_grad_norm: float | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    fillers: Sequence[Batch] = (),
    sync: dist_utils.RankSync | None = None,
) -> StepResult:
    """Forward/backward every micro-batch of one step, then clip and update.

    Every micro-batch's summed loss is divided by the trained tokens of the whole step (on every
    rank, once `sync` all-reduces the count), so the gradient is the mean over the step's tokens
    whatever the micro-batch size, accumulation, or number of ranks.

    With several ranks, `sync` all-reduces the count, the reported loss and tokens, and takes the
    global gradient norm; `fillers` are run with weight 0 after the real micro-batches, so that
    every rank runs as many passes as the busiest one.
    """
    num_trained = sum(b.num_trained for b in micro_batches)
    if sync is not None:
        num_trained = sync.count(num_trained)
    denominator = max(num_trained, 1)

    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    work = [(b, True) for b in micro_batches] + [(b, False) for b in fillers]
    for i, (batch, real) in enumerate(work):
        last = i == len(work) - 1
        with contextlib.nullcontext() if last or sync is None else sync.accumulate():
            with autocast():
                sums = loss_fn(batch)
            loss = sums.loss_sum / denominator
            if not real:  # runs the collectives of a pass, contributes nothing
                loss = loss * 0.0
            loss.backward()
        if real:
            total = total + loss.detach().float()  # stays on the device: one sync per step, below

    num_tokens = sum(b.num_tokens for b in micro_batches)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if sync is not None:
        loss_value, num_tokens = sync.totals(total, num_tokens)
        grad_norm = sync.clip(params, max_grad_norm)
    else:
        loss_value = float(total)
        grad_norm = dist_utils.clip_local(params, max_grad_norm)
    nonfinite = not (math.isfinite(grad_norm) and math.isfinite(loss_value))
    skipped = num_trained == 0 or nonfinite
    if not skipped:
        optimizer.step()
    return StepResult(loss_value, grad_norm, num_tokens, num_trained, skipped, nonfinite)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class RunState:
    """Running totals, saved in every checkpoint so a resumed run continues them."""

    step: int = 0  # optimizer steps done
    tokens: int = 0
    trained_tokens: int = 0
    train_wall_s: float = 0.0
    last_loss: float | None = None
    skipped_steps: int = 0
    nonfinite_steps: int = 0  # steps skipped for a NaN/inf loss or gradient
    nonfinite_in_a_row: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_eval: dict[str, float] | None = None
    last_eval_step: int | None = None
    last_checkpoint_step: int | None = None


def run_training(
    config: Config,
    model: nn.Module,
    tokenizer: Any,
    train_ds,
    eval_ds=None,
    resume: bool = False,
    callbacks: list[Callback] | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` on the tokenized `train_ds` (columns input_ids, labels) and return the summary.

    Writes OUTPUT/metrics.jsonl and OUTPUT/checkpoints/step-N/; the summary is returned (`finetune`
    writes it to OUTPUT/train_summary.json, with the exported outputs).
    With `resume`, continues from the newest complete checkpoint in OUTPUT (if there is one);
    without it, refuses an OUTPUT that already holds checkpoints. `callbacks` are called as
    callback(event, payload) for the events "step_end", "eval", "checkpoint" and "end". `progress`
    shows the tqdm bar. The model is left trained, in eval mode.

    Under torchrun with several ranks every rank calls this with the same arguments; the model is
    then left wrapped (FSDP2: sharded; `exemplar.model.export.model_for_export` gathers it).
    Only rank 0 writes metrics and the progress bar; callbacks run on every rank.

    One run at a time per output folder (a second one refuses: `OutputDirBusy`). SIGINT and SIGTERM
    stop after the current step with a checkpoint (`TrainingInterrupted`, which says how to
    resume); a second signal stops at once. A step whose loss or gradient is NaN or infinite is
    skipped and counted; `train.max_nonfinite_in_a_row` of them in a row stop the run, and weights
    that are not finite are never written.
    """
    world = dist_utils.current_world()
    # Rank 0 holds the lock for the job (the other ranks share its folder).
    lock = output_dir_lock(config.output_dir) if world.is_main else contextlib.nullcontext()
    with lock, StopRequests() as stop:
        return _run_training(config, model, tokenizer, train_ds, eval_ds, resume, callbacks, progress, stop)


def _run_training(config, model, tokenizer, train_ds, eval_ds, resume, callbacks, progress, stop):
    train = config.train
    output_dir = Path(config.output_dir)
    ckpt_root = output_dir / "checkpoints"
    callbacks = list(callbacks or [])
    world = dist_utils.current_world()
    if not world.distributed and dist_utils.launched_world_size() > 1:
        raise ExemplarError(
            f"torchrun started {dist_utils.launched_world_size()} ranks but torch.distributed is not "
            "initialized: call exemplar.train.distributed.init_distributed() first (finetune does)"
        )
    strategy = dist_utils.resolve_strategy(train, world)  # the one decision: none, fsdp2 or ddp
    # Rank 0 draws the stream one process would; other ranks their own (dropout masks must differ
    # between ranks). The data order does not depend on it: it is seeded by (seed, epoch).
    seed_everything(train.seed + world.rank)
    device = _place(model)
    flat = needs_flat_batches(model)

    lengths = checked_lengths(train_ds, config.max_length)
    plan = _plan(config, lengths, shuffle=config.data.shuffle, world_size=world.world_size)
    total_steps = plan.total_steps(train.epochs, train.max_steps)
    load = BatchLoader(train_ds, config.packing, pad_token_id(tokenizer), device, flat)
    eval_batches = None
    if eval_ds:
        eval_batches = likelihood.eval_batches(
            eval_ds,
            max_length=config.max_length,
            packing=config.packing,
            micro_batch_size=train.micro_batch_size,
            max_tokens_per_batch=train.max_tokens_per_batch,
            seed=train.seed,
            pad_id=pad_token_id(tokenizer),
            device=device,
            flat=flat,
            world=world,
        )
    fingerprint = _fingerprint(plan)
    dist_utils.check_same_everywhere(fingerprint, world, "the training data")

    loss_fn = LMLoss(model, train.loss_chunk_size)
    loss_fn.check_head()
    if train.gradient_checkpointing:
        _enable_checkpointing(model)
    autocast = autocast_factory(train.precision, device)
    forward, evaluator, sync = loss_fn, loss_fn, None
    if strategy != "none":
        dist_utils.check_same_weights(model, world)
        bf16 = autocast is not contextlib.nullcontext
        wrapped = dist_utils.wrap_for_training(loss_fn, strategy, train, world, device, bf16)
        forward, evaluator, sync = wrapped.forward, wrapped.evaluator, wrapped.sync
    optimizer = build_optimizer(model, train)  # after wrapping: FSDP2 replaces the parameters
    schedule = schedule_state(train, total_steps)

    state, resumed_from = RunState(), None
    # Rank 0's view of the folder decides for every rank.
    latest = dist_utils.broadcast_object(latest_checkpoint(ckpt_root), world)
    if not resume and latest is not None:
        raise ExemplarError(
            f"{output_dir} already holds checkpoints of a run: resume it, or choose another output_dir"
        )
    if resume and latest is not None:
        state = _resume(latest, model, optimizer, config, fingerprint, plan, world)
        resumed_from = str(latest)
        log.info("resumed from %s (step %d of %d)", latest, state.step, total_steps)
    if world.is_main:
        remove_stale(ckpt_root)
    dist_utils.barrier(world)

    def save() -> Path:
        _check_finite_weights(model, world, state.step, ckpt_root)
        trainer_state = _trainer_state(state, plan, total_steps, config, fingerprint)
        path = save_checkpoint(
            ckpt_root,
            state.step,
            model=model,
            optimizer=optimizer,
            schedule=schedule,
            trainer_state=trainer_state,
            world=world,
        )
        state.last_checkpoint_step = state.step
        keep = {state.best_step} if train.keep_best and state.best_step is not None else set()
        if world.is_main:
            prune_checkpoints(ckpt_root, train.keep_last, keep)
        _emit(callbacks, "checkpoint", {"step": state.step, "path": str(path)})
        return path

    def run_eval() -> None:
        result = likelihood.evaluate(evaluator, eval_batches(), autocast, world)
        state.last_eval, state.last_eval_step = result, state.step
        row = {"step": state.step, "epoch": round(state.step / plan.steps_per_epoch, 4), **result}
        logger.log_eval(row)
        _emit(callbacks, "eval", row)
        if state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss:
            state.best_eval_loss, state.best_step = result["eval_loss"], state.step
            if train.keep_best:
                save()

    if world.is_main:
        logger = MetricsLogger(output_dir, total_steps, start_step=state.step, progress=progress)
    else:
        logger = _SilentLogger()
    model.train()
    try:
        for index, epoch, step in plan.iter_steps(state.step, total_steps):
            start = time.perf_counter()
            set_lr(optimizer, lr := lr_at(index, total_steps, train))
            mine = plan.rank_micro_batches(step, world.rank, world.world_size)
            micro_batches = [load(rows) for rows in mine]
            fillers = []
            if world.distributed:
                fillers = [load.filler()] * (plan.micro_batches_per_rank(step, world.world_size) - len(mine))
            result = train_step(
                forward,
                optimizer,
                micro_batches,
                max_grad_norm=train.max_grad_norm,
                autocast=autocast,
                fillers=fillers,
                sync=sync,
            )
            seconds = time.perf_counter() - start
            _account(state, result, seconds)
            row = _step_row(state, epoch, plan, result, lr, seconds)
            logger.log_step(row, write=state.step % train.log_every == 0 or state.step == total_steps)
            _emit(callbacks, "step_end", row)
            _stop_if_diverged(state, train.max_nonfinite_in_a_row, ckpt_root)
            if eval_batches and train.eval_every and state.step % train.eval_every == 0:
                run_eval()
            if (
                train.save_every
                and state.step % train.save_every == 0
                and state.last_checkpoint_step != state.step
            ):
                save()
            if _agreed_stop(stop, world) and state.step < total_steps:
                path = save() if state.last_checkpoint_step != state.step else ckpt_root / _step_name(state)
                raise TrainingInterrupted(
                    f"{stop.name or 'a stop request'} received: stopped after step {state.step} of "
                    f"{total_steps} with a checkpoint in {path}. Continue with the same command and "
                    "--resume (Python: resume=True)",
                    stop.signum or 15,
                )
        if eval_batches and state.last_eval_step != state.step:
            run_eval()
        if state.last_checkpoint_step != state.step:
            save()
    finally:
        logger.close()
        model.eval()  # hand the model back ready for generation or export
        if train.gradient_checkpointing:
            _disable_checkpointing(model)

    summary = _summary(state, plan, total_steps, config, resumed_from, ckpt_root)
    if world.distributed:
        summary["world_size"] = world.world_size
        summary["distributed"] = strategy
    _emit(callbacks, "end", summary)
    return summary


class _SilentLogger:
    """What ranks other than 0 log: nothing."""

    def log_step(self, row: dict[str, Any], write: bool = True) -> None:
        pass

    def log_eval(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Helpers of run_training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _place(model: nn.Module) -> torch.device:
    """Train where the model is; move a CPU model to the GPU when there is one (not quantized ones)."""
    device = next(model.parameters()).device
    if device.type == "cpu" and torch.cuda.is_available() and not is_quantized(model):
        model.to("cuda")
        device = torch.device("cuda")
    return device


def _plan(config: Config, lengths: np.ndarray, shuffle: bool, world_size: int = 1) -> TrainPlan:
    train: TrainConfig = config.train
    return TrainPlan.build(
        lengths,
        max_length=config.max_length,
        packing=config.packing,
        micro_batch_size=train.micro_batch_size,
        grad_accum=train.grad_accum,
        max_tokens_per_batch=train.max_tokens_per_batch,
        seed=train.seed,
        shuffle=shuffle,
        world_size=world_size,
    )


def _fingerprint(plan: TrainPlan) -> str:
    """Identifies the training data's shape: a resume onto different data would replay other batches."""
    digest = hashlib.sha256(np.ascontiguousarray(plan.lengths).tobytes()).hexdigest()[:16]
    return f"{len(plan.lengths)}:{digest}"


def _resume(
    path: Path,
    model: nn.Module,
    optimizer,
    config: Config,
    fingerprint: str,
    plan: TrainPlan,
    world: dist_utils.World = dist_utils.SINGLE,
) -> RunState:
    saved = load_checkpoint(path, model, optimizer, world)
    if saved.get("data_fingerprint") != fingerprint:
        raise ExemplarError(
            f"cannot resume from {path}: the training data differs from the data of that run "
            f"({saved.get('data_fingerprint')} vs {fingerprint}); use a new output_dir"
        )
    if saved.get("config_hash") != config_hash(config):
        log.warning(
            "resuming from %s with a changed config; the batch plan and schedule follow the new one", path
        )
    if "global_batch" in saved and saved["global_batch"] != _global_batch(plan):
        log.warning(
            "resuming from %s with another global batch (%s, now %s): the steps from here hold other "
            "examples than the interrupted run's would have. Keep micro_batch_size x grad_accum x ranks "
            "constant to continue exactly",
            path,
            saved["global_batch"],
            _global_batch(plan),
        )
    fields = RunState.__dataclass_fields__
    state = RunState(**{k: v for k, v in saved.get("run", {}).items() if k in fields})
    state.last_checkpoint_step = state.step
    return state


def _trainer_state(
    state: RunState, plan: TrainPlan, total_steps: int, config: Config, fingerprint: str
) -> dict:
    epoch, in_epoch = plan.locate(state.step)
    return {
        "step": state.step,
        "epoch": state.step / plan.steps_per_epoch,
        "plan_epoch": epoch,  # where the next step starts in the plan
        "plan_step_in_epoch": in_epoch,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": total_steps,
        "config_hash": config_hash(config),
        "data_fingerprint": fingerprint,
        "global_batch": _global_batch(plan),
        "run": {**state.__dict__, "last_checkpoint_step": state.step},
    }


def _global_batch(plan: TrainPlan) -> str:
    """What one optimizer step holds, whatever the split into micro-batches and ranks."""
    if plan.max_tokens_per_batch is None:
        return f"{plan.micro_batch_size * plan.grad_accum * plan.world_size} sequences"
    return f"{plan.grad_accum * plan.world_size} groups of {plan.max_tokens_per_batch} tokens"


def _account(state: RunState, result: StepResult, seconds: float) -> None:
    state.step += 1
    state.tokens += result.num_tokens
    state.trained_tokens += result.num_trained
    state.train_wall_s += seconds
    state.last_loss = result.loss
    state.skipped_steps += int(result.skipped)
    state.nonfinite_steps += int(result.nonfinite)
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if result.nonfinite else 0


def _stop_if_diverged(state: RunState, limit: int, ckpt_root: Path) -> None:
    if state.nonfinite_in_a_row < limit:
        return
    last = f"step-{state.last_checkpoint_step:06d}" if state.last_checkpoint_step is not None else None
    raise ExemplarError(
        f"stopped at step {state.step}: the loss or the gradient was NaN or infinite in {limit} steps in "
        f"a row (train.max_nonfinite_in_a_row), {state.nonfinite_steps} in all. Nothing was saved from "
        "these steps"
        + (f"; the last checkpoint is {ckpt_root / last}" if last else "")
        + ". Lower train.lr, use fp32, or check the data"
    )


def _agreed_stop(stop: StopRequests, world: dist_utils.World) -> bool:
    """Whether any rank was asked to stop (a scheduler may signal only some): all stop together."""
    if not world.distributed:
        return stop.requested
    return dist_utils.all_reduce_sum([float(stop.requested)], world)[0] > 0


def _step_name(state: RunState) -> str:
    return f"step-{state.step:06d}"


def _check_finite_weights(model: nn.Module, world: dist_utils.World, step: int, ckpt_root: Path) -> None:
    """Refuse to write weights holding NaN or infinity (checkpoints, hence the final model too)."""
    bad = sum(
        int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
        for p in model.parameters()
        if p.requires_grad
    )
    if dist_utils.all_reduce_sum([float(bad)], world)[0] > 0:
        raise ExemplarError(
            f"the weights hold NaN or infinite values at step {step}: not saved, so {ckpt_root} keeps only "
            "finite checkpoints. Lower train.lr, raise train.adam_eps, or use fp32"
        )


def _step_row(
    state: RunState, epoch: int, plan: TrainPlan, result: StepResult, lr: float, seconds: float
) -> dict:
    row = {
        "step": state.step,
        "epoch": round(state.step / plan.steps_per_epoch, 4),
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "tokens": result.num_tokens,
        "trained_tokens": result.num_trained,
        "tokens_per_s": result.num_tokens / seconds if seconds > 0 else 0.0,
        "elapsed_s": round(state.train_wall_s, 4),
    }
    if result.skipped:
        row["skipped"] = True
    if result.nonfinite:
        row["nonfinite"] = True
    return row


def _summary(
    state: RunState,
    plan: TrainPlan,
    total_steps: int,
    config: Config,
    resumed_from: str | None,
    ckpt_root: Path,
) -> dict[str, Any]:
    wall = round(state.train_wall_s, 4)
    summary: dict[str, Any] = {
        "steps": state.step,
        "total_steps": total_steps,
        "epochs": round(state.step / plan.steps_per_epoch, 4),
        "steps_per_epoch": plan.steps_per_epoch,
        "examples": len(plan.lengths),
        "sequences": len(plan.sequences),
        "packing": config.packing,
        "fill_ratio": round(plan.fill_ratio(config.max_length), 4) if config.packing else None,
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "train_wall_s": wall,  # the loop alone: no data preparation, model loading, eval or saving
        "tokens_per_s": state.tokens / wall if wall > 0 else 0.0,
        "final_loss": state.last_loss,
        "skipped_steps": state.skipped_steps,
        "nonfinite_steps": state.nonfinite_steps,
        **peak_memory(),
        "resumed_from": resumed_from,
        "last_checkpoint": str(ckpt_root / f"step-{state.last_checkpoint_step:06d}")
        if state.last_checkpoint_step is not None
        else None,
    }
    if state.last_eval is not None:
        summary.update({k: v for k, v in state.last_eval.items() if k.startswith("eval_")})
        summary["best_eval_loss"] = state.best_eval_loss
        summary["best_step"] = state.best_step
        if config.train.keep_best and state.best_step is not None:
            summary["best_checkpoint"] = str(ckpt_root / f"step-{state.best_step:06d}")
    return summary


# transformers 5.x renamed gradient checkpointing to activation checkpointing (the old methods
# warn and go in v6); our requirement range still includes versions with only the old names.
def _enable_checkpointing(model: torch.nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _disable_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _emit(callbacks: list[Callback], event: str, payload: dict[str, Any]) -> None:
    for callback in callbacks:
        callback(event, payload)
