"""Report figures (PNG, matplotlib Agg) and the data behind each one (CSV, for `dvc plots show/diff`).

Every function writes `<out_dir>/<name>.png` and `<out_dir>/data/<name>.csv` atomically and
returns the paths. The CSVs are shaped for DVC's Vega-Lite templates: one file per figure,
either long (one row per bar, an `entry` label column for bar_horizontal) or wide (an x column
`step` and one column per series, blank where a series has no point at that step).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report runs on CPU nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline_src.io_utils import atomic_output  # noqa: E402
from pipeline_src.report.load import Routing, TrainingLog  # noqa: E402
from pipeline_src.report.tables import (  # noqa: E402
    EXPERIMENT_TITLES, SCALE, Results, Stat, average_over_tasks, display,
)

DPI = 120
# no matplotlib version in the PNG: the same data gives the same bytes across upgrades
PNG_METADATA = {"Software": None}
MAX_HEAD_GROUPS = 8
ANNOTATE_MAX_CELLS = 120
# glue_mtl kinds by where their task-specific parameters go: pipeline_src.adapters.pal's WITHIN_KINDS
# and TOP_KINDS, then the baselines of config.TASK_SPECIFIC_KINDS (spelled out: importing pal.py
# would pull torch into the report; tests/test_report.py checks the two agree)
KIND_FAMILIES = {
    "within layers": ("low_rank", "mha", "pal", "ffn", "houlsby", "lhuc"),
    "on top": ("top_linear", "top_bert_layer", "top_proj"),
    "baselines": ("full_ft", "heads_only", "separate"),
}
FAMILY_STYLES = {  # colour, marker: told apart in greyscale too
    "within layers": ("tab:blue", "o"), "on top": ("tab:orange", "s"), "baselines": ("tab:gray", "^"),
    "other": ("tab:purple", "D"),
}
MARKER_SIZE = 8  # points
LOG_X_RATIO = 3.0  # multipliers spanning more than this (e.g. `separate` at N×) get a log x axis


def save_figure(fig: plt.Figure, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)
    return path


def save_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_output(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")
    return path


def _grouped_bars(ax: plt.Axes, groups: Sequence[str], series: Mapping[str, Sequence[Stat | None]], scale: float) -> None:
    """One cluster of bars per group, one bar per series; error bars where there are 2+ seeds."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, stats) in enumerate(series.items()):
        pos = [x[j] - 0.4 + width * (i + 0.5) for j, s in enumerate(stats) if s is not None]
        means = [s.mean * scale for s in stats if s is not None]
        errs = [s.std * scale if s.n > 1 and math.isfinite(s.std) else 0.0 for s in stats if s is not None]
        ax.bar(pos, means, width, yerr=errs if any(errs) else None, capsize=2, label=label)
    ax.set_xticks(x, groups)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def plot_accuracy(results: Results, experiment: str, methods: Sequence[str], tasks: Sequence[str], out_dir: str | Path) -> list[Path]:
    """Bars of each method's primary score per task and on average, ± std over seeds.

    Data: data/accuracy_<experiment>.csv, columns method, task, entry ("<method> | <task>"),
    score (×100), std (×100, blank for one seed), n_seeds; task "average" included.
    """
    out_dir = Path(out_dir)
    groups = [*tasks, "average"]
    series: dict[str, list[Stat | None]] = {}
    rows = []
    for method in methods:
        stats: list[Stat | None] = [
            results[(experiment, method, t)].primary if (experiment, method, t) in results else None for t in tasks
        ]
        stats.append(average_over_tasks(results, experiment, method, tasks))
        series[method] = stats
        for task, stat in zip(groups, stats):
            if stat is None:
                continue
            std = round(stat.std * SCALE, 4) if stat.n > 1 and math.isfinite(stat.std) else None
            rows.append({"method": method, "task": task, "entry": f"{method} | {task}",
                         "score": round(stat.mean * SCALE, 4), "std": std, "n_seeds": stat.n})
    fig, ax = plt.subplots(figsize=(min(20.0, 2.5 + len(groups) * (0.5 + 0.22 * len(methods))), 4.5))
    _grouped_bars(ax, [display(t) if t != "average" else "Average" for t in groups], series, SCALE)
    ax.set_ylabel("score ×100 (primary metric)")
    ax.set_xlabel("task")
    ax.set_title(f"{EXPERIMENT_TITLES.get(experiment, experiment)}: mean ± std over seeds")
    ax.legend(title="method", ncol=min(4, len(methods)), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    name = f"accuracy_{experiment}"
    columns = ["method", "task", "entry", "score", "std", "n_seeds"]
    return [save_figure(fig, out_dir / f"{name}.png"), save_csv(pd.DataFrame(rows, columns=columns), out_dir / "data" / f"{name}.csv")]


# ---- routing ----

def head_groups(n_heads: int, max_groups: int = MAX_HEAD_GROUPS) -> list[np.ndarray]:
    """Contiguous groups of heads (all heads when h <= max_groups): h = 64 cannot be read as 64 panels."""
    return [g for g in np.array_split(np.arange(n_heads), min(n_heads, max_groups)) if len(g)]


def _group_label(heads: np.ndarray) -> str:
    return f"head {heads[0]}" if len(heads) == 1 else f"heads {heads[0]}-{heads[-1]}"


def routing_matrices(routing: Routing, max_groups: int = MAX_HEAD_GROUPS) -> np.ndarray:
    """[groups, tasks, skills]: probabilities averaged over layers and over the heads of each group."""
    over_layers = routing.probs.mean(axis=0)  # [tasks, heads, skills]
    return np.stack([over_layers[:, g, :].mean(axis=1) for g in head_groups(routing.n_heads, max_groups)])


def routing_entropy(routing: Routing) -> np.ndarray:
    """[tasks]: entropy (nats) of each (layer, head)'s skill distribution, averaged over layers and heads.

    Computed before averaging: averaging the distributions first would make sharp but different
    per-layer choices look uniform.
    """
    p = routing.probs
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return (-plogp.sum(axis=-1)).mean(axis=(0, 2))


def plot_routing(routing: Routing, name: str, out_dir: str | Path, max_groups: int = MAX_HEAD_GROUPS) -> list[Path]:
    """Heatmaps tasks × skills, one panel per head group, one shared colour scale.

    Data: data/routing_<name>.csv, columns task, head_group, skill, probability.
    """
    out_dir = Path(out_dir)
    mats = routing_matrices(routing, max_groups)
    groups = head_groups(routing.n_heads, max_groups)
    ncols = min(len(groups), 4)
    nrows = math.ceil(len(groups) / ncols)
    n_tasks, n_skills = len(routing.tasks), routing.n_skills
    panel_w, panel_h = 1.0 + 0.45 * n_skills, 0.8 + 0.35 * n_tasks
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.5 + panel_w * ncols, 0.8 + panel_h * nrows),
                             squeeze=False, constrained_layout=True)
    vmax = float(mats.max())
    annotate = n_tasks * n_skills <= ANNOTATE_MAX_CELLS
    image = None
    for idx, ax in enumerate(axes.ravel()):
        if idx >= len(groups):
            ax.axis("off")
            continue
        mat = mats[idx]
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(_group_label(groups[idx]), fontsize=9)
        ax.set_xticks(range(n_skills), [str(s) for s in range(n_skills)], fontsize=7)
        ax.set_yticks(range(n_tasks), [display(t) for t in routing.tasks], fontsize=8)
        if idx % ncols:  # task names on the first column only
            ax.tick_params(labelleft=False)
        ax.set_xlabel("skill", fontsize=8)
        if annotate:
            for (i, j), value in np.ndenumerate(mat):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * vmax else "white")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="routing probability", shrink=0.8)
    fig.suptitle(f"Routing of inventory '{name}' (K={n_skills} skills, h={routing.n_heads} heads), "
                 f"averaged over {len(routing.layer_names)} layers")
    rows = [
        {"task": task, "head_group": _group_label(groups[g]), "skill": s, "probability": round(float(mats[g, t, s]), 6)}
        for g in range(len(groups)) for t, task in enumerate(routing.tasks) for s in range(n_skills)
    ]
    return [save_figure(fig, out_dir / f"routing_{name}.png"),
            save_csv(pd.DataFrame(rows, columns=["task", "head_group", "skill", "probability"]),
                     out_dir / "data" / f"routing_{name}.csv")]


def plot_routing_entropy(routings: Mapping[str, Routing], out_dir: str | Path) -> list[Path]:
    """Normalised routing entropy (1 = uniform over skills, 0 = one skill) per task, per inventory.

    Inventories with one skill have no routing and are left out. Data: data/routing_entropy.csv,
    columns inventory, task, entry, entropy (nats), entropy_normalized; task "average" included.
    """
    out_dir = Path(out_dir)
    usable = {name: r for name, r in routings.items() if r.n_skills > 1}
    if not usable:
        return []
    tasks = list(dict.fromkeys(t for r in usable.values() for t in r.tasks))
    groups = [*tasks, "average"]
    series: dict[str, list[Stat | None]] = {}
    rows = []
    for name, routing in usable.items():
        ent = dict(zip(routing.tasks, routing_entropy(routing).tolist()))
        ent["average"] = float(np.mean(list(ent.values())))
        max_ent = math.log(routing.n_skills)
        series[name] = [Stat(ent[t] / max_ent, 0.0, 1) if t in ent else None for t in groups]
        rows += [{"inventory": name, "task": t, "entry": f"{name} | {t}", "entropy": round(ent[t], 6),
                  "entropy_normalized": round(ent[t] / max_ent, 6)} for t in groups if t in ent]
    fig, ax = plt.subplots(figsize=(min(20.0, 2.5 + len(groups) * (0.5 + 0.25 * len(usable))), 4.0))
    _grouped_bars(ax, [display(t) if t != "average" else "Average" for t in groups], series, 1.0)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("entropy / log K (1 = uniform)")
    ax.set_xlabel("training task")
    ax.set_title("Routing entropy per inventory (mean over layers and heads)")
    ax.legend(title="inventory", fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=min(4, len(usable)))
    columns = ["inventory", "task", "entry", "entropy", "entropy_normalized"]
    return [save_figure(fig, out_dir / "routing_entropy.png"),
            save_csv(pd.DataFrame(rows, columns=columns), out_dir / "data" / "routing_entropy.csv")]


# ---- training logs ----

def ema(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard): no pull towards 0 at the start.
    Non-finite values (a diverged step) give NaN there and are not folded in."""
    out, acc, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        n += 1
        acc = weight * acc + (1.0 - weight) * value
        out.append(acc / (1.0 - weight**n))
    return out


def _wide(series: Mapping[str, pd.Series]) -> pd.DataFrame:
    """Columns step + one per series, on the union of steps (blank where a series has no point)."""
    frame = pd.DataFrame(dict(series)).sort_index()
    frame.index.name = "step"
    return frame.round(6).reset_index()


def plot_alignment(logs: Mapping[str, TrainingLog], experiment: str, out_dir: str | Path) -> list[Path]:
    """Mean pairwise cosine of task gradients vs step, one line per pre-training run.

    Data: data/alignment_<experiment>.csv, x `step`, one column per run. [] when no run probed it.
    """
    out_dir = Path(out_dir)
    runs = {name: log for name, log in logs.items() if log.alignment_steps}
    if not runs:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, log in runs.items():
        ax.plot(log.alignment_steps, log.alignment_cosine, marker="o", markersize=3, label=name)
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("mean cosine between task gradients")
    ax.set_title(f"Gradient alignment during pre-training ({experiment})")
    ax.grid(alpha=0.3)
    ax.legend(title="run", fontsize=8)
    data = _wide({name: pd.Series(log.alignment_cosine, index=log.alignment_steps) for name, log in runs.items()})
    name = f"alignment_{experiment}"
    return [save_figure(fig, out_dir / f"{name}.png"), save_csv(data, out_dir / "data" / f"{name}.csv")]


def plot_learning_curves(logs: Mapping[str, TrainingLog], experiment: str, out_dir: str | Path,
                         smoothing: float = 0.9) -> list[Path]:
    """Per-task training loss vs step (EMA-smoothed; raw values faint), one panel per run.

    Data: data/learning_curves_<experiment>.csv, x `step`, columns `<run>/<task>` and `<run>/all`
    (the total loss), smoothed. [] when no run logged a training step.
    """
    out_dir = Path(out_dir)
    runs = {name: log for name, log in logs.items() if log.steps}
    if not runs:
        return []
    tasks = sorted({t for log in runs.values() for losses in log.task_loss for t in losses})
    cmap = plt.get_cmap("tab10" if len(tasks) <= 10 else "tab20")
    colors = {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}
    ncols = min(len(runs), 3)
    nrows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.4 * nrows), squeeze=False, sharey=True,
                             constrained_layout=True)
    series: dict[str, pd.Series] = {}
    for ax, (name, log) in zip(axes.ravel(), runs.items()):
        for task in tasks:
            # a task is absent from the steps whose batch did not sample it: smooth its own points
            points = [(s, losses[task]) for s, losses in zip(log.steps, log.task_loss) if task in losses]
            if not points:
                continue
            steps, values = zip(*points)
            smooth = ema(values, smoothing)
            ax.plot(steps, values, color=colors[task], alpha=0.2, linewidth=0.8)
            ax.plot(steps, smooth, color=colors[task], linewidth=1.5, label=display(task))
            series[f"{name}/{task}"] = pd.Series(smooth, index=list(steps))
        total = ema(log.loss, smoothing)
        ax.plot(log.steps, total, color="black", linestyle="--", linewidth=1.2, label="all tasks")
        series[f"{name}/all"] = pd.Series(total, index=log.steps)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("training loss")
    for ax in axes.ravel()[len(runs):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    for ax in axes.ravel()[1:len(runs)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(6, len(labels)), fontsize=8)
    fig.suptitle(f"Pre-training loss per task ({experiment}; EMA smoothing {smoothing}, raw faint)")
    name = f"learning_curves_{experiment}"
    return [save_figure(fig, out_dir / f"{name}.png"), save_csv(_wide(series), out_dir / "data" / f"{name}.csv")]


# ---- glue_mtl: score vs parameters ----

def kind_family(kind: str | None) -> str:
    """'within layers', 'on top', 'baselines' (KIND_FAMILIES), or 'other' for a kind not listed."""
    return next((family for family, kinds in KIND_FAMILIES.items() if kind in kinds), "other")


def score_vs_multiplier_rows(results: Results, configs: Sequence[str], tasks: Sequence[str]) -> list[dict[str, object]]:
    """One row per config with a score on every task, in `configs` order: the data of the plot.

    multiplier: the mean over tasks of params.multiplier (as glue_table); average: the GLUE-style
    average_over_tasks (as glue_table and metrics.json), ×100, std blank for one seed.
    """
    experiment = "glue_mtl"
    rows = []
    for config in configs:
        avg = average_over_tasks(results, experiment, config, tasks)
        if avg is None:
            continue
        cells = [results[(experiment, config, task)] for task in tasks]
        multiplier = float(np.mean([c.params["multiplier"] for c in cells]))
        std = round(avg.std * SCALE, 4) if avg.n > 1 and math.isfinite(avg.std) else None
        rows.append({"config": config, "kind": cells[0].kind, "family": kind_family(cells[0].kind),
                     "sampler": cells[0].sampler, "multiplier": round(multiplier, 4),
                     "average": round(avg.mean * SCALE, 4), "average_std": std, "n_seeds": avg.n})
    return rows


# label offsets (points) tried in turn: right, left, above, below, then the diagonals
LABEL_OFFSETS = [(7, 0, "left", "center"), (-7, 0, "right", "center"), (0, 8, "center", "bottom"),
                 (0, -8, "center", "top"), (6, 6, "left", "bottom"), (-6, 6, "right", "bottom"),
                 (6, -6, "left", "top"), (-6, -6, "right", "top")]


def _overlap(a, b) -> float:
    """Area shared by two display-space boxes (matplotlib Bbox)."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax: plt.Axes, labels: Sequence[str], xs: Sequence[float], ys: Sequence[float], marker_px: float) -> None:
    """Name each point, at the first of LABEL_OFFSETS whose text hits no other label or point (else the
    least crowded): configs that differ only in the sampler share a multiplier and sit close."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    centres = ax.transData.transform(np.column_stack([xs, ys]))
    half = marker_px / 2
    taken = [Bbox.from_extents(cx - half, cy - half, cx + half, cy + half) for cx, cy in centres]
    for i, (label, x, y) in enumerate(zip(labels, xs, ys)):
        best, best_cost = None, math.inf
        for dx, dy, ha, va in LABEL_OFFSETS:
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=8)
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, other) for j, other in enumerate(taken) if j != i)
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (text, box), cost
            else:
                text.remove()
            if cost == 0:
                break
        taken.append(best[1])


def plot_score_vs_multiplier(results: Results, configs: Sequence[str], tasks: Sequence[str], out_dir: str | Path) -> list[Path]:
    """The PALs trade-off: each glue_mtl config's average dev score vs its parameter multiplier.

    One point per config with a score on every task (others are left out, as the table gives them
    no average), labelled with its name; colour and marker by family of kind (KIND_FAMILIES);
    error bars: std over seeds of the per-seed averages, where there are 2+ seeds.
    Data: data/score_vs_multiplier_glue_mtl.csv, columns config, kind, family, sampler,
    multiplier (× one base model), average (×100), average_std (×100, blank for one seed),
    n_seeds; the same numbers as the glue_mtl table. [] when no config has every task.
    """
    out_dir = Path(out_dir)
    rows = score_vs_multiplier_rows(results, configs, tasks)
    if not rows:
        return []
    xs = [float(r["multiplier"]) for r in rows]  # type: ignore[arg-type]
    ys = [float(r["average"]) for r in rows]  # type: ignore[arg-type]
    x_log = min(xs) > 0 and max(xs) / min(xs) > LOG_X_RATIO
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for family in [*KIND_FAMILIES, "other"]:
        members = [i for i, r in enumerate(rows) if r["family"] == family]
        if not members:
            continue
        color, marker = FAMILY_STYLES[family]
        errs = [float(rows[i]["average_std"]) if rows[i]["average_std"] is not None else 0.0 for i in members]  # type: ignore[arg-type]
        ax.errorbar([xs[i] for i in members], [ys[i] for i in members], yerr=errs if any(errs) else None,
                    fmt=marker, color=color, markersize=MARKER_SIZE, capsize=3, linestyle="none", label=family)
    if x_log:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    else:
        ax.xaxis.set_major_locator(mticker.MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set_xlim(ax.get_xlim())  # fixed before the labels are placed in display space
    ax.set_ylim(ax.get_ylim())
    _place_labels(ax, [str(r["config"]) for r in rows], xs, ys, marker_px=MARKER_SIZE * fig.dpi / 72)
    ax.set_xlabel("parameters for all tasks (× one base model)")
    ax.set_ylabel(f"average score ×100 (primary metric, {len(tasks)} tasks)")
    title = "GLUE multi-task: average dev score vs parameters"
    if any(r["average_std"] is not None for r in rows):
        title += " (mean ± std over seeds)"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(title="task-specific parameters", fontsize=8, title_fontsize=8, loc="best")
    name = "score_vs_multiplier_glue_mtl"
    columns = ["config", "kind", "family", "sampler", "multiplier", "average", "average_std", "n_seeds"]
    return [save_figure(fig, out_dir / f"{name}.png"), save_csv(pd.DataFrame(rows, columns=columns), out_dir / "data" / f"{name}.csv")]
