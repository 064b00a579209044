"""Read DVC's resolved stage graph for the Snakefile (and for the test that compares the engines).

What DVC and Snakemake see differently, translated here:
- A dep may be a folder that *holds* other stages' outs (`data/tokenized` holds
  `data/tokenized/<task>`), or a path inside one out. Snakemake wants the exact
  output paths, so such a dep becomes the outs it covers.
- A source folder dep (`pipeline_src/adapters`, the data root): DVC hashes every
  file in it, Snakemake would only look at the folder's own mtime, which editing a
  file does not change. So it becomes the files in it (`__pycache__` left out).
- `persist: true` outs (training checkpoints) are resume state owned by the
  training code. They are NOT handed to Snakemake as outputs: Snakemake deletes
  outputs before a job reruns and again after a job fails, and `update()` is no
  way out either: it copies the folder to a backup before the job and, when the
  job fails, restores that backup (throwing away the checkpoints the failed
  attempt wrote) or, with no backup, deletes the folder. Left undeclared, the
  folder is never touched by Snakemake; DVC still tracks it (`dvc commit`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml


@dataclass
class Job:
    name: str  # DVC stage name, e.g. "tokenize@sst2"
    cmd: str
    deps: list[str]  # as DVC declares them
    outs: list[str]  # as DVC declares them (persisted ones included)
    persist: list[str]  # outs declared `persist: true` (checkpoints): kept across reruns
    param_values: str  # JSON of the params the stage reads: Snakemake reruns the job when they change
    resources: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)  # deps as Snakemake inputs (see module doc)

    @property
    def rule_name(self) -> str:
        return re.sub(r"\W", "_", self.name)

    @property
    def threads(self) -> int:
        # Locally, Snakemake runs a job with this many cores (and sets OMP_NUM_THREADS);
        # on SLURM the profile's cpus_per_task defaults to it.
        return int(self.resources.get("cpus_per_task", 1))

    @property
    def targets(self) -> list[str]:
        """Outs Snakemake produces and tracks (persisted outs left out, see module doc)."""
        return [out for out in self.outs if out not in self.persist]

    def snakemake_outputs(self) -> list:
        from snakemake.io import directory

        # DVC outs without a suffix are folders in this project (data/raw/<task>, ...)
        return [out if Path(out).suffix else directory(out) for out in self.targets]


# Where Snakemake keeps DVC's resolved graph between runs (see load_jobs_for_snakemake).
SAVED_GRAPH_DIR = Path(".snakemake") / "dvc_graph"


def load_jobs_for_snakemake(root: str | os.PathLike, remote: bool = False) -> list[Job]:
    """The Snakefile's entry point.

    Asking DVC to resolve the graph costs 1-2 s, paid by every `snakemake -n` and by every
    cluster job (each parses the Snakefile again, twice with the SLURM plugin). DVC's answer
    depends only on dvc.yaml, params.yaml and this module, so it is saved under .snakemake/,
    named by a hash of those files, and read back while they are unchanged. The Snakemake
    inputs are recomputed on every load: they list the files of source folders, which change
    without dvc.yaml changing. `remote` (a cluster job) never writes the file, so jobs on
    shared storage do not race to write it.
    """
    root = Path(root).resolve()
    saved = root / SAVED_GRAPH_DIR / f"{_graph_key(root)}.json"
    if saved.is_file():
        jobs = [Job(**job) for job in json.loads(saved.read_text())]
    else:
        jobs = resolve_stages(root)
        if not remote:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name(f".{saved.name}.{os.getpid()}")
            tmp.write_text(json.dumps([asdict(job) for job in jobs]))
            os.replace(tmp, saved)  # atomic: a job never reads half a file
    _resolve_inputs(jobs, root)
    return jobs


def _graph_key(root: Path) -> str:
    digest = hashlib.sha256()
    for path in (root / "dvc.yaml", root / "params.yaml", Path(__file__)):
        digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:16]


def load_jobs(root: str | os.PathLike = ".") -> list[Job]:
    """Every DVC stage with a command, as DVC resolves it, with its Snakemake inputs."""
    root = Path(root).resolve()
    jobs = resolve_stages(root)
    _resolve_inputs(jobs, root)
    return jobs


def resolve_stages(root: Path) -> list[Job]:
    """Every DVC stage with a command, as DVC resolves it (foreach/matrix expanded); no inputs yet."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    resources = (yaml.safe_load((root / "params.yaml").read_text()) or {}).get("resources") or {}
    jobs = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue
            deps, values = [], {}
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    values.update(dep.read_params())
                else:
                    deps.append(_rel(dep.fs_path, root))
            outs = [_rel(out.fs_path, root) for out in stage.outs]
            persist = [_rel(out.fs_path, root) for out in stage.outs if out.persist]
            base = stage.name.split("@")[0]
            jobs.append(
                Job(
                    name=stage.name,
                    cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                    deps=deps,
                    outs=outs,
                    persist=persist,
                    param_values=json.dumps(values, sort_keys=True, default=str),
                    resources=_snakemake_resources(resources.get(base) or {}),
                )
            )
    return jobs


def _rel(path: str, root: Path) -> str:
    """Paths inside the project relative to it; outside it (a data root) absolute, so the
    inputs Snakemake records stay the same wherever the project is copied."""
    rel = os.path.relpath(path, root)
    return os.path.abspath(path) if rel == ".." or rel.startswith(".." + os.sep) else rel


def _covers(outer: str, inner: str) -> bool:
    """True when path `inner` is `outer` or lies inside it."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _resolve_inputs(jobs: list[Job], root: Path) -> None:
    """Map each DVC dep to the Snakemake outputs it stands for (see module doc)."""
    producer = {out: job for job in jobs for out in job.outs}
    for job in jobs:
        inputs: list[str] = []
        for dep in job.deps:
            # outs equal to the dep, inside it (dep is a parent folder), or holding it (dep inside an out)
            hits = [out for out in producer if _covers(dep, out) or _covers(out, dep)]
            if not hits:  # a source file/folder no stage writes
                inputs.extend(_files(dep, root))
                continue
            for out in hits:
                owner = producer[out]
                if owner is job:
                    continue
                # A persisted out is not a Snakemake output: depend on its stage's other outs instead.
                for target in [out] if out in owner.targets else owner.targets:
                    if target not in inputs:
                        inputs.append(target)
        job.inputs = inputs


def _files(dep: str, root: Path) -> list[str]:
    """A folder dep -> the files in it (paths spelled like `dep`); anything else -> [dep]."""
    folder = root / dep  # `dep` may be absolute (outside the project): then it wins
    if not folder.is_dir():
        return [dep]
    files = [os.path.join(dep, os.path.relpath(os.path.join(d, f), folder))
             for d, _, names in os.walk(folder) for f in names]
    return sorted(f for f in files if "__pycache__" not in Path(f).parts) or [dep]


def _snakemake_resources(stage_resources: dict) -> dict:
    """params.yaml `resources.<stage>` -> the resource names the Snakemake SLURM plugin reads.

    Plugin 2.8.0: gpu -> --gpus=N, mem_mb -> --mem, runtime (minutes) -> -t,
    cpus_per_task -> --cpus-per-task. `gpu: 0` requests nothing.
    """
    out = {}
    if stage_resources.get("gpu"):
        out["gpu"] = int(stage_resources["gpu"])
    for key in ("mem_mb", "runtime", "cpus_per_task"):
        if key in stage_resources:
            out[key] = int(stage_resources[key])
    return out
