"""The real pipeline (smoke-sized) on a real single-node SLURM, through Snakemake.

One SLURM run of the whole graph is shared by the tests (a module fixture); tests that
change the project work on a copy taken right after that run (mtimes kept, so Snakemake
sees the same state).

- every job goes through sbatch, and the results equal a local `dvc repro` of the same
  project; `dvc commit -f` then leaves `dvc status` clean and `dvc metrics` work;
- a job failing on SLURM is reported with its log; after the cause is fixed the rerun
  runs only what did not finish;
- a pre-training job cancelled (scancel) after its first checkpoint is resubmitted by the
  profile's `retries: 1` and resumes from that checkpoint.

    .venv/bin/python -m pytest -m slurm tests/test_slurm_pipeline.py -v

Skipped where SLURM can't be set up, unless REQUIRE_SLURM=1 (see slurm_utils.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_data_root
from pipeline_utils import REPO, default_params, make_project, project_env, run

try:
    from slurm_utils import slurm_cluster  # noqa: F401  (fixture)
except ImportError:  # tests/ imported as a package
    from tests.slurm_utils import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Keys whose values depend on the machine's speed, not on the computation.
TIMING = re.compile(r"(^|_)(time|wall|elapsed|seconds)(_|$)|_s$|per_s")
# pretrain's SLURM request, distinct from the other stages' so the test can see it arrive.
PRETRAIN_RESOURCES = {"mem_mb": 600, "runtime": 7, "cpus_per_task": 1}


def smoke_params(data_root: Path, model_dir: str) -> dict:
    """Every stage of the graph, as small as it gets (tiny BERT, a few rows per task).

    Each SLURM job costs ~10-15 s here whatever it does (two nested Snakemake start-ups, torch
    import), so the graph is cut to 14 jobs: 3 tasks, 1 held-out task, 2 adaptation methods.
    """
    p = default_params()
    p["data"] = {"root": str(data_root), "source": "files", "tasks": ["sst2", "mrpc", "rte"]}
    p["model"].update(name=model_dir, max_length=32)
    ct = p["cross_task"]
    ct.update(train_tasks=["sst2", "mrpc"], heldout_tasks=["rte"], eval_max_examples=8)
    ct["inventories"] = {"lora": {"n_skills": 1, "n_heads": 1}, "mhr": {"n_skills": 2, "n_heads": 2}}
    ct["pretrain"].update(steps=2, batch_size=2, checkpoint_every=1, align_every=0)
    # The tiny files hold 3 labelled rte train rows: 2 shots + 1 for selection.
    ct["fewshot"] = {"shots": 2, "selection": 1, "seeds": [1]}
    # One method from scratch, one from the MHR inventory.
    ct["adapt_methods"] = {m: ct["adapt_methods"][m] for m in ("lora_scratch", "mhr_mu")}
    ct["adapt"].update(steps=2, batch_size=2)
    ct["zeroshot_methods"] = {"mhr_mu_zs": {"init": "mhr", "mode": "mean", "extra_steps": 1}}
    g = p["glue_mtl"]
    g.update(tasks=["sst2", "mrpc", "rte"], eval_max_examples=8)
    g["configs"] = {"low_rank": {"kind": "low_rank", "d_s": 8, "n_attention_heads": 2}}
    g["train"].update(steps=2, batch_size=2, checkpoint_every=1, epochs=1)
    # One CPU per job: the local node has two, so two jobs run at once.
    stages = ("download", "tokenize", "pretrain", "subsets", "adapt", "zeroshot", "glue_mtl", "report")
    p["resources"] = {s: {"mem_mb": 500, "runtime": 10, "cpus_per_task": 1} for s in stages}
    p["resources"]["pretrain"] = dict(PRETRAIN_RESOURCES)
    return p


def submitted(output: str) -> dict[str, int]:
    """{rule: SLURM job id} from Snakemake's "submitted with SLURM jobid N (log: .../rule_R/N.log)"."""
    return {rule: int(jid) for jid, rule in
            re.findall(r"submitted with SLURM jobid (\d+) \(log: \S+/rule_(\w+)/\d+\.log\)", output)}


def planned_rules(project: Path) -> set[str]:
    """The rule of every DVC stage (load_jobs of the project's own copy of the graph)."""
    import sys

    sys.path.insert(0, str(project))
    try:
        from workflow.dvc_graph import load_jobs

        return {job.rule_name for job in load_jobs(project)}
    finally:
        sys.path.remove(str(project))


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def results(project: Path) -> dict:
    """What the pipeline computed: metrics (timing left out), predictions and trained weights."""
    out = {}
    for path in sorted((project / "results").rglob("*.json")):
        out[str(path.relative_to(project))] = strip_timing(json.loads(path.read_text()))
    for path in sorted((project / "results/predictions").rglob("*.parquet")):
        out[str(path.relative_to(project))] = pq.read_table(path).to_pylist()
    for folder in ("models", "runs"):
        for path in sorted((project / folder).rglob("*.safetensors")):
            if "checkpoint" not in path.parts:
                out[str(path.relative_to(project))] = {k: v.tolist() for k, v in load_file(str(path)).items()}
    return out


def with_repo_dvc_config(project: Path) -> Path:
    """The repo's own .dvc/config (cache.type: how `dvc commit` treats Snakemake's files)."""
    shutil.copy(REPO / ".dvc" / "config", project / ".dvc" / "config")
    return project


def copy_project(src: Path, dest: Path) -> Path:
    # copy2 keeps mtimes: Snakemake sees the copy exactly as it saw the original.
    shutil.copytree(src, dest, symlinks=True)
    shutil.rmtree(dest / ".snakemake" / "locks", ignore_errors=True)
    return dest


@dataclass
class ClusterRun:
    project: Path  # ran with Snakemake on SLURM
    pristine: Path  # a copy of it right after that run, for the tests that change things
    local: Path  # the same project, ran with `dvc repro` on this machine
    output: str
    returncode: int
    local_output: str
    local_returncode: int
    log_offset: int  # slurmctld log size before the run
    seconds: float


@pytest.fixture(scope="module")
def cluster_run(slurm_cluster, tmp_path_factory, tiny_bert_dir) -> ClusterRun:
    base = tmp_path_factory.mktemp("slurm_pipeline")
    params = smoke_params(build_tiny_data_root(base / "data"), tiny_bert_dir)
    project = with_repo_dvc_config(make_project(base / "slurm", params))
    local = with_repo_dvc_config(make_project(base / "local", params))

    # The local reference runs meanwhile (wall time). One thread per job, as Snakemake gives
    # each job (OMP_NUM_THREADS = threads = cpus_per_task): same float sums, same weights.
    local_proc = subprocess.Popen(["dvc", "repro"], cwd=local, env=project_env() | {"OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    offset = slurm_cluster.log_offset()
    start = time.monotonic()
    try:
        proc = slurm_cluster.snakemake(project, "-j", "2", timeout=900)
    finally:
        local_output, _ = local_proc.communicate(timeout=900)
    pristine = copy_project(project, base / "pristine")
    return ClusterRun(project, pristine, local, proc.stdout, proc.returncode, local_output, local_proc.returncode,
                      offset, time.monotonic() - start)


def test_pipeline_on_slurm_matches_dvc_repro(cluster_run, slurm_cluster):
    run_ = cluster_run
    assert run_.returncode == 0, run_.output[-8000:]
    assert run_.local_returncode == 0, run_.local_output[-8000:]
    print(f"SLURM run of the whole graph: {run_.seconds:.0f} s")

    # Every DVC stage became one SLURM job: slurmctld took each from sbatch and started it.
    # (Subsets, not equality: someone else may use this cluster meanwhile.)
    jobs = submitted(run_.output)
    assert set(jobs) == planned_rules(run_.project)
    ids = set(jobs.values())
    assert len(ids) == len(jobs)
    assert ids <= slurm_cluster.submitted_job_ids(since=run_.log_offset)
    assert ids <= slurm_cluster.started_job_ids(since=run_.log_offset)
    for rule, jid in jobs.items():
        assert (run_.project / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{jid}.log").is_file()

    # params.yaml `resources.pretrain` reached sbatch (finished jobs stay known for MinJobAge).
    job = subprocess.run(["scontrol", "show", "job", str(jobs["pretrain_mhr"])], capture_output=True, text=True).stdout
    assert f"TimeLimit=00:{PRETRAIN_RESOURCES['runtime']:02d}:00" in job, job
    assert re.search(rf"mem={PRETRAIN_RESOURCES['mem_mb']}M", job), job

    # Same results as DVC's own run of the graph.
    ours, reference = results(run_.project), results(run_.local)
    assert any(k.startswith("results/metrics/cross_task_fewshot/") for k in reference)
    assert "results/metrics.json" in reference
    assert ours.keys() == reference.keys()
    for key in reference:
        assert ours[key] == reference[key], key

    # DVC records what Snakemake made: nothing left to run, metrics readable.
    run(["dvc", "commit", "-f"], run_.project)
    status = run(["dvc", "status"], run_.project).stdout
    assert "up to date" in status, status
    # ... and Snakemake still sees everything done: `dvc commit` left its files (and their
    # mtimes) alone (needs `cache.type: copy` in .dvc/config; the default reflink,copy
    # rewrites committed files, and Snakemake then reruns what reads any of them over 1 MB).
    dry = run(["snakemake", "-n", "--cores", "1"], run_.project).stdout
    assert "Nothing to be done" in dry, f"is `type = copy` under [cache] in .dvc/config?\n{dry[-4000:]}"
    shown = run(["dvc", "metrics", "show", "--json"], run_.project).stdout
    assert json.loads(shown), shown
    run(["dvc", "metrics", "diff"], run_.project)
    # Data stages hash the same under both engines (needs `.snakemake_timestamp` in .dvcignore:
    # Snakemake drops that file into every folder output).
    run(["dvc", "commit", "-f"], run_.local)
    lock = yaml.safe_load((run_.project / "dvc.lock").read_text())["stages"]
    local_lock = yaml.safe_load((run_.local / "dvc.lock").read_text())["stages"]
    for stage in ("download@rte", "tokenize@rte", "subsets@rte"):
        assert lock[stage]["outs"] == local_lock[stage]["outs"], f"{stage}: is .snakemake_timestamp in .dvcignore?"


def test_failed_job_reports_log_and_rerun_resumes(cluster_run, slurm_cluster, tmp_path):
    if cluster_run.returncode != 0:
        pytest.skip("the shared SLURM run failed (see the first test)")
    wd = copy_project(cluster_run.pristine, tmp_path / "p")
    broken, good = "adapt_mhr_mu_rte", "adapt_lora_scratch_rte"

    # A corrupt input: the MHR weights the mhr_mu adaptation loads. Its mtime kept, so that
    # only the two jobs forced below run (as after editing them), not all that read the file.
    weights = wd / "models/cross_task/pretrain/mhr/adapter.safetensors"
    saved, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    weights.write_bytes(b"not a safetensors file")
    os.utime(weights, ns=(mtime, mtime))

    # --retries 0: a retry would fail the same way. --keep-going: the healthy job finishes.
    # Targets and flags before --forcerun: it takes every following word.
    failed = slurm_cluster.snakemake(wd, "-j", "2", "--retries", "0", "--keep-going", "--forcerun", broken, good)
    out = failed.stdout
    assert failed.returncode != 0, out[-8000:]
    assert f"Error in rule {broken}" in out, out[-8000:]
    assert "SLURM status is: 'FAILED'" in out, out[-8000:]
    # The error names the job's SLURM log and the rule's log; both hold the cause.
    m = re.search(rf"(/\S+/\.snakemake/slurm_logs/rule_{broken}/(\d+)\.log)", out)
    assert m, f"no SLURM log path in snakemake's output:\n{out[-8000:]}"
    assert "safetensor" in Path(m.group(1)).read_text().lower()
    assert f"logs/{broken}.log" in out
    assert "safetensor" in (wd / f"logs/{broken}.log").read_text().lower()
    first = submitted(out)
    # The healthy job finished; the report (which needs both) did not run.
    assert set(first) == {broken, good}, first
    done = wd / "results/metrics/cross_task_fewshot/lora_scratch/rte/s1.json"
    done_mtime = done.stat().st_mtime_ns
    assert not (wd / "runs/cross_task/mhr_mu/rte/s1").exists()

    # Fix the cause (restore the file, as `cp -p` from a backup would) and rerun everything:
    # only the failed job and the report (waiting for it) run; nothing finished reruns.
    weights.write_bytes(saved)
    os.utime(weights, ns=(mtime, mtime))
    offset = slurm_cluster.log_offset()
    rerun = slurm_cluster.snakemake(wd, "-j", "2")
    assert rerun.returncode == 0, rerun.stdout[-8000:]
    again = submitted(rerun.stdout)
    assert set(again) == {broken, "report"}, again
    assert set(again.values()) <= slurm_cluster.submitted_job_ids(since=offset)
    assert done.stat().st_mtime_ns == done_mtime
    assert (wd / "results/metrics/cross_task_fewshot/mhr_mu/rte/s1.json").is_file()


def test_cancelled_pretraining_is_resubmitted_and_resumes(cluster_run, slurm_cluster, tmp_path, monkeypatch):
    if cluster_run.returncode != 0:
        pytest.skip("the shared SLURM run failed (see the first test)")
    wd = copy_project(cluster_run.pristine, tmp_path / "p")
    # Train longer: pretrain@mhr reruns (the old checkpoint, from another config, is set aside).
    params = yaml.safe_load((wd / "params.yaml").read_text())
    params["cross_task"]["pretrain"]["steps"] = 3
    (wd / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out_dir = wd / "models/cross_task/pretrain/mhr"
    ckpt = out_dir / "checkpoint"
    # The checkpoint code's test hook: sleep 10 s before publishing checkpoint 2, i.e. a
    # window where checkpoint 1 is complete and the job is still running. Jobs get our
    # environment (sbatch --export=ALL).
    monkeypatch.setenv("PIPELINE_SRC_CKPT_PAUSE", "2:10")

    slurm_logs = wd / ".snakemake/slurm_logs/rule_pretrain_mhr"  # one <job id>.log per submission
    before = set(slurm_logs.glob("*.log"))
    result: dict = {}
    target = "models/cross_task/pretrain/mhr/summary.json"
    # The profile's `retries: 1` resubmits the cancelled job (as after a pre-emption).
    runner = threading.Thread(target=lambda: result.update(proc=slurm_cluster.snakemake(wd, target, "-j", "1")))
    runner.start()
    deadline = time.monotonic() + 300
    while not ((ckpt / "step-00000001").is_dir() and (ckpt / ".tmp-step-00000002").is_dir()):
        assert runner.is_alive() and time.monotonic() < deadline, "pretrain never reached checkpoint 1"
        time.sleep(0.2)
    first = set(slurm_logs.glob("*.log")) - before
    assert len(first) == 1, first
    subprocess.run(["scancel", first.pop().stem], check=True)
    runner.join(timeout=600)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert "Trying to restart job" in proc.stdout, proc.stdout[-8000:]
    assert len(set(slurm_logs.glob("*.log")) - before) == 2  # the cancelled job and its resubmission

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    assert summary["start_step"] == 1 and summary["resumed"], summary
    steps = [json.loads(line)["step"] for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    assert steps == [1, 2, 3]
