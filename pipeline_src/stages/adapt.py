"""Stage adapt: few-shot adaptation of one method to one held-out task, for every seed, then evaluation.

Methods (cross_task.adapt_methods, by mode):
  scratch_lora  a fresh LoRA (K=1) + scorer head on the bare backbone (seq2seq: no head)
  full          full fine-tuning of the backbone + scorer head (seq2seq: the whole T5)
  finetune      the pre-trained inventory + a fresh routing row for the task (LoRA / Poly / MHR)
  routing_only  inventory frozen, only the task's routing row trains (MHR-z)
  mean          inventory collapsed to its mean, one plain LoRA, fine-tuned (MHR-mu)
The weights with the best selection-subset score are kept (selection never sees the reporting
split), then scored on the task's dev split by rank classification.
Writes, per seed: runs/cross_task/<method>/<task>/s<seed>/ (weights.safetensors: the selected
trainable weights, selection.json, summary.json, log.jsonl), results/metrics/cross_task_fewshot/
<method>/<task>/s<seed>.json and the per-example predictions (pipeline_src/evaluation.py).

One job per (method, task) runs the seeds one after the other, and adapts and scores in the same
process: a process start with its imports and model load costs ~5 s on a CPU, as much as a short
adaptation itself (default: 28 jobs instead of 112). `--seed` runs one seed only (debugging).
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline_src.adapters.inject import add_task_to_all, collapse_all_to_mean, freeze_all_inventories, routed_layers
from pipeline_src.config import InventoryParams, Params
from pipeline_src.data.tokenized import load_split
from pipeline_src.errors import PipelineError
from pipeline_src.io_utils import atomic_output, write_json
from pipeline_src.evaluation import report_split, score_split, write_results
from pipeline_src.metrics import primary_score
from pipeline_src.stages.common import (
    build_choice_model, choice_loss_fn, is_adapter_param, is_head_param, load_weights, make_batcher, pretrain_dir,
    set_trainable, train_settings,
)
from pipeline_src.stages.subsets import subset_path
from pipeline_src.tasks.registry import get_task
from pipeline_src.training.loop import train

CONFIG_CHECKS = {"check_data": False}
RUNS_DIR = Path("runs/cross_task")
EXPERIMENT = "cross_task_fewshot"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="a key of cross_task.adapt_methods")
    parser.add_argument("--task", required=True, help="a held-out task")
    parser.add_argument("--seed", type=int, help="one seed of cross_task.fewshot.seeds (default: all of them)")


def run_dir(method: str, task: str, seed: int) -> Path:
    return RUNS_DIR / method / task / f"s{seed}"


def check_args(params: Params, args: argparse.Namespace) -> None:
    ct = params.cross_task
    if args.method not in ct.adapt_methods:
        raise PipelineError(f"--method: '{args.method}' is not a key of cross_task.adapt_methods")
    if args.task not in ct.heldout_tasks:
        raise PipelineError(f"--task: '{args.task}' is not in cross_task.heldout_tasks")
    if args.seed is not None and args.seed not in ct.fewshot.seeds:
        raise PipelineError(f"--seed: {args.seed} is not in cross_task.fewshot.seeds")


def build_adapt_model(params: Params, method_name: str, seed: int):
    """The model a method starts from, with exactly the parameters it trains left trainable.

    Returns (model, tokenizer, task_id): task_id routes the held-out task.
    """
    ct = params.cross_task
    method = ct.adapt_methods[method_name]
    torch.manual_seed(seed)  # fresh parts (scratch LoRA, scorer head, routing row) are seeded
    if method.mode == "full":
        model, tokenizer = build_choice_model(params, None, n_tasks=1)
        model.unfreeze_backbone()
        return model, tokenizer, 0
    if method.mode == "scratch_lora":
        model, tokenizer = build_choice_model(params, InventoryParams(n_skills=1, n_heads=1), n_tasks=1)
        set_trainable(model, lambda n: is_adapter_param(n) or is_head_param(n))  # no head params in seq2seq
        return model, tokenizer, 0
    inventory = ct.inventories[method.init]
    model, tokenizer = build_choice_model(params, inventory, n_tasks=len(ct.train_tasks))
    load_weights(model, pretrain_dir("cross_task", method.init) / "adapter.safetensors")
    routed = any(layer.has_routing for layer in routed_layers(model.backbone).values())
    task_id = 0
    if method.mode == "mean":
        if routed:
            collapse_all_to_mean(model.backbone)
        set_trainable(model, lambda n: n.endswith(("lora_A", "lora_B")))
    elif method.mode == "routing_only":
        if not routed:
            raise PipelineError(f"cross_task.adapt_methods.{method_name}: routing_only needs an inventory with routing (K > 1 or h > 1)")
        task_id = add_task_to_all(model.backbone)
        freeze_all_inventories(model.backbone)
        set_trainable(model, lambda n: n.endswith("routing_logits"))
    else:  # finetune
        if routed:
            task_id = add_task_to_all(model.backbone)
        set_trainable(model, is_adapter_param)
    return model, tokenizer, task_id


def trainable_counts(model: torch.nn.Module) -> dict[str, int]:
    """What one new task costs: trainable parameters (routing tables count one row) = what must be stored."""
    per_task = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            per_task += p.shape[1] if name.endswith("routing_logits") else p.numel()
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_per_task": per_task, "stored_per_task": per_task, "total": total}


def run(params: Params, args: argparse.Namespace) -> None:
    check_args(params, args)
    seeds = params.cross_task.fewshot.seeds if args.seed is None else [args.seed]
    for seed in seeds:
        adapt_one(params, args.method, args.task, seed)


def adapt_one(params: Params, method: str, task: str, seed: int) -> None:
    """Adapt `method` to `task` on the seed's few-shot subsets, keep the best selection step, score dev."""
    ct = params.cross_task
    spec = get_task(task)
    train_split = load_split(task, "train", path=subset_path(task, seed, "train"))
    select_split = load_split(task, "select", path=subset_path(task, seed, "select"))
    model, tokenizer, task_id = build_adapt_model(params, method, seed)
    pad_id = tokenizer.pad_token_id
    out = run_dir(method, task, seed)
    # A short job that always starts fresh: the selection state lives in memory, not in the
    # checkpoint, so resuming a half-done adaptation would select from an incomplete history.
    shutil.rmtree(out, ignore_errors=True)

    eval_every = max(1, ct.adapt.steps // ct.fewshot.selection_looks)
    best = {"score": -float("inf"), "step": 0, "state": None}

    def select(step: int, trained) -> None:
        if step % eval_every and step != ct.adapt.steps:
            return
        _, metrics = score_split(trained, select_split, pad_id, task_id)
        score = primary_score(metrics, spec.metrics)
        if score > best["score"]:  # the earliest best wins ties
            best.update(score=score, step=step, state={n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad})

    settings = train_settings(ct.adapt, seed=seed)
    # A short job that never resumes: skip deterministic-algorithm mode (its import alone costs
    # ~2 s per job, x56 jobs on the default); CPU kernels used here are deterministic anyway.
    settings.deterministic = False
    settings.save_checkpoints = False  # it never resumes (see above): no optimizer state to write
    batcher = make_batcher(ct.adapt, {task: len(train_split)}, mode="single_task", seed=seed)
    config_hash = params.section_hash("model", "adapter", f"cross_task.adapt_methods.{method}", "cross_task.adapt", "cross_task.fewshot")
    counts = trainable_counts(model)
    train(
        model, batcher, choice_loss_fn([train_split], pad_id, task_id_of=lambda t: task_id), settings, out,
        f"{config_hash}-{task}-{seed}",
        summary_extra={"method": method, "task": task, "seed": seed, "task_id": task_id, "params": counts},
        on_step_end=select,
    )
    with atomic_output(out / "weights.safetensors") as tmp:
        save_file({n: t.contiguous() for n, t in best["state"].items()}, str(tmp),
                  metadata={"selected_step": str(best["step"]), "selection_score": f"{best['score']:.6f}"})
    write_json(out / "selection.json", {"selected_step": best["step"], "selection_score": best["score"], "eval_every": eval_every})

    with torch.no_grad():  # score the selected weights, not the last ones
        own = dict(model.named_parameters())
        for name, value in best["state"].items():
            own[name].copy_(value)
    split = report_split(params, task)
    preds, metrics = score_split(model, split, pad_id, task_id)
    path = write_results(EXPERIMENT, method, task, params.task_shots(task), seed, split, preds,
                         metrics, counts, extra={"selected_step": best["step"]})
    print(f"adapt {method}/{task}/s{seed}: selected step {best['step']} "
          f"(selection {best['score']:.3f}); dev {metrics} -> {path}")
