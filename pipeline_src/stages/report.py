"""Stage report: tables (Markdown + CSV), plots (PNG + CSV data) and results/metrics.json from every evaluated run.

Reads results/metrics/<experiment>/<method>/<task>/[k<k>-]s<seed>.json and, when present,
models/<cross_task|glue_mtl>/pretrain/<name>/{log.jsonl, routing.json}. Writes:
  <out>/tables/{cross_task_fewshot,cross_task_zeroshot,glue_mtl,sampler_ablation}.{md,csv}
  <out>/plots/*.png and <out>/plots/data/*.csv (glue_mtl: accuracy bars and score_vs_multiplier_glue_mtl,
      each config's average dev score vs its parameter multiplier, the PALs trade-off)
  <out>/metrics.json
Only runs the current params describe are reported (methods, tasks, few-shot seeds and k):
files left behind by removed methods or older settings are listed in a note, not averaged in.
A missing optional input (no zero-shot or glue_mtl results, no logs, no routing) skips its
table or plot with a note. All inputs are validated before anything is written; tables/ and
plots/ are each replaced whole, so a stale figure never survives a rerun.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline_src.config import Params
from pipeline_src.errors import PipelineError
from pipeline_src.io_utils import atomic_output, write_json
from pipeline_src.report.load import Routing, RunResult, TrainingLog, load_log, load_routing, load_runs
from pipeline_src.report.plots import (
    plot_accuracy, plot_alignment, plot_learning_curves, plot_routing, plot_routing_entropy, plot_score_vs_multiplier,
)
from pipeline_src.report.tables import (
    Results, Table, aggregate, average_over_tasks, cross_task_table, glue_table, layout, metrics_summary,
    sampler_ablation_table, write_table,
)

CONFIG_CHECKS = {"check_data": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-dir", default="results/metrics", help="per-run metrics files (default: results/metrics)")
    parser.add_argument("--models-dir", default="models", help="pre-training outputs (default: models)")
    parser.add_argument("--out", default="results", help="where tables/, plots/ and metrics.json go (default: results)")


def note(message: str) -> None:
    print(f"report: {message}")


def declared(params: Params) -> dict[str, tuple[list[str], list[str]]]:
    """experiment -> (methods, tasks) in params order: the rows and columns of its table."""
    ct = params.cross_task
    out = {
        "cross_task_fewshot": (list(ct.adapt_methods), list(ct.heldout_tasks)),
        "cross_task_zeroshot": (list(ct.zeroshot_methods), list(ct.heldout_tasks)),
    }
    if params.glue_mtl is not None:
        out["glue_mtl"] = (list(params.glue_mtl.configs), list(params.glue_mtl.tasks))
    return out


def select_runs(runs: list[RunResult], params: Params) -> tuple[list[RunResult], list[RunResult]]:
    """(kept, ignored): runs of the methods, tasks, seeds and shot counts the params describe."""
    expected = declared(params)
    seeds = set(params.cross_task.fewshot.seeds)
    kept, ignored = [], []
    for run in runs:
        methods, tasks = expected.get(run.experiment, ([], []))
        ok = run.method in methods and run.task in tasks
        if ok and run.experiment == "cross_task_fewshot":
            ok = run.seed in seeds and run.k == params.task_shots(run.task)
        (kept if ok else ignored).append(run)
    return kept, ignored


def glue_groups(params: Params) -> dict[str, str]:
    """config -> label shared by configs equal in everything but the sampler (for the ablation table)."""
    if params.glue_mtl is None:
        return {}
    return {
        name: f"{c.kind} ({c.placement}, layers={c.layers}, d_s={c.d_s}, heads={c.n_attention_heads})"
        for name, c in params.glue_mtl.configs.items()
    }


def load_pretraining(models_dir: Path, params: Params) -> tuple[dict[str, dict[str, TrainingLog]], dict[str, Routing]]:
    """({experiment: {name: log}}, {inventory: routing}) for the pre-training runs params declare."""
    names = {"cross_task": list(params.cross_task.inventories)}
    if params.glue_mtl is not None:
        names["glue_mtl"] = list(params.glue_mtl.configs)
    logs: dict[str, dict[str, TrainingLog]] = {}
    for experiment, runs in names.items():
        found = {n: load_log(p) for n in runs if (p := models_dir / experiment / "pretrain" / n / "log.jsonl").is_file()}
        missing = [n for n in runs if n not in found]
        if missing:
            note(f"no log.jsonl for {experiment} pre-training run(s) {', '.join(missing)}: left out of the curves")
        if found:
            logs[experiment] = found
    routings: dict[str, Routing] = {}
    for name in names["cross_task"]:
        path = models_dir / "cross_task" / "pretrain" / name / "routing.json"
        if path.is_file() and not json.loads(path.read_text()).get("layers"):
            continue  # an inventory without routing (plain LoRA, K=1): nothing to plot
        if path.is_file():
            routings[name] = load_routing(path)
        else:
            note(f"no {path}: no routing plots for inventory '{name}'")
    return logs, routings


def glue_plots(results: Results, order: dict[str, tuple[list[str], list[str]]],
               layouts: dict[str, tuple[list[str], list[str]]], plots_dir: Path) -> list[Path]:
    """The score-vs-multiplier plot of glue_mtl (its accuracy bars come with the other experiments'),
    or a note saying why it is skipped or who is left out of it."""
    if "glue_mtl" not in order:
        return []  # already noted with the tables
    if "glue_mtl" not in layouts:
        note("no glue_mtl results: score-vs-multiplier plot skipped")
        return []
    configs, tasks = layouts["glue_mtl"]
    incomplete = [c for c in configs if average_over_tasks(results, "glue_mtl", c, tasks) is None]
    written = plot_score_vs_multiplier(results, configs, tasks, plots_dir)
    if not written:
        note("no glue_mtl config has results on every task: score-vs-multiplier plot skipped")
    elif incomplete:
        note(f"glue_mtl config(s) {', '.join(incomplete)} lack results on some task: left out of the score-vs-multiplier plot")
    return written


def run(params: Params, args: argparse.Namespace) -> None:
    metrics_dir, models_dir, out = Path(args.metrics_dir), Path(args.models_dir), Path(args.out)

    # 1. read and check every input before writing anything
    runs = load_runs(metrics_dir)
    if not runs:
        raise PipelineError(f"{metrics_dir}: no metrics files (<experiment>/<method>/<task>/k<k>-s<seed>.json) found")
    kept, ignored = select_runs(runs, params)
    if ignored:
        note(f"{len(ignored)} metrics file(s) not described by the params are left out, e.g. {ignored[0].path}")
    results = aggregate(kept)
    order = declared(params)
    layouts = {exp: layout(results, exp, *order[exp]) for exp in order}
    layouts = {exp: rows_cols for exp, rows_cols in layouts.items() if rows_cols[0]}
    logs, routings = load_pretraining(models_dir, params)

    # 2. tables
    tables: list[Table] = []
    for experiment in ("cross_task_fewshot", "cross_task_zeroshot"):
        table = cross_task_table(results, experiment, *order[experiment])
        if table is None:
            note(f"no {experiment} results: table skipped")
        else:
            tables.append(table)
    if "glue_mtl" in order:
        glue = glue_table(results, *order["glue_mtl"])
        ablation = sampler_ablation_table(results, *order["glue_mtl"], group_of=glue_groups(params))
        if glue is None:
            note("no glue_mtl results: GLUE table skipped")
        else:
            tables.append(glue)
        if ablation is None:
            note("no glue_mtl configs that differ only in the sampler: sampler ablation skipped")
        else:
            tables.append(ablation)
    else:
        note("no glue_mtl section in params: GLUE tables and plots skipped")

    written: list[Path] = []
    with atomic_output(out / "tables") as tables_dir, atomic_output(out / "plots") as plots_dir:
        tables_dir.mkdir()
        plots_dir.mkdir()
        for table in tables:
            written += write_table(table, tables_dir)

        # 3. plots: only the methods with results, so legends carry no empty entries
        for experiment, (methods, tasks) in layouts.items():
            with_results = [m for m in methods if any((experiment, m, t) in results for t in tasks)]
            written += plot_accuracy(results, experiment, with_results, tasks, plots_dir)
        written += glue_plots(results, order, layouts, plots_dir)
        for name, routing in routings.items():
            if routing.n_skills == 1:
                note(f"inventory '{name}' has one skill: nothing to route, no heatmap")
                continue
            written += plot_routing(routing, name, plots_dir)
        written += plot_routing_entropy(routings, plots_dir)
        for experiment, experiment_logs in logs.items():
            alignment = plot_alignment(experiment_logs, experiment, plots_dir)
            if not alignment:
                note(f"no gradient-alignment lines in the {experiment} logs: alignment plot skipped")
            written += alignment + plot_learning_curves(experiment_logs, experiment, plots_dir)

    # 4. flat metrics for `dvc metrics diff`
    summary = metrics_summary(results, layouts)
    write_json(out / "metrics.json", summary)
    n_tables = sum(p.suffix == ".md" for p in written)
    n_plots = sum(p.suffix == ".png" for p in written)
    print(f"report: {len(kept)} runs -> {n_tables} tables, {n_plots} plots, {len(summary)} metrics under {out}")
