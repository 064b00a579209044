"""One stage graph, two engines: DVC and Snakemake plan the same jobs and produce the same outputs."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_utils import default_params, make_project, run

pytestmark = pytest.mark.slow


def tiny_params(data_root: Path) -> dict:
    params = default_params()
    params["data"]["root"] = str(data_root)
    params["data"]["tasks"] = ["rte", "cb", "sst2", "copa"]
    params["cross_task"]["train_tasks"] = ["sst2"]
    params["cross_task"]["heldout_tasks"] = ["rte", "cb", "copa"]
    params["glue_mtl"]["tasks"] = ["rte", "sst2"]
    params["model"]["max_length"] = 64
    # threads follow cpus_per_task (Snakemake gives a job that many cores and OMP threads)
    params["resources"]["pretrain"]["cpus_per_task"] = 2
    return params


def dvc_plan(project: Path) -> dict[str, str]:
    """{stage: command} of a forced dry run."""
    out = run(["dvc", "repro", "--dry", "--force"], project).stdout
    plan, stage = {}, None
    for line in out.splitlines():
        if m := re.match(r"Running stage '(.+)':", line):
            stage = m.group(1)
        elif line.startswith("> ") and stage:
            plan[stage] = line[2:].strip()
    return plan


def snakemake_dry_run(project: Path) -> tuple[dict[str, str], dict[str, int]]:
    """({rule: command}, {rule: threads}) of a forced dry run (commands are the rules' `params.cmd`, printed by -p)."""
    out = run(["snakemake", "-n", "-p", "--forceall", "--cores", "2"], project).stdout
    plan, threads, rule = {}, {}, None
    for line in out.splitlines():
        if m := re.match(r"(?:local)?rule (\S+):", line.strip()):
            rule = m.group(1)
            threads[rule] = 1  # Snakemake prints `threads:` only when > 1
        elif rule and (m := re.match(r"threads: (\d+)", line.strip())):
            threads[rule] = int(m.group(1))
        elif rule and rule != "all" and (m := re.search(r"set -o pipefail; \((.*)\) 2>&1 \| tee ", line)):
            plan[rule] = m.group(1).strip()
    return plan, threads


def test_engines_plan_same_jobs(tmp_path, tiny_data_root):
    params = tiny_params(tiny_data_root)
    project = make_project(tmp_path / "p", params)
    dvc = dvc_plan(project)
    smk, threads = snakemake_dry_run(project)
    assert dvc, "dvc planned nothing"
    as_rules = {re.sub(r"\W", "_", name): cmd for name, cmd in dvc.items()}
    assert as_rules == smk
    # Each job gets as many threads as params.yaml gives its stage CPUs on SLURM.
    cpus = {re.sub(r"\W", "_", name): params["resources"].get(name.split("@")[0], {}).get("cpus_per_task", 1)
            for name in dvc}
    assert {rule: threads[rule] for rule in cpus} == cpus
    assert all(threads[f"pretrain_{inv}"] == 2 for inv in params["cross_task"]["inventories"])

    import sys

    sys.path.insert(0, str(project))
    try:
        from workflow.dvc_graph import load_jobs

        jobs = load_jobs(project)
    finally:
        sys.path.remove(str(project))
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        dvc_outs = {s.name: sorted(str(Path(o.fs_path).relative_to(project)) for o in s.outs) for s in repo.index.stages}
    assert {j.name: sorted(j.outs) for j in jobs} == dvc_outs

    # Persisted outs (checkpoints) are not Snakemake outputs nor inputs: Snakemake never deletes
    # them (before a rerun, after a failure), so a resubmitted training job resumes from them.
    pretrain = next(j for j in jobs if j.name == "pretrain@mhr")
    checkpoint = "models/cross_task/pretrain/mhr/checkpoint"
    assert pretrain.persist == [checkpoint]
    assert checkpoint not in pretrain.targets and pretrain.targets
    assert all(checkpoint not in j.inputs for j in jobs)
    # A dep on a folder holding other stages' outs becomes those outs (DVC: `models/cross_task/pretrain`).
    adapt = next(j for j in jobs if j.name.startswith("adapt@"))
    assert "models/cross_task/pretrain/mhr/adapter.safetensors" in adapt.inputs
    assert not any(i == "models/cross_task/pretrain" for i in adapt.inputs)


def read_outputs(project: Path, tasks: list[str]) -> dict:
    tables = {}
    for path in sorted((project / "data").rglob("*.parquet")):
        tables[str(path.relative_to(project))] = pq.read_table(path).to_pylist()
    return tables


def test_dvc_and_snakemake_same_outputs_noop_and_partial_rerun(tmp_path, tiny_data_root):
    params = tiny_params(tiny_data_root)
    tasks = params["data"]["tasks"]
    targets = [f"tokenize@{t}" for t in tasks]

    a = make_project(tmp_path / "dvc", params)
    run(["dvc", "repro", *targets], a)
    start = time.perf_counter()
    second = run(["dvc", "repro", *targets], a).stdout
    assert "didn't change" in second or "up to date" in second
    assert "Running stage" not in second
    assert time.perf_counter() - start < 10

    b = make_project(tmp_path / "smk", params)
    outs = [f"data/tokenized/{t}" for t in tasks]
    run(["snakemake", "--cores", "2", *outs], b)
    assert read_outputs(a, tasks) == read_outputs(b, tasks)
    # Snakemake's results recorded in DVC: status is clean for those stages afterwards.
    run(["dvc", "commit", "-f", *targets], b)
    status = run(["dvc", "status", *targets], b).stdout
    assert "changed" not in status, status
    # ... with the same hashes as DVC's own run (Snakemake's `.snakemake_timestamp` in each
    # folder output must be in .dvcignore).
    lock_a = yaml.safe_load((a / "dvc.lock").read_text())["stages"]
    lock_b = yaml.safe_load((b / "dvc.lock").read_text())["stages"]
    for stage in targets:
        assert lock_b[stage]["outs"] == lock_a[stage]["outs"], f"{stage}: is .snakemake_timestamp in .dvcignore?"

    # Editing a file inside a folder dep (download's `pipeline_src/tasks`) is a change for
    # Snakemake too, not only for DVC: download and what follows it rerun.
    registry = b / "pipeline_src/tasks/registry.py"
    registry.write_text(registry.read_text() + "\n# edited\n")
    dry = run(["snakemake", "-n", "--cores", "1", *outs], b).stdout
    assert all(f"rule download_{t}:" in dry and f"rule tokenize_{t}:" in dry for t in tasks), dry[-3000:]

    # A tokenize param change reruns tokenize, not download.
    params["model"]["max_length"] = 48
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = run(["dvc", "repro", *targets], a).stdout
    ran = set(re.findall(r"Running stage '(.+?)'", rerun))
    assert ran == set(targets), rerun


def test_snakemake_reuses_dvc_graph_until_graph_files_change(tmp_path, tiny_data_root, monkeypatch):
    """DVC is asked once per (dvc.yaml, params.yaml) version; source-folder inputs stay live."""
    import sys

    project = make_project(tmp_path / "p", tiny_params(tiny_data_root))
    sys.path.insert(0, str(project))
    try:
        from workflow import dvc_graph

        calls = []
        resolve = dvc_graph.resolve_stages
        monkeypatch.setattr(dvc_graph, "resolve_stages", lambda root: calls.append(root) or resolve(root))
        first = dvc_graph.load_jobs_for_snakemake(project)
        again = dvc_graph.load_jobs_for_snakemake(project)
        assert len(calls) == 1 and [j.name for j in again] == [j.name for j in first]
        assert again[0].inputs == first[0].inputs and first[0].inputs

        # A new file in a source-folder dep is an input at once, without asking DVC again.
        (project / "pipeline_src/tasks/extra.py").write_text("# new\n")
        download = next(j for j in dvc_graph.load_jobs_for_snakemake(project) if j.name.startswith("download@"))
        assert "pipeline_src/tasks/extra.py" in download.inputs and len(calls) == 1

        # Editing params.yaml changes the key: DVC resolves the graph again.
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["cross_task"]["heldout_tasks"] = ["rte", "cb"]
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        jobs = dvc_graph.load_jobs_for_snakemake(project)
        assert len(calls) == 2 and not any(j.name.endswith("copa") for j in jobs if j.name.startswith("subsets@"))
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("workflow.dvc_graph", None)
        sys.modules.pop("workflow", None)
