"""Stage glue_mtl: train all GLUE tasks jointly with per-task heads for one task-specific config, score each dev split.

The PALs setting ("BERT and PALs", Stickland & Murray 2019): one shared encoder (model.name), one
Linear head per task on the pooled output (STS-B: a 1-output regression head, MSE), plus the
config's task-specific parameters (`glue_mtl.configs.<name>.kind`):

    pal low_rank mha ffn houlsby lhuc         inside the layers  (pipeline_src.adapters.pal)
    top_linear top_bert_layer top_proj        on top of the encoder
    full_ft      shared encoder + heads, everything trains
    heads_only   frozen encoder, only the heads train
    separate     one encoder + head per task, nothing shared (the "N×" row)

As in the paper, the shared encoder is fine-tuned jointly with the task-specific parameters
(every kind but heads_only). Batches hold one task each (`glue_mtl.train.batch_mode`, PALs);
the task is drawn by the config's `sampler` when the config sets one, else by
`glue_mtl.train.sampler`. Learning rates: `glue_mtl.train.lr` for the encoder and the
task-specific parameters, `glue_mtl.lr_head` for the heads (the loop's second param group,
normally the routing logits, is given to the heads: it has its own lr and no weight decay).

`separate` trains the N models in one loop run (so it resumes like the others): round-robin
single-task batches give every task exactly steps // N steps; a step only produces gradients
for its task's model, and AdamW / clipping skip parameters without a gradient, so each model
trains as if alone (the lr schedule is read at the global step: the same shape per model).

Writes:
  models/glue_mtl/pretrain/<config>/{checkpoint/, log.jsonl, adapter.safetensors, summary.json}
      (loop.train; rerunning after a kill resumes from the checkpoint when the config hash —
      params sections + training-data fingerprint — is unchanged)
  results/metrics/glue_mtl/<config>/<task>/s<seed>.json    corpus-level dev metrics + param counts
  results/predictions/glue_mtl/<config>/<task>/s<seed>.parquet  idx, label | score, prediction

Dev evaluation: the task's labeled dev rows, capped by `glue_mtl.eval_max_examples` with a
seeded random subset (seed 0, as the cross-task evaluate stage: every config and training seed
is scored on the same rows).

Parameter counts per task (in the metrics JSON, `params`):
  trainable_per_task  parameters that one task's training steps update (trainable shared
                      encoder weights + the task's own trainable parameters + its head)
  stored_per_task     what one more task adds to storage: its task-specific parameters + head
                      (separate: a whole encoder + head; full_ft / heads_only: the head)
  total               every parameter for all tasks: base + Σ stored (separate: Σ stored)
  multiplier          total / base, base = the unmodified encoder (the PALs table's column)
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_src.adapters.pal import KINDS as TASK_SPECIFIC_KINDS
from pipeline_src.adapters.pal import TaskSpecificConfig, add_task_specific, task_specific_parameters
from pipeline_src.config import GlueConfig, Params, TrainParams
from pipeline_src.data.tokenized import TokenizedSplit
from pipeline_src.errors import PipelineError
from pipeline_src.io_utils import atomic_output, write_json
from pipeline_src.metrics import compute_task_metrics, primary_score
from pipeline_src.models.backbone import load_backbone
from pipeline_src.models.collate import collate_pairs
from pipeline_src.models.encoder import HeadSpec, TaskHeadModel
from pipeline_src.models.evaluate_utils import predict_dataset
from pipeline_src.stages.common import (
    METRICS_DIR, data_fingerprint, make_batcher, plan_rows, pretrain_dir, relaunch_with_torchrun,
    train_settings, training_splits,
)
from pipeline_src.evaluation import dev_rows
from pipeline_src.tasks.registry import get_task
from pipeline_src.training.loop import train
from pipeline_src.training.sampling import BatchPlan

CONFIG_CHECKS = {"check_data": False}
EXPERIMENT = "glue_mtl"
PREDICTIONS_DIR = Path("results/predictions")
EVAL_BATCH_SIZE = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a key of glue_mtl.configs")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def head_specs(tasks: list[str]) -> list[HeadSpec]:
    """One head per task: classification over the task's labels, or 1-output regression (STS-B)."""
    specs = []
    for task in tasks:
        spec = get_task(task)
        if spec.is_regression:
            specs.append(HeadSpec(task, kind="regression"))
        else:
            specs.append(HeadSpec(task, n_labels=len(spec.label_names)))
    return specs


class SeparateModels(nn.Module):
    """N independent TaskHeadModels, model t = task t's encoder + head (the `separate` baseline).

    `forward` has TaskHeadModel's contract ({task id: (row indices, head outputs)}), so the
    same loss function and the training loop (DDP included) drive it.
    """

    def __init__(self, models: list[TaskHeadModel]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        task_ids = batch["task_ids"]
        groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for t in torch.unique(task_ids).tolist():
            rows = (task_ids == t).nonzero().squeeze(-1)
            sub = {k: v[rows] for k, v in batch.items()}
            sub["task_ids"] = torch.zeros_like(rows)  # each model has one head: id 0
            (_, out), = self.models[t](sub).values()
            groups[t] = (rows.to(out.device), out)
        return groups


def task_specific_config(name: str, cfg: GlueConfig, n_tasks: int) -> TaskSpecificConfig:
    """pal.py's config for a glue_mtl config; unset placement means the kind's natural one."""
    placement = cfg.placement if "placement" in cfg.model_fields_set else None
    try:
        return TaskSpecificConfig(
            kind=cfg.kind, n_tasks=n_tasks, d_s=cfg.d_s, n_attention_heads=cfg.n_attention_heads,
            placement=placement, layers=cfg.layers,
        )
    except PipelineError as exc:
        raise PipelineError(f"glue_mtl.configs.{name}: {exc}") from None


def build_model(params: Params, name: str) -> tuple[nn.Module, int]:
    """(TaskHeadModel or SeparateModels with the config's trainable set, pad id).

    Call after seeding: heads and task-specific parameters draw from the global RNG.
    """
    if params.model.kind != "encoder":
        raise PipelineError(f"model.kind: '{params.model.kind}' is not supported by glue_mtl (needs an encoder)")
    glue = params.glue_mtl
    cfg = glue.configs[name]
    specs = head_specs(glue.tasks)
    backbone, tokenizer = load_backbone(params.model.name, params.model.kind)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    if glue.freeze_word_embeddings:
        backbone.get_input_embeddings().weight.requires_grad_(False)
    if cfg.kind == "separate":
        models = [TaskHeadModel(copy.deepcopy(backbone), [spec]) for spec in specs]
        return SeparateModels(models), pad_id
    model = TaskHeadModel(backbone, specs)
    if cfg.kind == "heads_only":
        model.freeze_backbone()
    elif cfg.kind in TASK_SPECIFIC_KINDS:
        add_task_specific(model.backbone, task_specific_config(name, cfg, len(specs)))
    # full_ft and the task-specific kinds: every parameter trains (PALs fine-tunes the shared encoder),
    # the word embeddings too unless glue_mtl.freeze_word_embeddings.
    return model, pad_id


def is_head_param(name: str) -> bool:
    """Head weights (own lr: glue_mtl.lr_head): `heads.<t>.*`, `models.<t>.heads.0.*` when separate."""
    return name.startswith("heads.") or ".heads." in name


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def _trainable(params) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def parameter_counts(model: nn.Module, tasks: list[str]) -> dict[str, dict[str, int | float]]:
    """{task: {trainable_per_task, stored_per_task, total, multiplier}} from the model's actual
    parameters and requires_grad flags (definitions: module docstring)."""
    if isinstance(model, SeparateModels):
        base = _numel(model.models[0].backbone.parameters())
        stored = [_numel(m.parameters()) for m in model.models]
        trainable = [_numel(_trainable(m.parameters())) for m in model.models]
        total = sum(stored)
    else:
        backbone = model.backbone
        own = [task_specific_parameters(backbone, t) for t in range(len(tasks))]  # [] without TS params
        own_ids = {id(p) for ps in own for p in ps}
        shared = [p for p in backbone.parameters() if id(p) not in own_ids]
        base = _numel(shared)
        heads = [list(model.heads[t].parameters()) for t in range(len(tasks))]
        stored = [_numel(own[t]) + _numel(heads[t]) for t in range(len(tasks))]
        shared_trainable = _numel(_trainable(shared))
        trainable = [shared_trainable + _numel(_trainable(own[t])) + _numel(_trainable(heads[t]))
                     for t in range(len(tasks))]
        total = base + sum(stored)
    return {
        task: {"trainable_per_task": trainable[t], "stored_per_task": stored[t], "total": total,
               "multiplier": total / base}
        for t, task in enumerate(tasks)
    }


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def per_example_losses(groups: dict[int, tuple[torch.Tensor, torch.Tensor]], batch: dict[str, torch.Tensor],
                       regression: list[bool]) -> torch.Tensor:
    """[B] losses from the model's per-task groups: cross-entropy, or squared error for regression."""
    first_out = next(iter(groups.values()))[1]
    device = first_out.device
    labels, scores = batch["labels"].to(device), batch["scores"].to(device)
    losses = torch.zeros(batch["task_ids"].numel(), device=device)
    for t, (rows, out) in groups.items():
        out = out.float()
        if regression[t]:
            loss = F.mse_loss(out.squeeze(-1), scores[rows], reduction="none")
        else:
            loss = F.cross_entropy(out, labels[rows], reduction="none")
        losses = losses.index_copy(0, rows, loss)  # out of place: keeps the graph
    return losses


def task_loss_fn(splits: list[TokenizedSplit], pad_id: int, regression: list[bool]):
    def loss_fn(model: nn.Module, plan: BatchPlan) -> torch.Tensor:
        batch = collate_pairs(plan_rows(splits, plan), pad_id, task_ids=plan.task_ids)
        return per_example_losses(model(batch), batch, regression)

    return loss_fn


def effective_train(params: Params, name: str) -> TrainParams:
    """glue_mtl.train with the config's sampler; `separate`: round-robin, N·(steps // N) steps."""
    glue = params.glue_mtl
    cfg = glue.configs[name]
    train_params = glue.train
    update: dict = {}
    if "sampler" in cfg.model_fields_set:
        update["sampler"] = cfg.sampler
    if cfg.kind == "separate":
        n = len(glue.tasks)
        update.update(sampler="round_robin", batch_mode="single_task", steps=n * max(1, train_params.steps // n))
    return train_params.model_copy(update=update)


def model_dir(name: str) -> Path:
    return pretrain_dir(EXPERIMENT, name)  # models/glue_mtl/pretrain/<config>: where the report reads logs


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def dev_split(params: Params, task: str) -> TokenizedSplit:
    """The task's labeled dev rows, a seeded subset when glue_mtl.eval_max_examples caps them."""
    return dev_rows(task, params.glue_mtl.eval_max_examples)


def predict_task(model: nn.Module, t: int, split: TokenizedSplit, pad_id: int) -> np.ndarray:
    rows = split.table.to_pylist()
    if isinstance(model, SeparateModels):
        return predict_dataset(model.models[t], rows, EVAL_BATCH_SIZE, pad_id, task_ids=[0] * len(rows))
    return predict_dataset(model, rows, EVAL_BATCH_SIZE, pad_id, task_ids=[t] * len(rows))


def targets(split: TokenizedSplit) -> np.ndarray:
    """Gold labels (int) or STS-B scores (float) of a split."""
    if get_task(split.task).is_regression:
        return split.table["score"].to_numpy().astype(np.float64)
    return split.table["label"].to_numpy().astype(np.int64)


def write_predictions(name: str, split: TokenizedSplit, preds: np.ndarray, seed: int) -> Path:
    regression = get_task(split.task).is_regression
    gold = "score" if regression else "label"
    table = pa.table({
        "idx": split.table["idx"],
        gold: pa.array(targets(split)),
        "prediction": pa.array(preds.astype(np.float64 if regression else np.int64)),
    })
    path = PREDICTIONS_DIR / EXPERIMENT / name / split.task / f"s{seed}.parquet"
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return path


def metrics_path(name: str, task: str, seed: int) -> Path:
    return METRICS_DIR / EXPERIMENT / name / task / f"s{seed}.json"


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

@dataclass
class GlueRun:
    model: nn.Module
    train: TrainParams  # the effective training params
    summary: dict
    records: dict[str, dict]  # task -> what its metrics JSON holds (rank 0 only; {} elsewhere)


def train_and_evaluate(params: Params, name: str) -> GlueRun:
    glue = params.glue_mtl
    if glue is None:
        raise PipelineError("glue_mtl: section missing from params")
    if name not in glue.configs:
        raise PipelineError(f"--config: '{name}' is not a key of glue_mtl.configs ({', '.join(glue.configs)})")
    cfg = glue.configs[name]
    train_params = effective_train(params, name)
    relaunch_with_torchrun(train_params.devices)
    torch.manual_seed(train_params.seed)  # heads' and task-specific parameters' initialisation
    splits = training_splits(glue.tasks, train_params.max_examples_per_task, train_params.seed)
    model, pad_id = build_model(params, name)
    counts = parameter_counts(model, glue.tasks)
    config_hash = params.section_hash(
        "model", "glue_mtl.tasks", f"glue_mtl.configs.{name}", "glue_mtl.train", "glue_mtl.lr_head",
        "glue_mtl.freeze_word_embeddings",
    ) + "-" + data_fingerprint(splits)
    settings = train_settings(train_params)
    settings.routing_lr = glue.lr_head  # the second param group holds the heads (is_head_param)
    regression = [get_task(t).is_regression for t in glue.tasks]
    out_dir = model_dir(name)
    result = train(
        model,
        make_batcher(train_params, {s.task: len(s) for s in splits}),
        task_loss_fn(splits, pad_id, regression),
        settings,
        out_dir,
        config_hash,
        routing_param=is_head_param,
        summary_extra={"config": name, "kind": cfg.kind, "sampler": train_params.sampler, "tasks": glue.tasks,
                       "lr_head": glue.lr_head, "params": counts},
    )
    records: dict[str, dict] = {}
    if result.weights_path is None:  # not rank 0: rank 0 evaluates and writes
        return GlueRun(model, train_params, result.summary, records)
    for t, task in enumerate(glue.tasks):
        spec = get_task(task)
        split = dev_split(params, task)
        if len(split) == 0:
            raise PipelineError(f"data/tokenized/{task}/dev.parquet: no labeled rows to evaluate")
        preds = predict_task(model, t, split, pad_id)
        write_predictions(name, split, preds, train_params.seed)
        metrics = compute_task_metrics(spec.metrics, preds, targets(split))
        record = {
            "experiment": EXPERIMENT, "method": name, "kind": cfg.kind, "sampler": train_params.sampler,
            "task": task, "k": None, "seed": train_params.seed, "metrics": metrics,
            "primary": primary_score(metrics, spec.metrics), "n_eval": len(split), "params": counts[task],
        }
        write_json(metrics_path(name, task, train_params.seed), record)
        records[task] = record
    return GlueRun(model, train_params, result.summary, records)


def run(params: Params, args: argparse.Namespace) -> None:
    out = train_and_evaluate(params, args.config)
    if not out.records:
        return
    s = out.summary
    print(f"glue_mtl {args.config}: {s['steps']} steps ({s['start_step']} resumed), "
          f"{s['examples_per_s']:.1f} examples/s, {s['wall_time_s']:.1f}s training")
    for task, rec in out.records.items():
        shown = ", ".join(f"{k}={v:.4f}" for k, v in rec["metrics"].items())
        print(f"  {task:6s} {shown} (n={rec['n_eval']})")
    mult = next(iter(out.records.values()))["params"]["multiplier"]
    print(f"  average primary {np.mean([r['primary'] for r in out.records.values()]):.4f}, params {mult:.3f}x base")
