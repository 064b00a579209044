"""Typed params.yaml schema, validated once at the door.

Every stage starts with `load_config(path)`. A bad value raises `PipelineError` with one line
naming the key and what is allowed; the CLI prints it and exits 2 before anything is written.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline_src.errors import PipelineError

DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"


class Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them.
    model_config = ConfigDict(extra="forbid")


class DataParams(Strict):
    root: str | None = Field(
        "../shared/data",
        description="folder holding glue/, super_glue/, ag_news/ in their release layouts; "
        f"${DATA_ROOT_ENV} overrides; null = hub only",
    )
    source: Literal["auto", "files", "hub"] = "auto"
    tasks: list[str] = Field(min_length=1, description="every task any experiment uses")


class ModelParams(Strict):
    name: str = "minilm"
    kind: Literal["encoder", "seq2seq"] = "encoder"
    max_length: int = Field(128, ge=8, le=4096)
    max_target_length: int = Field(16, ge=2, le=1024, description="seq2seq: tokens per answer choice (eos included)")
    seq2seq_loss: Literal["ce", "ce_unlikelihood_lennorm"] = Field(
        "ce", description="seq2seq training loss: T0's CE of the correct choice, or T-Few's CE + unlikelihood + "
        "length-normalised softmax over the choices",
    )


class AdapterParams(Strict):
    targets: list[str] = Field(min_length=1, description="names (last component) or regexes of linears to adapt")
    rank: int = Field(4, ge=1)
    alpha: float = Field(8.0, gt=0)
    routing_noise: bool = Field(False, description="relaxed-Bernoulli routing during training")
    routing_temperature: float = Field(1.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


class InventoryParams(Strict):
    n_skills: int = Field(ge=1, description="K adapters in the inventory (1 = plain LoRA)")
    n_heads: int = Field(1, ge=1, description="h routing heads (1 = Poly, >1 = MHR)")


SAMPLERS = ("round_robin", "proportional", "sqrt", "annealed", "temperature")


class TrainParams(Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    lr_routing: float = Field(1e-2, gt=0, description="learning rate of the routing logits")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    sampler: Literal[SAMPLERS] = "sqrt"  # type: ignore[valid-type]
    sampler_temperature: float = Field(2.0, gt=0)
    epochs: int = Field(1, ge=1, description="E for the annealed sampler: steps are split into E epochs")
    batch_mode: Literal["single_task", "mixed"] = "mixed"
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    align_every: int = Field(0, ge=0, description="gradient-alignment probe every M steps (0 = off)")
    max_examples_per_task: int | None = Field(None, ge=1)
    seed: int = 0
    devices: int = Field(1, ge=1, description="data-parallel processes (torchrun --nproc_per_node)")


ADAPT_MODES = ("scratch_lora", "full", "finetune", "routing_only", "mean")


class AdaptMethod(Strict):
    init: str | None = Field(description="pre-trained inventory to start from (a key of cross_task.inventories) or null")
    mode: Literal[ADAPT_MODES]  # type: ignore[valid-type]


class ZeroShotMethod(Strict):
    init: str
    mode: Literal["as_is", "mean"]
    extra_steps: int = Field(0, ge=0, description="multi-task steps on the training tasks after collapsing")


class FewShotParams(Strict):
    shots: int = Field(32, ge=1)
    shots_per_task: dict[str, int] = Field(default_factory=dict)
    selection: int = Field(32, ge=1, description="examples held apart from the k shots for checkpoint selection")
    selection_looks: int = Field(3, ge=1, description="times the selection set is scored during adaptation, evenly spaced, the last at the final step")
    seeds: list[int] = Field(min_length=1)


class CrossTaskParams(Strict):
    train_tasks: list[str] = Field(min_length=1)
    heldout_tasks: list[str] = Field(min_length=1)
    inventories: dict[str, InventoryParams] = Field(min_length=1)
    pretrain: TrainParams
    fewshot: FewShotParams
    adapt_methods: dict[str, AdaptMethod] = Field(min_length=1)
    adapt: TrainParams
    zeroshot_methods: dict[str, ZeroShotMethod] = Field(default_factory=dict)
    eval_max_examples: int | None = Field(None, ge=1, description="cap on dev examples scored per task")


TASK_SPECIFIC_KINDS = (
    "pal", "low_rank", "mha", "ffn", "houlsby", "lhuc",  # within each layer
    "top_linear", "top_bert_layer", "top_proj",  # on top of the encoder
    "full_ft", "heads_only", "separate",  # baselines
)


class GlueConfig(Strict):
    kind: Literal[TASK_SPECIFIC_KINDS]  # type: ignore[valid-type]
    placement: Literal["parallel", "serial"] = "parallel"
    layers: Literal["all", "first_half", "final_half"] = "all"
    d_s: int = Field(204, ge=1)
    n_attention_heads: int = Field(6, ge=1)
    sampler: Literal[SAMPLERS] = "annealed"  # type: ignore[valid-type]


class GlueMtlParams(Strict):
    tasks: list[str] = Field(min_length=1)
    configs: dict[str, GlueConfig] = Field(
        description="one glue_mtl stage per config; {} runs none (seq2seq settings: glue_mtl needs an encoder)",
    )
    train: TrainParams
    lr_head: float = Field(1e-3, gt=0)
    eval_max_examples: int | None = Field(None, ge=1)
    # PALs fine-tunes the whole shared encoder. On a CPU, MiniLM's word-embedding table (11.7M of
    # its 22.7M parameters) doubles the optimizer's work per step for little gain in a few steps.
    freeze_word_embeddings: bool = False


class StageResources(Strict):
    gpu: int = Field(0, ge=0)
    mem_mb: int = Field(4000, ge=100)
    runtime: int = Field(60, ge=1, description="minutes")
    cpus_per_task: int = Field(1, ge=1)


# The stages of dvc.yaml: `resources` may set Snakemake/SLURM resources for these only.
STAGES = ("download", "tokenize", "pretrain", "subsets", "adapt", "zeroshot", "glue_mtl", "report")


class Params(Strict):
    data: DataParams
    model: ModelParams
    adapter: AdapterParams
    cross_task: CrossTaskParams
    glue_mtl: GlueMtlParams | None = None
    resources: dict[str, StageResources] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Params":
        from pipeline_src.tasks.registry import TASKS

        def known(key: str, names: list[str]) -> None:
            for name in names:
                if name not in TASKS:
                    raise ValueError(f"{key}: unknown task '{name}' (known: {', '.join(sorted(TASKS))})")

        known("data.tasks", self.data.tasks)
        for stage in self.resources:
            if stage not in STAGES:
                raise ValueError(f"resources.{stage}: not a stage of dvc.yaml (stages: {', '.join(STAGES)})")
        hub_only = [t for t in self.data.tasks if TASKS[t].hub_only]
        if self.data.source == "files" and hub_only:
            raise ValueError(f"data.source: 'files', but {', '.join(hub_only)} exist only on the hub (use auto or hub)")
        ct = self.cross_task
        known("cross_task.train_tasks", ct.train_tasks)
        known("cross_task.heldout_tasks", ct.heldout_tasks)
        both = sorted(set(ct.train_tasks) & set(ct.heldout_tasks))
        if both:
            raise ValueError(f"cross_task: task(s) {', '.join(both)} both in train_tasks and heldout_tasks")
        used = [("cross_task.train_tasks", ct.train_tasks), ("cross_task.heldout_tasks", ct.heldout_tasks)]
        if self.glue_mtl:
            known("glue_mtl.tasks", self.glue_mtl.tasks)
            used.append(("glue_mtl.tasks", self.glue_mtl.tasks))
        for key, names in used:
            missing = [n for n in names if n not in self.data.tasks]
            if missing:
                raise ValueError(f"{key}: task(s) {', '.join(missing)} not listed in data.tasks")
        for task in ct.fewshot.shots_per_task:
            if task not in ct.heldout_tasks:
                raise ValueError(f"cross_task.fewshot.shots_per_task: '{task}' is not a held-out task")
        for name, method in ct.adapt_methods.items():
            key = f"cross_task.adapt_methods.{name}"
            if method.mode in ("scratch_lora", "full"):
                if method.init is not None:
                    raise ValueError(f"{key}.init: mode '{method.mode}' starts from no inventory; set init: null")
            elif method.init not in ct.inventories:
                raise ValueError(
                    f"{key}.init: '{method.init}' is not a key of cross_task.inventories "
                    f"({', '.join(ct.inventories)})"
                )
        for name, method in ct.zeroshot_methods.items():
            if method.init not in ct.inventories:
                raise ValueError(
                    f"cross_task.zeroshot_methods.{name}.init: '{method.init}' is not a key of cross_task.inventories"
                )
        if self.glue_mtl and self.glue_mtl.configs and self.model.kind != "encoder":
            raise ValueError(
                f"glue_mtl.configs: the GLUE experiment needs model.kind encoder, not '{self.model.kind}'; "
                "set glue_mtl.configs: {} to run none"
            )
        if self.glue_mtl:
            for name, cfg in self.glue_mtl.configs.items():
                if cfg.d_s % cfg.n_attention_heads and cfg.kind in ("pal", "mha"):
                    raise ValueError(
                        f"glue_mtl.configs.{name}.d_s: {cfg.d_s} is not divisible by n_attention_heads "
                        f"{cfg.n_attention_heads}"
                    )
        return self

    def task_shots(self, task: str) -> int:
        return self.cross_task.fewshot.shots_per_task.get(task, self.cross_task.fewshot.shots)

    def data_root(self) -> Path | None:
        root = os.environ.get(DATA_ROOT_ENV) or self.data.root
        return Path(root) if root else None

    def section_hash(self, *keys: str) -> str:
        """Stable hash of the named sections (e.g. 'model', 'cross_task.pretrain'): tags checkpoints."""
        dumped = self.model_dump(mode="json")
        picked = {}
        for key in keys:
            node: Any = dumped
            for part in key.split("."):
                node = node[part]
            picked[key] = node
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error":
        msg = f"got {first['input']!r}; {msg.lower()}"
    elif first["type"] == "extra_forbidden":
        msg = "unknown key (a typo?)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    return f"{loc}: {msg}" if loc else msg


def load_config(path: str | os.PathLike = "params.yaml", *, check_data: bool = True, check_model: bool = False) -> Params:
    """Parse and validate params.yaml. Raises PipelineError with one line on any bad value."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping of sections at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {_format_error(exc)}") from None
    if check_data:
        check_data_root(params)
    if check_model:
        check_model_dims(params)
    return params


def check_data_root(params: Params) -> None:
    if params.data.source == "hub":
        return
    root = params.data_root()
    if root is None:
        if params.data.source == "files":
            raise PipelineError("data.root: source 'files' needs a data root (or set $PIPELINE_DATA_ROOT)")
        return
    if not root.is_dir():
        raise PipelineError(
            f"data.root: data directory '{root}' does not exist "
            f"(point data.root or ${DATA_ROOT_ENV} at the folder holding glue/, super_glue/, ag_news/)"
        )


def check_model_dims(params: Params) -> None:
    """h must divide every adapted linear's in and out dims: checked from the model config alone."""
    shapes = adapted_linear_shapes(params.model.name, params.model.kind, params.adapter.targets)
    for inv_name, inv in params.cross_task.inventories.items():
        for module, (d_in, d_out) in shapes.items():
            if d_in % inv.n_heads or d_out % inv.n_heads:
                raise PipelineError(
                    f"cross_task.inventories.{inv_name}.n_heads: {inv.n_heads} does not divide the dims of "
                    f"'{module}' ({d_in} -> {d_out})"
                )


def check_fewshot_sizes(params: Params, train_sizes: dict[str, int]) -> None:
    """k shots + the selection subset must fit in each held-out task's train split."""
    need_extra = params.cross_task.fewshot.selection
    for task in params.cross_task.heldout_tasks:
        if task not in train_sizes:
            continue
        k = params.task_shots(task)
        if k + need_extra > train_sizes[task]:
            key = "cross_task.fewshot.shots_per_task" if task in params.cross_task.fewshot.shots_per_task else "cross_task.fewshot.shots"
            raise PipelineError(
                f"{key}: {k} shots + {need_extra} selection examples exceed {task}'s train split "
                f"({train_sizes[task]} rows)"
            )


def adapted_linear_shapes(name: str, kind: str, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every linear the adapter targets, from the config alone (meta device, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    from pipeline_src.adapters.inject import find_target_modules
    from pipeline_src.models.backbone import resolve_model_name

    try:
        config = AutoConfig.from_pretrained(resolve_model_name(name))
    except OSError as exc:
        raise PipelineError(f"model.name: cannot load the config of '{name}' ({str(exc).splitlines()[0]})") from None
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config)
    try:
        names = find_target_modules(model, targets)
    except PipelineError as exc:
        raise PipelineError(f"adapter.targets: {exc}") from None
    modules = dict(model.named_modules())
    return {name: (modules[name].in_features, modules[name].out_features) for name in names}
