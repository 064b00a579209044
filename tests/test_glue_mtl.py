"""glue_mtl stage: every kind trains and writes its results, trainable sets, parameter accounting,
metrics = compute_task_metrics(saved predictions), eval cap, resume, sampler choice.

A tiny BERT stands in for model.name (load_backbone is monkeypatched) and tiny tokenized Parquet
splits for cola (MCC), mrpc (F1 + accuracy) and stsb (regression) are written in the test.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline_src.adapters.pal import count_task_specific_params
from pipeline_src.config import TASK_SPECIFIC_KINDS, Params
from pipeline_src.errors import PipelineError
from pipeline_src.metrics import compute_task_metrics, primary_score
from pipeline_src.models.backbone import build_tiny_bert
from pipeline_src.models.collate import collate_pairs
from pipeline_src.report.load import load_run
from pipeline_src.stages import glue_mtl
from pipeline_src.stages.common import subsample
from pipeline_src.data.tokenized import labeled, load_split
from pipeline_src.tasks.registry import get_task

REPO = Path(__file__).resolve().parents[1]
TASKS = ["cola", "mrpc", "stsb"]
N_TRAIN, N_DEV, VOCAB, HIDDEN = 12, 10, 64, 32
STEPS, BATCH = 6, 4
JSON_KEYS = {"experiment", "method", "kind", "sampler", "task", "k", "seed", "metrics", "primary", "n_eval", "params"}
PARAM_KEYS = {"trainable_per_task", "stored_per_task", "total", "multiplier"}


# Tiny tensors: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_backbone():
    return build_tiny_bert(vocab_size=VOCAB, hidden=HIDDEN, layers=2, heads=2, intermediate=48, seed=0)


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(glue_mtl, "load_backbone", lambda name, kind="encoder": (tiny_backbone(), SimpleNamespace(pad_token_id=0)))


PAIR_TYPE = pa.list_(pa.int32())
SCHEMA = pa.schema([
    ("task", pa.string()), ("idx", pa.int64()), ("label", pa.int64()), ("score", pa.float64()),
    ("pair_input_ids", PAIR_TYPE), ("pair_token_type_ids", pa.list_(pa.int8())),
    ("pair_attention_mask", pa.list_(pa.int8())),
    ("choice_input_ids", pa.list_(PAIR_TYPE)), ("choice_token_type_ids", pa.list_(pa.list_(pa.int8()))),
    ("choice_attention_mask", pa.list_(pa.list_(pa.int8()))),
])


def write_split(root: Path, task: str, split: str, n: int, seed: int) -> None:
    """Tokenized-schema rows; the label is visible in the tokens (token 10 + label) so a few steps can learn."""
    rng = np.random.default_rng(seed)
    regression = get_task(task).is_regression
    rows = []
    for i in range(n):
        label = int(rng.integers(0, 2))
        length = int(rng.integers(4, 10))
        ids = [1, 10 + label, *rng.integers(20, VOCAB, length - 3).tolist(), 2]
        rows.append({
            "task": task, "idx": 100 + i, "label": -1 if regression else label,
            "score": float(rng.uniform(0, 5)) if regression else None,
            "pair_input_ids": ids, "pair_token_type_ids": [0] * length, "pair_attention_mask": [1] * length,
            "choice_input_ids": [], "choice_token_type_ids": [], "choice_attention_mask": [],
        })
    meta = {"task": task, "split": split, "raw_hash": f"raw-{task}-{split}", "tokenizer_hash": "tiny", "max_length": 16}
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata({"pipeline_src": json.dumps(meta)})
    path = root / "data" / "tokenized" / task / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_params(**glue_overrides) -> Params:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["glue_mtl"] = {
        "tasks": TASKS,
        "configs": {kind: {"kind": kind, "d_s": 8, "n_attention_heads": 2} for kind in TASK_SPECIFIC_KINDS},
        "train": {"steps": STEPS, "batch_size": BATCH, "lr": 1e-3, "sampler": "sqrt", "epochs": 2,
                  "batch_mode": "single_task", "checkpoint_every": 3, "warmup_ratio": 0.0, "seed": 3},
        "lr_head": 1e-2,
        "eval_max_examples": None,
        **glue_overrides,
    }
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    for k, task in enumerate(TASKS):
        write_split(root, task, "train", N_TRAIN, seed=k)
        write_split(root, task, "dev", N_DEV, seed=10 + k)
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch) -> Path:
    monkeypatch.chdir(workdir)
    return workdir


def head_size(task: str) -> int:
    n_out = 1 if get_task(task).is_regression else len(get_task(task).label_names)
    return HIDDEN * n_out + n_out


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", TASK_SPECIFIC_KINDS)
def test_each_kind_trains_and_writes_results(in_workdir, kind):
    params = make_params()
    glue_mtl.run(params, argparse.Namespace(config=kind))

    out = Path("models/glue_mtl/pretrain") / kind
    for name in ("checkpoint", "log.jsonl", "adapter.safetensors", "summary.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["kind"] == kind
    sampler = "round_robin" if kind == "separate" else "sqrt"
    assert summary["sampler"] == sampler

    for task in TASKS:
        spec = get_task(task)
        path = Path("results/metrics/glue_mtl") / kind / task / "s3.json"
        rec = json.loads(path.read_text())
        assert set(rec) == JSON_KEYS and set(rec["params"]) == PARAM_KEYS
        assert (rec["experiment"], rec["method"], rec["kind"], rec["sampler"], rec["task"], rec["k"], rec["seed"]) == (
            "glue_mtl", kind, kind, sampler, task, None, 3)
        assert set(rec["metrics"]) == set(spec.metrics) and rec["n_eval"] == N_DEV
        assert rec["primary"] == pytest.approx(primary_score(rec["metrics"], spec.metrics))
        load_run(path, "results/metrics")  # the report accepts it as filed

        # the reported metrics are the corpus-level metrics of the saved predictions
        preds = pd.read_parquet(Path("results/predictions/glue_mtl") / kind / task / "s3.parquet")
        gold = "score" if spec.is_regression else "label"
        assert list(preds.columns) == ["idx", gold, "prediction"]
        assert preds["idx"].tolist() == list(range(100, 100 + N_DEV))
        assert preds["prediction"].dtype == (np.float64 if spec.is_regression else np.int64)
        assert rec["metrics"] == compute_task_metrics(spec.metrics, preds["prediction"].to_numpy(), preds[gold].to_numpy())


def test_separate_gives_each_task_steps_over_n(in_workdir):
    params = make_params(train={"steps": 7, "batch_size": BATCH, "sampler": "sqrt", "seed": 0, "warmup_ratio": 0.0})
    run = glue_mtl.train_and_evaluate(params, "separate")
    assert run.train.steps == 6 and run.train.sampler == "round_robin"
    log = [json.loads(line) for line in Path("models/glue_mtl/pretrain/separate/log.jsonl").read_text().splitlines()]
    seen = {task: 0 for task in TASKS}
    for rec in log:
        for task, n in rec["task_examples"].items():
            seen[task] += n
    assert seen == {task: 2 * BATCH for task in TASKS}


def test_trainable_sets(in_workdir):
    params = make_params()
    fresh = tiny_backbone().state_dict()

    frozen = glue_mtl.train_and_evaluate(params, "heads_only")
    keys = load_file("models/glue_mtl/pretrain/heads_only/adapter.safetensors")
    assert keys and all(k.startswith("heads.") for k in keys)
    for name, value in frozen.model.backbone.state_dict().items():
        assert torch.equal(value, fresh[name]), f"frozen backbone weight {name} changed"

    pal = glue_mtl.train_and_evaluate(params, "pal")
    trained = set(load_file("models/glue_mtl/pretrain/pal/adapter.safetensors"))
    all_names = {n for n, _ in pal.model.named_parameters()}
    assert trained == all_names  # PALs fine-tunes the shared encoder with the PALs and heads
    assert any("task_specific" in n for n in trained) and any(n.startswith("heads.") for n in trained)
    moved = pal.model.backbone.state_dict()["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(moved, fresh["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("kind", ["pal", "separate"])
def test_freeze_word_embeddings_keeps_only_the_table_fixed(in_workdir, kind):
    params = make_params(freeze_word_embeddings=True)
    fresh = tiny_backbone().state_dict()
    run = glue_mtl.train_and_evaluate(params, kind)
    backbones = [m.backbone for m in run.model.models] if kind == "separate" else [run.model.backbone]
    table = "embeddings.word_embeddings.weight"
    for backbone in backbones:
        state = backbone.state_dict()
        assert torch.equal(state[table], fresh[table])
        assert not torch.equal(state["encoder.layer.0.attention.self.query.weight"],
                               fresh["encoder.layer.0.attention.self.query.weight"])
    saved = load_file(f"models/glue_mtl/pretrain/{kind}/adapter.safetensors")
    assert saved and not any(name.endswith(table) for name in saved)
    counts = glue_mtl.parameter_counts(run.model, TASKS)
    unfrozen = glue_mtl.parameter_counts(glue_mtl.build_model(make_params(), kind)[0], TASKS)
    task = TASKS[0]
    assert unfrozen[task]["trainable_per_task"] - counts[task]["trainable_per_task"] == fresh[table].numel()
    assert counts[task]["multiplier"] == unfrozen[task]["multiplier"]


@pytest.mark.parametrize("kind", ["full_ft", "heads_only", "separate", "pal", "low_rank", "top_proj", "lhuc"])
def test_parameter_counts(kind):
    params = make_params()
    torch.manual_seed(0)
    model, _ = glue_mtl.build_model(params, kind)
    counts = glue_mtl.parameter_counts(model, TASKS)
    base = sum(p.numel() for p in tiny_backbone().parameters())
    heads = {t: head_size(t) for t in TASKS}
    if kind in ("full_ft", "heads_only"):
        per_task = 0
    elif kind == "separate":
        per_task = base
    else:
        per_task = count_task_specific_params(model.backbone).per_task
        assert count_task_specific_params(model.backbone).base == base
    n = len(TASKS)
    total = (n * base if kind == "separate" else base + n * per_task) + sum(heads.values())
    for task in TASKS:
        c = counts[task]
        assert c["stored_per_task"] == per_task + heads[task]
        assert c["total"] == total and c["multiplier"] == pytest.approx(total / base)
        shared = 0 if kind == "heads_only" else base
        assert c["trainable_per_task"] == shared + (0 if kind == "separate" else per_task) + heads[task]
    mult = counts["cola"]["multiplier"]
    if kind == "separate":
        assert mult == pytest.approx(n, rel=0.01)  # N x
    elif kind in ("full_ft", "heads_only"):
        assert 1.0 < mult < 1.01  # 1 + heads
    else:
        assert mult > 1.0


def test_sampler_from_config_else_train():
    params = make_params(configs={
        "pal": {"kind": "pal", "d_s": 8, "n_attention_heads": 2},
        "pal_rr": {"kind": "pal", "d_s": 8, "n_attention_heads": 2, "sampler": "round_robin"},
    })
    assert glue_mtl.effective_train(params, "pal").sampler == "sqrt"  # glue_mtl.train.sampler
    assert glue_mtl.effective_train(params, "pal_rr").sampler == "round_robin"


def test_eval_cap_is_a_seeded_subset_and_rerun_resumes(in_workdir):
    params = make_params(eval_max_examples=4)
    first = glue_mtl.train_and_evaluate(params, "heads_only")
    assert first.summary["start_step"] in (0, STEPS)  # an earlier test may have trained it already
    again = glue_mtl.train_and_evaluate(params, "heads_only")
    assert again.summary["resumed"] and again.summary["start_step"] == STEPS
    assert again.records == first.records
    expected = subsample(labeled(load_split("cola", "dev")), 4, seed=0).table["idx"].to_pylist()
    assert first.records["cola"]["n_eval"] == 4
    saved = pd.read_parquet("results/predictions/glue_mtl/heads_only/cola/s3.parquet")
    assert saved["idx"].tolist() == expected and expected != list(range(100, 104))


def test_per_example_losses_average_to_the_model_loss():
    torch.manual_seed(0)
    model, _ = glue_mtl.build_model(make_params(), "full_ft")
    model.eval()
    rows = [{"pair_input_ids": [1, 5 + i, 7, 2], "label": (i % 2) if t < 2 else -1,
             "score": None if t < 2 else 1.5 * i} for i, t in enumerate([0, 2, 1, 2, 0])]
    batch = collate_pairs(rows, 0, task_ids=[0, 2, 1, 2, 0])
    losses = glue_mtl.per_example_losses(model(batch), batch, [False, False, True])
    assert losses.shape == (5,)
    assert losses.mean().item() == pytest.approx(model.loss(batch).item(), rel=1e-5)


def test_bad_config_names_the_key(in_workdir):
    with pytest.raises(PipelineError, match="--config: 'nope'"):
        glue_mtl.train_and_evaluate(make_params(), "nope")
    params = make_params(configs={"bad": {"kind": "houlsby", "placement": "parallel", "d_s": 8}})
    with pytest.raises(PipelineError, match="glue_mtl.configs.bad: .*serial"):
        glue_mtl.train_and_evaluate(params, "bad")
