"""The training loop shared by the pretrain and adapt stages (model-agnostic).

The caller supplies the model (with only the parameters to train left `requires_grad`),
a `MultiTaskBatcher`, and `loss_fn(model, plan) -> per-example losses [len(plan)]` that turns
the (task, example index) pairs of a plan into tensors, routes tasks (`use_tasks`) and runs
the forward. The loop owns everything else:

- AdamW (or Adafactor for T5 configs) with two param groups: routing logits (chosen by a name
  predicate, own learning rate, no weight decay) and the other trainable parameters;
- linear warmup + linear decay (`linear_warmup_decay`; no step at lr 0);
- gradient clipping, gradient accumulation (the plan is split into `grad_accum` micro-batches),
  bf16 autocast on CUDA, deterministic algorithms and fixed seeds;
- a tqdm bar (loss, examples/s), a JSONL metrics log, checkpoints every N steps and resume,
  gradient alignment every M steps;
- data parallel under torchrun: every rank builds the same global plan and trains on its slice.

Loss: the mean of the per-example losses over the GLOBAL batch. Each rank backpropagates
sum(own losses) · world_size / global_batch; DDP averages gradients over ranks, which gives
exactly the gradient of the global mean, also when shards differ in size by one.

Outputs in `out_dir`: `checkpoint/` (persist), `log.jsonl`, `adapter.safetensors` (trainable
weights by parameter name), `summary.json`. Only rank 0 writes.

Resume: rerunning with the same config hash continues from the newest checkpoint and gives
bit-identical weights on CPU (same thread count). The log is rebuilt from the checkpoint's
copy, so entries written after that checkpoint (by the killed run) are dropped, never doubled.
A DDP run reproduces the single-process run up to float rounding when the forward has no
randomness (dropout masks differ between one process and several).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from pipeline_src.errors import PipelineError
from pipeline_src.io_utils import atomic_output, write_json
from pipeline_src.training.alignment import measure_alignment
from pipeline_src.training.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from pipeline_src.training.sampling import BatchPlan, MultiTaskBatcher

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "log.jsonl"
WEIGHTS_FILE = "adapter.safetensors"
SUMMARY_FILE = "summary.json"

LossFn = Callable[[nn.Module, BatchPlan], torch.Tensor]


def is_routing_param(name: str) -> bool:
    """Default predicate for the routing-logits param group (RoutedLoRA's `routing_logits`)."""
    return "routing_logits" in name


@dataclass
class TrainSettings:
    total_steps: int
    lr: float = 1e-4
    routing_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0  # applied to the non-routing group only
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # None: no clipping
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    optimizer: str = "adamw"  # "adamw" | "adafactor"
    checkpoint_every: int = 0  # 0: only the final checkpoint
    save_checkpoints: bool = True  # False: none at all (short jobs that never resume)
    keep_checkpoints: int = 1
    alignment_every: int = 0  # 0: off
    alignment_batch_size: int = 8
    log_every: int = 1
    seed: int = 0
    bf16: bool = True  # autocast on CUDA (when supported); CPU always runs fp32
    deterministic: bool = True
    progress: bool = True
    find_unused_parameters: bool = True  # DDP: single-task batches leave other tasks' params unused

    def validate(self) -> None:
        checks = [
            (self.total_steps >= 1, "total_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.routing_lr is None or self.routing_lr > 0, "routing_lr must be > 0"),
            (0 <= self.warmup_steps <= self.total_steps, "warmup_steps must be in [0, total_steps]"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.optimizer in ("adamw", "adafactor"), "optimizer must be 'adamw' or 'adafactor'"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.alignment_every >= 0, "alignment_every must be >= 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
        ]
        for ok, msg in checks:
            if not ok:
                raise PipelineError(f"training settings: {msg}")


@dataclass
class TrainResult:
    steps: int
    start_step: int  # 0 for a fresh run, else the checkpoint step it resumed from
    wall_time_s: float  # this process
    examples_per_s: float  # this process
    final_loss: float | None
    weights_path: Path | None  # None on ranks other than 0
    summary: dict[str, Any]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | torch.device | None = None) -> DistInfo:
    """Single process, or torchrun (WORLD_SIZE > 1): init nccl on CUDA, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, created)
    return DistInfo(0, 1, 0, device, False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(device: torch.device) -> None:
    if device.type == "cuda":
        # cuBLAS reads this when it initialises; set it before the first matmul for it to count.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    # warn_only: an op without a deterministic kernel warns instead of stopping a long run.
    torch.use_deterministic_algorithms(True, warn_only=True)


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr factor of optimizer step s (0-based): (s+1)/W while s < W, then (T−s)/(T−W).

    Unlike transformers' schedule no step runs at lr 0: the first warmup step already moves,
    step W−1 reaches the peak and the last step still has 1/(T−W) of it.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]],
    settings: TrainSettings,
    routing_param: Callable[[str], bool] = is_routing_param,
) -> torch.optim.Optimizer:
    """Two groups: `adapters` (lr, weight decay) and `routing` (routing_lr, no decay); empty ones dropped."""
    routing = [p for n, p in named_params if routing_param(n)]
    other = [p for n, p in named_params if not routing_param(n)]
    groups = []
    if other:
        groups.append({"params": other, "lr": settings.lr, "weight_decay": settings.weight_decay, "name": "adapters"})
    if routing:
        groups.append({"params": routing, "lr": settings.routing_lr or settings.lr, "weight_decay": 0.0, "name": "routing"})
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor  # imported here: transformers is slow to import

        # Fixed lr driven by our scheduler (the paper-scale T5 recipe), not Adafactor's own relative step.
        return Adafactor(groups, lr=settings.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=settings.lr)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in trainable_parameters(model)}


def load_trainable_state(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    params = dict(trainable_parameters(model))
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise PipelineError(f"{source}: trainable parameters differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise PipelineError(f"{source}: {name} has shape {tuple(weights[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(weights[name])


class _JsonlLog:
    """Append-only metrics log; rank 0 only. Each record is one line, flushed at once."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def reset_from(self, source: Path | None) -> None:
        if not self.enabled:
            return
        with atomic_output(self.path) as tmp:
            if source is not None and source.exists():
                shutil.copyfile(source, tmp)
            else:
                tmp.write_text("")

    def last_loss(self) -> float | None:
        """Loss of the newest record (a run resumed from its final checkpoint trains no step)."""
        if not self.enabled or not self.path.exists():
            return None
        for line in reversed(self.path.read_text().splitlines()):
            if line.strip() and "loss" in (rec := json.loads(line)):
                return float(rec["loss"])
        return None

    def append(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def train(
    model: nn.Module,
    batcher: MultiTaskBatcher,
    loss_fn: LossFn,
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    config_hash: str,
    *,
    routing_param: Callable[[str], bool] = is_routing_param,
    alignment_param: Callable[[str], bool] | None = None,
    summary_extra: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    on_step_end: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    """Train `model`'s trainable parameters for `settings.total_steps` optimizer steps.

    `loss_fn(model, plan)` returns per-example losses (1-D, len(plan)); `model` may be a DDP
    wrapper (call it, use `unwrap(model)` for attributes) and inputs go to the model's device.
    `alignment_param(name)` picks the parameters for gradient alignment (default: trainable and
    not routing: routing rows are task-specific, so their gradients are orthogonal by design).
    `summary_extra` (e.g. parameter counts of the method) is merged into summary.json.
    `on_step_end(step, model)` runs on rank 0 after each optimizer step (e.g. scoring a selection
    subset to keep the best weights); its own state is not checkpointed.
    """
    settings.validate()
    out_dir = Path(out_dir)
    info = setup_distributed(device)
    try:
        return _train(model, batcher, loss_fn, settings, out_dir, config_hash, info,
                      routing_param, alignment_param, dict(summary_extra or {}), on_step_end)
    finally:
        if info.created_group:
            dist.destroy_process_group()


def _train(
    model: nn.Module,
    batcher: MultiTaskBatcher,
    loss_fn: LossFn,
    settings: TrainSettings,
    out_dir: Path,
    config_hash: str,
    info: DistInfo,
    routing_param: Callable[[str], bool],
    alignment_param: Callable[[str], bool] | None,
    summary_extra: dict[str, Any],
    on_step_end: Callable[[int, nn.Module], None] | None = None,
) -> TrainResult:
    rank, world, dev = info.rank, info.world_size, info.device
    global_batch = batcher.batch_size
    if global_batch < world * settings.grad_accum:
        raise PipelineError(
            f"batch_size {global_batch} is smaller than world_size {world} x grad_accum {settings.grad_accum}: "
            "some micro-batch would be empty"
        )
    seed_everything(settings.seed + rank)  # ranks differ so their dropout masks differ
    if settings.deterministic:
        set_deterministic(dev)
    use_bf16 = settings.bf16 and dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    model.to(dev)
    model.train()
    named = trainable_parameters(model)
    if not named:
        raise PipelineError("training: the model has no parameters with requires_grad=True")
    params = [p for _, p in named]
    align_pred = alignment_param or (lambda n: not routing_param(n))
    align_params = [p for n, p in named if align_pred(n)]
    optimizer = build_optimizer(named, settings, routing_param)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(settings.warmup_steps, settings.total_steps))

    out_dir.mkdir(parents=True, exist_ok=True)
    manager = CheckpointManager(out_dir / CHECKPOINT_DIR, config_hash, keep=settings.keep_checkpoints)
    metrics_log = _JsonlLog(out_dir / LOG_FILE, enabled=info.is_main)
    if info.is_main:
        manager.prepare()
    _barrier(world)

    ckpt = manager.load_latest(map_location="cpu")
    start_step, elapsed_before, rng_to_restore = 0, 0.0, None
    if ckpt is None:
        metrics_log.reset_from(None)
    else:
        if ckpt.step > settings.total_steps:
            raise PipelineError(
                f"{ckpt.path}: checkpoint is at step {ckpt.step} but total_steps is {settings.total_steps}; "
                "include total_steps in the config hash"
            )
        load_trainable_state(model, ckpt.weights, str(ckpt.path))
        optimizer.load_state_dict(ckpt.state["optimizer"])
        scheduler.load_state_dict(ckpt.state["scheduler"])
        batcher.load_state_dict(ckpt.state["batcher"])
        start_step, elapsed_before = ckpt.step, float(ckpt.state["elapsed_s"])
        rng_states = ckpt.state["rng"]
        if len(rng_states) != world:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: ranks beyond reuse fresh seeds",
                        len(rng_states), world)
        rng_to_restore = rng_states[rank] if rank < len(rng_states) else None
        metrics_log.reset_from(ckpt.log_path)
        if info.is_main:
            log.info("resuming from %s (step %d)", ckpt.path, ckpt.step)
        del ckpt

    train_model: nn.Module = model
    if world > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[dev.index] if dev.type == "cuda" else None,
            find_unused_parameters=settings.find_unused_parameters,
        )
    if rng_to_restore is not None:
        restore_rng_state(rng_to_restore, dev)  # last, so nothing above shifts the streams

    names = batcher.task_names
    n_tasks = len(names)
    bar = tqdm(total=settings.total_steps, initial=start_step, desc="train", unit="step",
               disable=not (settings.progress and info.is_main), dynamic_ncols=True)
    t_start = time.perf_counter()
    t_last, step_last = t_start, start_step
    last_loss: float | None = metrics_log.last_loss() if start_step else None
    step = start_step
    while step < settings.total_steps:
        plan = batcher.next_plan()
        shard = plan.shard(rank, world)
        micro = shard.split(settings.grad_accum)
        optimizer.zero_grad(set_to_none=True)
        # Row 0: loss sum per task, row 1: example count per task (summed over ranks when logging).
        stats = torch.zeros(2, n_tasks, dtype=torch.float64, device=dev)
        for k, mb in enumerate(micro):
            sync = k == len(micro) - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else train_model.no_sync()
            with ctx:
                with autocast():
                    losses = loss_fn(train_model, mb)
                if losses.dim() != 1 or losses.shape[0] != len(mb):
                    raise PipelineError(f"loss_fn returned shape {tuple(losses.shape)}; expected ({len(mb)},) per-example losses")
                losses = losses.float()
                (losses.sum() * (world / global_batch)).backward()
            task_ids = torch.tensor(mb.task_ids, device=dev)
            stats[0].index_add_(0, task_ids, losses.detach().double())
            stats[1].index_add_(0, task_ids, torch.ones_like(task_ids, dtype=torch.float64))
        grad_norm = None
        if settings.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        optimizer.step()
        scheduler.step()
        step += 1

        record: dict[str, Any] | None = None
        if step % settings.log_every == 0 or step == settings.total_steps:
            if world > 1:
                dist.all_reduce(stats)
            sums, counts = stats.tolist()
            loss = sum(sums) / max(1.0, sum(counts))
            if not math.isfinite(loss):
                raise PipelineError(f"training: non-finite loss {loss} at step {step}; lower the lr or check the data")
            now = time.perf_counter()
            ex_s = (step - step_last) * global_batch / max(now - t_last, 1e-9)
            t_last, step_last, last_loss = now, step, loss
            record = {
                "step": step,
                "epoch": plan.epoch,
                "loss": loss,
                "task_loss": {names[t]: sums[t] / counts[t] for t in range(n_tasks) if counts[t] > 0},
                "task_examples": {names[t]: int(counts[t]) for t in range(n_tasks) if counts[t] > 0},
                "lr": lrs.get("adapters", next(iter(lrs.values()))),
                "examples_per_s": ex_s,
                "elapsed_s": elapsed_before + now - t_start,
            }
            if "routing" in lrs:
                record["routing_lr"] = lrs["routing"]
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{ex_s:.1f}")

        if settings.alignment_every and step % settings.alignment_every == 0 and info.is_main and n_tasks > 1:
            aligned = measure_alignment(model, loss_fn, batcher, align_params, step,
                                        settings.alignment_batch_size, dev, autocast)
            record = {"step": step, "epoch": plan.epoch} if record is None else record
            record.update(aligned)
        if record is not None:
            metrics_log.append(record)
        bar.update(1)

        due = (settings.checkpoint_every and step % settings.checkpoint_every == 0) or step == settings.total_steps
        if due and settings.save_checkpoints:
            _save_checkpoint(manager, model, optimizer, scheduler, batcher, step,
                             elapsed_before + time.perf_counter() - t_start, metrics_log.path, info)
        if on_step_end is not None and info.is_main:
            on_step_end(step, unwrap(model))
    bar.close()

    wall = time.perf_counter() - t_start
    examples = (settings.total_steps - start_step) * global_batch
    ex_s = examples / wall if wall > 0 and examples else 0.0
    all_params = list(unwrap(model).parameters())
    summary = {
        "steps": settings.total_steps,
        "start_step": start_step,
        "resumed": start_step > 0,
        "global_batch_size": global_batch,
        "world_size": world,
        "wall_time_s": wall,
        "train_time_s_total": elapsed_before + wall,
        "examples_per_s": ex_s,
        "final_loss": last_loss,
        "params_trainable": sum(p.numel() for p in params),
        "params_total": sum(p.numel() for p in all_params),
        "config_hash": config_hash,
        "settings": asdict(settings),
        **summary_extra,
    }
    weights_path = None
    if info.is_main:
        weights_path = out_dir / WEIGHTS_FILE
        with atomic_output(weights_path) as tmp:
            save_file({k: v.to("cpu", copy=True).contiguous() for k, v in trainable_state(model).items()}, str(tmp))
        write_json(out_dir / SUMMARY_FILE, summary)
    _barrier(world)
    return TrainResult(settings.total_steps, start_step, wall, ex_s, last_loss, weights_path, summary)


def _save_checkpoint(
    manager: CheckpointManager,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batcher: MultiTaskBatcher,
    step: int,
    elapsed: float,
    log_path: Path,
    info: DistInfo,
) -> None:
    rng = capture_rng_state(info.device)
    if info.world_size > 1:
        # Every rank's RNG (dropout) must come back on resume; collect them on rank 0.
        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, rng)
        rng_states = gathered
    else:
        rng_states = [rng]
    if info.is_main:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "batcher": batcher.state_dict(),
            "rng": rng_states,
            "elapsed_s": elapsed,
            "world_size": info.world_size,
        }
        manager.save(step, trainable_state(model), state, log_file=log_path)
    _barrier(info.world_size)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
