"""Build a throw-away copy of the project (git + dvc initialised) with a tiny params.yaml."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def project_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.pop("PIPELINE_DATA_ROOT", None)
    return env


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(dest: Path, params: dict) -> Path:
    """Copy code + graph into `dest`, write `params`, git init + dvc init (DVC needs a git repo)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline_src", "workflow"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "Snakefile", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write_standin_inventories(params, train_score_head: bool = False) -> None:
    """Random "pre-trained" adapters for every inventory, where the adapt stage looks for them
    (run inside the test's working directory). `train_score_head`: save the scorer head too."""
    import torch
    from safetensors.torch import save_file

    from pipeline_src.stages.common import build_choice_model, pretrain_dir

    for name, inventory in params.cross_task.inventories.items():
        torch.manual_seed(1)
        model, _ = build_choice_model(params, inventory, n_tasks=len(params.cross_task.train_tasks))
        if train_score_head:
            model.score.requires_grad_(True)
        weights = {n: torch.randn_like(p) * 0.1 for n, p in model.named_parameters() if p.requires_grad}
        path = pretrain_dir("cross_task", name) / "adapter.safetensors"
        path.parent.mkdir(parents=True)
        save_file(weights, str(path))
