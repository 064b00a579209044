"""The report stage: tables, plots and metrics.json from a fixed set of metrics files, logs and routing.

Every expected number below is computed by hand from the fixture values (see the comments).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline_src.config import Params
from pipeline_src.errors import PipelineError
from pipeline_src.report.load import load_log, load_run, load_runs
from pipeline_src.report.plots import ema
from pipeline_src.stages import report

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- fixtures: params + the files the evaluate / pretrain stages write ----

def make_params(glue_configs: dict | None = None) -> Params:
    raw = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    ct = raw["cross_task"]
    ct["heldout_tasks"] = ["rte", "cb"]
    ct["inventories"] = {"lora": {"n_skills": 1, "n_heads": 1}, "poly": {"n_skills": 2, "n_heads": 1},
                         "mhr": {"n_skills": 2, "n_heads": 2}}
    ct["fewshot"] = {"shots": 32, "selection": 32, "seeds": [42, 1024], "shots_per_task": {"cb": 16}}
    ct["adapt_methods"] = {  # deliberately not alphabetical: the table must follow this order
        "poly": {"init": "poly", "mode": "finetune"},
        "mhr": {"init": "mhr", "mode": "finetune"},
        "lora_scratch": {"init": None, "mode": "scratch_lora"},
    }
    ct["zeroshot_methods"] = {"mtl_lora_zs": {"init": "lora", "mode": "as_is"},
                              "mhr_mu_zs": {"init": "mhr", "mode": "mean"}}
    raw["glue_mtl"]["tasks"] = ["cola", "mrpc", "stsb"]
    raw["glue_mtl"]["configs"] = glue_configs or {
        "pal": {"kind": "pal", "d_s": 96, "n_attention_heads": 6, "sampler": "annealed"},
        "pal_sqrt": {"kind": "pal", "d_s": 96, "n_attention_heads": 6, "sampler": "sqrt"},
        "low_rank": {"kind": "low_rank", "d_s": 96, "sampler": "annealed"},
    }
    return Params.model_validate(raw)


def write_run(metrics_dir: Path, experiment: str, method: str, task: str, seed: int, metrics: dict[str, float],
              k: int | None = None, trainable: int = 1000, stored: int = 1000, **extra) -> Path:
    if experiment == "glue_mtl":
        path = metrics_dir / experiment / method / task / f"s{seed}.json"
    else:
        path = metrics_dir / experiment / method / task / f"k{k}-s{seed}.json"
    obj = {
        "experiment": experiment, "method": method, "task": task, "k": k, "seed": seed, "metrics": metrics,
        "primary": float(np.mean(list(metrics.values()))), "n_eval": 100,
        "params": {"trainable_per_task": trainable, "stored_per_task": stored, "total": 10 * stored,
                   **extra.pop("params", {})},
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


FEWSHOT = {  # (method, task) -> {seed: accuracy}; rte k=32, cb k=16 (shots_per_task)
    ("poly", "rte"): {42: 0.60, 1024: 0.64},
    ("poly", "cb"): {42: 0.50, 1024: 0.54},
    ("mhr", "rte"): {42: 0.70, 1024: 0.66},
    ("mhr", "cb"): {42: 0.80, 1024: 0.78},
    ("lora_scratch", "rte"): {42: 0.52, 1024: 0.56},  # no cb: no average for lora_scratch
}
PARAMS = {"poly": (1_000, 9_000), "mhr": (2_500_000, 2_500_000), "lora_scratch": (295_000, 295_000)}
GLUE = {  # (config, seed) -> task -> metrics; low_rank has a second seed
    ("pal", 0): {"cola": {"mcc": 0.40}, "mrpc": {"f1": 0.80, "accuracy": 0.70}, "stsb": {"pearson": 0.86, "spearman": 0.84}},
    ("pal_sqrt", 0): {"cola": {"mcc": 0.30}, "mrpc": {"f1": 0.84, "accuracy": 0.76}, "stsb": {"pearson": 0.80, "spearman": 0.78}},
    ("low_rank", 0): {"cola": {"mcc": 0.20}, "mrpc": {"f1": 0.75, "accuracy": 0.65}, "stsb": {"pearson": 0.70, "spearman": 0.70}},
    ("low_rank", 1): {"cola": {"mcc": 0.26}, "mrpc": {"f1": 0.79, "accuracy": 0.69}, "stsb": {"pearson": 0.74, "spearman": 0.72}},
}
MULTIPLIER = {"pal": 1.13, "pal_sqrt": 1.13, "low_rank": 1.1}  # params.multiplier (pal and pal_sqrt: same model)


def build_inputs(root: Path) -> tuple[Path, Path]:
    metrics_dir, models_dir = root / "results" / "metrics", root / "models"
    for (method, task), by_seed in FEWSHOT.items():
        k = 16 if task == "cb" else 32
        trainable, stored = PARAMS[method]
        for seed, acc in by_seed.items():
            write_run(metrics_dir, "cross_task_fewshot", method, task, seed, {"accuracy": acc}, k=k,
                      trainable=trainable, stored=stored)
    # left-overs the params no longer describe: must not be averaged in
    write_run(metrics_dir, "cross_task_fewshot", "poly", "rte", 7, {"accuracy": 0.0}, k=32)  # seed not listed
    write_run(metrics_dir, "cross_task_fewshot", "poly", "rte", 42, {"accuracy": 0.0}, k=16)  # old shot count
    write_run(metrics_dir, "cross_task_fewshot", "removed_method", "rte", 42, {"accuracy": 0.0}, k=32)
    (metrics_dir / "cross_task_fewshot" / "poly" / "rte" / "predictions.json").write_text("[]")  # not a metrics file
    for task, acc in (("rte", 0.55), ("cb", 0.45)):
        write_run(metrics_dir, "cross_task_zeroshot", "mhr_mu_zs", task, 0, {"accuracy": acc}, k=0, trainable=0, stored=0)
    for (config, seed), by_task in GLUE.items():
        cfg = make_params().glue_mtl.configs[config]
        for task, metrics in by_task.items():
            write_run(metrics_dir, "glue_mtl", config, task, seed, metrics, trainable=1_819_836, stored=1_819_836,
                      sampler=cfg.sampler, kind=cfg.kind, params={"multiplier": MULTIPLIER[config]})
    for name, offset in (("poly", 0.0), ("mhr", 0.1)):
        lines = []
        for step in range(1, 41):
            line = {"step": step, "loss": 2.0 - step / 40 + offset, "lr": 1e-3,
                    "task_loss": {"sst2": 1.5 - step / 50, "mrpc": 2.5 - step / 40} if step % 2 else {"sst2": 1.4}}
            if step % 10 == 0:  # the loop merges the alignment probe into the step's record
                line.update(grad_cos_mean=0.1 * step / 10 - offset, grad_cos={"mrpc|sst2": 0.1})
            lines.append(line)
        path = models_dir / "cross_task" / "pretrain" / name / "log.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # mhr routing: sst2 routes head 0 to skill 0 only and head 1 uniformly; mrpc is uniform everywhere
    layer = [[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]
    routing = {"tasks": ["sst2", "mrpc"], "n_heads": 2, "n_skills": 2, "layers": {"l0.query": layer, "l1.query": layer}}
    (models_dir / "cross_task" / "pretrain" / "mhr" / "routing.json").write_text(json.dumps(routing))
    return metrics_dir, models_dir


def run_report(params: Params, metrics_dir: Path, models_dir: Path, out: Path) -> None:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = parser.parse_args(["--metrics-dir", str(metrics_dir), "--models-dir", str(models_dir), "--out", str(out)])
    report.run(params, args)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    metrics_dir, models_dir = build_inputs(root)
    run_report(make_params(), metrics_dir, models_dir, root / "results")
    return root / "results"


def sd(*values: float) -> float:
    return float(np.std(values, ddof=1))


# ---- tables ----

def test_fewshot_table_values(built: Path) -> None:
    frame = pd.read_csv(built / "tables" / "cross_task_fewshot.csv")
    assert list(frame["method"]) == ["poly", "mhr", "lora_scratch"]  # params order
    poly = frame.set_index("method").loc["poly"]
    # stale files (seed 7, k=16 on rte, removed_method) are not in: rte = mean(0.60, 0.64)
    assert poly["rte"] == pytest.approx(62.0)
    assert poly["rte_std"] == pytest.approx(round(sd(60, 64), 2))
    assert poly["cb"] == pytest.approx(52.0)
    # average: per-seed averages 0.55 and 0.59 -> 57.0 ± sd
    assert poly["average"] == pytest.approx(57.0)
    assert poly["average_std"] == pytest.approx(round(sd(55, 59), 2))
    assert (poly["trainable_per_task"], poly["stored_per_task"]) == (1000, 9000)
    mhr = frame.set_index("method").loc["mhr"]
    assert mhr["average"] == pytest.approx(73.5)  # (0.75 + 0.72) / 2
    assert mhr["average_std"] == pytest.approx(round(sd(75, 72), 2))
    lora = frame.set_index("method").loc["lora_scratch"]
    assert lora["rte"] == pytest.approx(54.0)
    assert math.isnan(lora["cb"]) and math.isnan(lora["average"])  # missing task: no average
    assert "removed_method" not in set(frame["method"])

    md = (built / "tables" / "cross_task_fewshot.md").read_text()
    assert "| Method | Trainable / task | Stored / task | RTE | CB | Average |" in md
    assert f"| poly | 1.0K | 9.0K | 62.0 ± {sd(60, 64):.1f} | 52.0 ± {sd(50, 54):.1f} | 57.0 ± {sd(55, 59):.1f} |" in md
    assert "| mhr | 2.50M | 2.50M | 68.0 ± 2.8 | 79.0 ± 1.4 | 73.5 ± 2.1 |" in md
    assert "| lora_scratch | 295.0K | 295.0K | 54.0 ± 2.8 | — | — |" in md
    assert "seeds: 42, 1024" in md and "RTE 32, CB 16" in md


def test_zeroshot_table(built: Path) -> None:
    md = (built / "tables" / "cross_task_zeroshot.md").read_text()
    assert "| mtl_lora_zs | — | — | — | — | — |" in md  # declared, never evaluated
    assert "| mhr_mu_zs | 0 | 0 | 55.0 | 45.0 | 50.0 |" in md  # one seed: no ± shown
    frame = pd.read_csv(built / "tables" / "cross_task_zeroshot.csv").set_index("method")
    assert frame.loc["mhr_mu_zs", "average"] == pytest.approx(50.0)
    assert frame.loc["mhr_mu_zs", "average_std"] == pytest.approx(0.0)


def test_glue_table(built: Path) -> None:
    frame = pd.read_csv(built / "tables" / "glue_mtl.csv").set_index("config")
    assert list(frame.index) == ["pal", "pal_sqrt", "low_rank"]
    pal = frame.loc["pal"]
    assert (pal["cola_mcc"], pal["mrpc_f1"], pal["mrpc_accuracy"]) == pytest.approx((40.0, 80.0, 70.0))
    assert (pal["stsb_pearson"], pal["stsb_spearman"]) == pytest.approx((86.0, 84.0))
    # GLUE-style average of primaries: (0.40 + 0.75 + 0.85) / 3
    assert pal["average"] == pytest.approx(round(200 / 3, 2))
    assert pal["multiplier"] == pytest.approx(1.13)
    assert pal["trainable_per_task"] == 1_819_836
    assert (pal["sampler"], pal["kind"]) == ("annealed", "pal")
    md = (built / "tables" / "glue_mtl.md").read_text()
    assert "| Config | Sampler | Params (× base) | Trainable / task | CoLA MCC | MRPC F1/Acc | STS-B P/S | Average |" in md
    assert "| pal | annealed | 1.13× | 1.82M | 40.0 | 80.0 / 70.0 | 86.0 / 84.0 | 66.7 |" in md


def test_sampler_ablation_table(built: Path) -> None:
    frame = pd.read_csv(built / "tables" / "sampler_ablation.csv")
    # low_rank has no sibling with another sampler: not in the ablation
    assert list(frame["config"]) == ["pal", "pal_sqrt"]
    assert list(frame["sampler"]) == ["annealed", "sqrt"]
    assert frame["group"].nunique() == 1 and frame["group"][0].startswith("pal")
    sqrt = frame.set_index("config").loc["pal_sqrt"]
    assert (sqrt["cola"], sqrt["mrpc"], sqrt["stsb"]) == pytest.approx((30.0, 80.0, 79.0))
    assert sqrt["average"] == pytest.approx(63.0)  # (0.30 + 0.80 + 0.79) / 3


# ---- metrics.json ----

def test_metrics_json(built: Path) -> None:
    text = (built / "metrics.json").read_text()
    metrics = json.loads(text)
    assert list(metrics) == sorted(metrics)
    assert metrics["cross_task_fewshot/poly/rte/accuracy"] == pytest.approx(0.62)
    assert metrics["cross_task_fewshot/poly/rte/accuracy_std"] == pytest.approx(sd(0.60, 0.64), abs=1e-6)
    assert metrics["cross_task_fewshot/poly/rte/primary"] == pytest.approx(0.62)
    assert metrics["cross_task_fewshot/poly/average"] == pytest.approx(0.57)
    assert metrics["cross_task_fewshot/poly/average_std"] == pytest.approx(sd(0.55, 0.59), abs=1e-6)
    assert metrics["cross_task_fewshot/mhr/average"] == pytest.approx(0.735)
    assert "cross_task_fewshot/lora_scratch/average" not in metrics
    assert metrics["cross_task_zeroshot/mhr_mu_zs/average"] == pytest.approx(0.50)
    assert metrics["glue_mtl/pal/mrpc/f1"] == pytest.approx(0.80)
    assert metrics["glue_mtl/pal/mrpc/primary"] == pytest.approx(0.75)
    assert metrics["glue_mtl/pal/average"] == pytest.approx(round(2 / 3, 6))
    assert not any(k.startswith("cross_task_fewshot/removed_method") for k in metrics)
    assert all(isinstance(v, float) for v in metrics.values())


# ---- plots ----

EXPECTED_PLOTS = [
    "accuracy_cross_task_fewshot", "accuracy_cross_task_zeroshot", "accuracy_glue_mtl", "routing_mhr",
    "routing_entropy", "alignment_cross_task", "learning_curves_cross_task", "score_vs_multiplier_glue_mtl",
]


def test_plots_are_valid_pngs(built: Path) -> None:
    import matplotlib.image

    pngs = sorted(p.stem for p in (built / "plots").glob("*.png"))
    assert pngs == sorted(EXPECTED_PLOTS)
    for stem in EXPECTED_PLOTS:
        path = built / "plots" / f"{stem}.png"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, stem
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300, stem
        assert image[..., :3].std() > 0.05, f"{stem} looks blank"
        assert (built / "plots" / "data" / f"{stem}.csv").is_file()


def test_plot_data_files(built: Path) -> None:
    data = built / "plots" / "data"
    acc = pd.read_csv(data / "accuracy_cross_task_fewshot.csv").set_index("entry")
    assert acc.loc["mhr | average", "score"] == pytest.approx(73.5)
    assert acc.loc["poly | rte", "std"] == pytest.approx(sd(60, 64), abs=1e-4)
    assert "lora_scratch | average" not in acc.index  # no average without every task
    entropy = pd.read_csv(data / "routing_entropy.csv").set_index("entry")
    # sst2: head 0 one-hot (0 nats), head 1 uniform (log 2), same in both layers -> log 2 / 2
    assert entropy.loc["mhr | sst2", "entropy"] == pytest.approx(math.log(2) / 2, abs=1e-6)
    assert entropy.loc["mhr | sst2", "entropy_normalized"] == pytest.approx(0.5)
    assert entropy.loc["mhr | mrpc", "entropy_normalized"] == pytest.approx(1.0)
    assert entropy.loc["mhr | average", "entropy_normalized"] == pytest.approx(0.75)
    routing = pd.read_csv(data / "routing_mhr.csv")
    cell = routing[(routing.task == "sst2") & (routing.head_group == "head 0") & (routing.skill == 0)]
    assert cell["probability"].item() == pytest.approx(1.0)
    align = pd.read_csv(data / "alignment_cross_task.csv")
    assert list(align.columns) == ["step", "poly", "mhr"]
    assert list(align["step"]) == [10, 20, 30, 40]
    assert list(align["poly"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    curves = pd.read_csv(data / "learning_curves_cross_task.csv")
    assert {"step", "poly/sst2", "poly/mrpc", "poly/all", "mhr/sst2"} <= set(curves.columns)
    assert list(curves["step"]) == list(range(1, 41))
    # mrpc is logged on odd steps only: blank on even steps, not a made-up value
    assert curves["poly/mrpc"].isna().tolist() == [s % 2 == 0 for s in range(1, 41)]
    assert curves["poly/all"][0] == pytest.approx(2.0 - 1 / 40)  # debiased EMA starts at the first value


def test_score_vs_multiplier_data(built: Path) -> None:
    frame = pd.read_csv(built / "plots" / "data" / "score_vs_multiplier_glue_mtl.csv")
    assert list(frame.columns) == ["config", "kind", "family", "sampler", "multiplier", "average", "average_std", "n_seeds"]
    assert list(frame["config"]) == ["pal", "pal_sqrt", "low_rank"]  # params order
    rows = frame.set_index("config")
    assert list(rows["multiplier"]) == pytest.approx([1.13, 1.13, 1.1])
    # average over tasks of the primary (mean of the task's metrics), ×100
    assert rows.loc["pal", "average"] == pytest.approx((40 + (80 + 70) / 2 + (86 + 84) / 2) / 3, abs=1e-4)  # 66.6667
    assert rows.loc["pal_sqrt", "average"] == pytest.approx((30 + (84 + 76) / 2 + (80 + 78) / 2) / 3, abs=1e-4)  # 63.0
    # low_rank, two seeds: seed 0 (20 + 70 + 70) / 3 = 53.33, seed 1 (26 + 74 + 73) / 3 = 57.67
    assert rows.loc["low_rank", "average"] == pytest.approx(55.5, abs=1e-4)
    assert rows.loc["low_rank", "average_std"] == pytest.approx(sd(160 / 3, 173 / 3), abs=1e-4)  # 3.0641
    assert math.isnan(rows.loc["pal", "average_std"]) and math.isnan(rows.loc["pal_sqrt", "average_std"])  # one seed
    assert list(rows["n_seeds"]) == [1, 1, 2]
    assert list(rows["kind"]) == ["pal", "pal", "low_rank"]
    assert set(rows["family"]) == {"within layers"}
    assert list(rows["sampler"]) == ["annealed", "sqrt", "annealed"]


def test_score_vs_multiplier_agrees_with_the_table(built: Path) -> None:
    table = pd.read_csv(built / "tables" / "glue_mtl.csv").set_index("config")
    plot = pd.read_csv(built / "plots" / "data" / "score_vs_multiplier_glue_mtl.csv").set_index("config")
    assert list(plot.index) == list(table.index)
    for config in plot.index:
        assert plot.loc[config, "average"] == pytest.approx(table.loc[config, "average"], abs=0.005), config  # table: 2 decimals
        assert plot.loc[config, "multiplier"] == pytest.approx(table.loc[config, "multiplier"]), config
    assert plot.loc["low_rank", "average_std"] == pytest.approx(table.loc["low_rank", "average_std"], abs=0.005)
    metrics = json.loads((built / "metrics.json").read_text())
    for config in plot.index:
        assert plot.loc[config, "average"] == pytest.approx(100 * metrics[f"glue_mtl/{config}/average"], abs=1e-3), config


def test_kind_families_match_the_adapters() -> None:
    from pipeline_src.adapters.pal import TOP_KINDS, WITHIN_KINDS
    from pipeline_src.config import TASK_SPECIFIC_KINDS
    from pipeline_src.report.plots import KIND_FAMILIES, kind_family

    assert set(KIND_FAMILIES["within layers"]) == set(WITHIN_KINDS)
    assert set(KIND_FAMILIES["on top"]) == set(TOP_KINDS)
    assert set(KIND_FAMILIES["baselines"]) == set(TASK_SPECIFIC_KINDS) - set(WITHIN_KINDS) - set(TOP_KINDS)
    assert [kind_family(k) for k in ("houlsby", "top_proj", "separate", "new_kind")] == \
        ["within layers", "on top", "baselines", "other"]


def test_score_vs_multiplier_leaves_out_incomplete_configs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    configs = {"pal": {"kind": "pal", "d_s": 96}, "top_proj": {"kind": "top_proj", "d_s": 96},
               "separate": {"kind": "separate"}}
    params = make_params(configs)
    metrics_dir = tmp_path / "metrics"
    write_run(metrics_dir, "cross_task_fewshot", "poly", "rte", 42, {"accuracy": 0.6}, k=32)
    scores = {"pal": 0.5, "top_proj": 0.4, "separate": 0.6}
    multipliers = {"pal": 1.13, "top_proj": 1.1, "separate": 3.0 * 1.01}  # 3 tasks: separate ~3×, log x axis
    for config, cfg in params.glue_mtl.configs.items():
        for task, metrics in (("cola", {"mcc": scores[config]}), ("mrpc", {"f1": scores[config], "accuracy": scores[config]}),
                              ("stsb", {"pearson": scores[config], "spearman": scores[config]})):
            if config == "top_proj" and task == "stsb":
                continue  # no STS-B: no average, not plotted
            write_run(metrics_dir, "glue_mtl", config, task, 0, metrics, sampler=cfg.sampler, kind=cfg.kind,
                      params={"multiplier": multipliers[config]})
    run_report(params, metrics_dir, tmp_path / "models", tmp_path / "out")
    assert "glue_mtl config(s) top_proj lack results on some task: left out of the score-vs-multiplier plot" \
        in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "out" / "plots" / "data" / "score_vs_multiplier_glue_mtl.csv").set_index("config")
    assert list(frame.index) == ["pal", "separate"]
    assert list(frame["family"]) == ["within layers", "baselines"]
    assert list(frame["multiplier"]) == pytest.approx([1.13, 3.03])
    assert list(frame["average"]) == pytest.approx([50.0, 60.0])
    assert (tmp_path / "out" / "plots" / "score_vs_multiplier_glue_mtl.png").read_bytes().startswith(PNG_MAGIC)


def outputs(root: Path) -> dict[Path, bytes]:
    """Every file the report wrote under `root` (the fixture's inputs under metrics/ excluded)."""
    files = (p for p in sorted(root.rglob("*")) if p.is_file())
    return {p.relative_to(root): p.read_bytes() for p in files if p.relative_to(root).parts[0] != "metrics"}


def test_report_is_deterministic(built: Path, tmp_path: Path) -> None:
    metrics_dir, models_dir = build_inputs(tmp_path)
    run_report(make_params(), metrics_dir, models_dir, tmp_path / "again")
    assert outputs(built) == outputs(tmp_path / "again")  # byte for byte, PNGs included


# ---- optional inputs, errors ----

def test_only_fewshot_results_skips_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    metrics_dir = tmp_path / "metrics"
    write_run(metrics_dir, "cross_task_fewshot", "poly", "rte", 42, {"accuracy": 0.6}, k=32)
    stale = tmp_path / "out" / "plots" / "old_figure.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    run_report(make_params(), metrics_dir, tmp_path / "no_models", tmp_path / "out")
    notes = capsys.readouterr().out
    assert "no cross_task_zeroshot results: table skipped" in notes
    assert "no glue_mtl results: GLUE table skipped" in notes
    assert "no glue_mtl results: score-vs-multiplier plot skipped" in notes
    assert "no log.jsonl for cross_task pre-training run(s) lora, poly, mhr" in notes
    assert sorted(p.name for p in (tmp_path / "out" / "tables").iterdir()) == ["cross_task_fewshot.csv", "cross_task_fewshot.md"]
    assert sorted(p.name for p in (tmp_path / "out" / "plots").glob("*.png")) == ["accuracy_cross_task_fewshot.png"]
    assert not stale.exists()  # plots/ is replaced whole
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["cross_task_fewshot/poly/rte/accuracy_std"] == 0.0  # one seed


def test_no_metrics_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no metrics files"):
        run_report(make_params(), tmp_path / "empty", tmp_path / "models", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mutate, key", [
    (lambda o: o.pop("primary"), "key 'primary' is missing"),
    (lambda o: o["metrics"].update(accuracy="high"), "key 'metrics.accuracy' must be a finite number"),
    (lambda o: o.update(seed="42"), "key 'seed' must be an integer"),
    (lambda o: o.update(experiment="fewshot"), "key 'experiment' must be one of"),
    (lambda o: o["params"].pop("stored_per_task"), "key 'params.stored_per_task' is missing"),
    (lambda o: o.update(primary=0.9), "key 'primary' is 0.9 but the mean of rte's metrics"),
    (lambda o: o.update(method="mhr"), "key 'method' is 'mhr' but the file lies under folder 'poly'"),
    (lambda o: o.update(k=16), "key 'k' is 16 but the file name says k32"),
])
def test_malformed_metrics_file(tmp_path: Path, mutate, key: str) -> None:
    metrics_dir = tmp_path / "metrics"
    write_run(metrics_dir, "cross_task_fewshot", "mhr", "cb", 42, {"accuracy": 0.8}, k=16)
    path = write_run(metrics_dir, "cross_task_fewshot", "poly", "rte", 42, {"accuracy": 0.6}, k=32)
    obj = json.loads(path.read_text())
    mutate(obj)
    path.write_text(json.dumps(obj))
    with pytest.raises(PipelineError) as info:
        run_report(make_params(), metrics_dir, tmp_path / "models", tmp_path / "out")
    message = str(info.value)
    assert message.startswith(str(path)) and key in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_invalid_json_and_glue_keys(tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "cross_task_fewshot" / "poly" / "rte" / "k32-s42.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(PipelineError, match=r"k32-s42\.json: not valid JSON"):
        load_runs(tmp_path / "metrics")
    glue = write_run(tmp_path / "m2", "glue_mtl", "pal", "cola", 0, {"mcc": 0.4}, sampler="sqrt", kind="pal")
    with pytest.raises(PipelineError, match="key 'params.multiplier' is missing"):
        load_run(glue)


def test_malformed_routing_and_log(tmp_path: Path) -> None:
    metrics_dir, models_dir = build_inputs(tmp_path)
    routing = models_dir / "cross_task" / "pretrain" / "mhr" / "routing.json"
    obj = json.loads(routing.read_text())
    obj["layers"]["l1.query"] = [[[0.9, 0.9], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]
    routing.write_text(json.dumps(obj))
    with pytest.raises(PipelineError, match=r"routing\.json: key 'layers\.l1\.query' must hold probabilities"):
        run_report(make_params(), metrics_dir, models_dir, tmp_path / "out")
    log = models_dir / "cross_task" / "pretrain" / "poly" / "log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": "nan?"}\n')
    with pytest.raises(PipelineError, match=r"log\.jsonl:2: key 'loss' must be a number"):
        load_log(log)


def test_resumed_log_keeps_the_later_lines(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5},
             {"step": 2, "epoch": 1, "grad_cos_mean": 0.25}, {"step": 3, "epoch": 1}]
    log.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    parsed = load_log(log)
    assert parsed.steps == [1, 2, 3] and parsed.loss == [3.0, 2.0, 1.5]
    assert parsed.alignment_steps == [2] and parsed.alignment_cosine == [0.25]


def test_ema_is_debiased() -> None:
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])
    # raw accumulator: 0.1*2 = 0.2, then 0.9*0.2 + 0.1*4 = 0.58; debiased by 1 - 0.9**2 = 0.19
    assert ema([2.0, 4.0], 0.9)[1] == pytest.approx(0.58 / 0.19)
    assert math.isnan(ema([1.0, float("nan"), 1.0], 0.5)[1])
