"""params.yaml is checked once at the door: every bad value is one line naming the key, exit 2, nothing written."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_src.__main__ import main
from pipeline_src.config import check_fewshot_sizes, check_model_dims, load_config
from pipeline_src.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def write_params(tmp_path: Path, mutate) -> Path:
    params = copy.deepcopy(DEFAULT)
    params["data"]["root"] = str(tmp_path)  # an existing folder: only the mutated key is wrong
    mutate(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def set_key(dotted: str, value):
    def mutate(params):
        node = params
        *parents, last = dotted.split(".")
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


BAD_PARAMS = [
    ("unknown task", set_key("data.tasks", ["sst2", "nope"]), "data.tasks: unknown task 'nope'"),
    ("unknown held-out task", set_key("cross_task.heldout_tasks", ["rte", "mnli_typo"]), "cross_task.heldout_tasks: unknown task 'mnli_typo'"),
    ("task in train and held-out", set_key("cross_task.heldout_tasks", ["rte", "sst2"]), "sst2 both in train_tasks and heldout_tasks"),
    ("held-out task not downloaded", set_key("data.tasks", ["sst2", "mrpc", "cola", "ag_news", "boolq", "multirc", "rte", "cb", "copa", "stsb"]), "cross_task.heldout_tasks: task(s) wic not listed in data.tasks"),
    ("K < 1", set_key("cross_task.inventories.poly.n_skills", 0), "cross_task.inventories.poly.n_skills"),
    ("h < 1", set_key("cross_task.inventories.mhr.n_heads", 0), "cross_task.inventories.mhr.n_heads"),
    ("rank < 1", set_key("adapter.rank", 0), "adapter.rank"),
    ("unknown sampler", set_key("cross_task.pretrain.sampler", "uniformish"), "cross_task.pretrain.sampler: got 'uniformish'"),
    ("unknown adapt mode", set_key("cross_task.adapt_methods.mhr_z.mode", "routing"), "cross_task.adapt_methods.mhr_z.mode: got 'routing'"),
    ("adapt init not an inventory", set_key("cross_task.adapt_methods.mhr_z.init", "mhr2"), "cross_task.adapt_methods.mhr_z.init: 'mhr2' is not a key"),
    ("scratch with init", set_key("cross_task.adapt_methods.lora_scratch.init", "lora"), "cross_task.adapt_methods.lora_scratch.init"),
    ("unknown key", set_key("adapter.rnak", 4), "adapter.rnak: unknown key"),
    ("missing section", lambda p: p.pop("model"), "model: required key is missing"),
    ("unknown model kind", set_key("model.kind", "decoder"), "model.kind: got 'decoder'"),
    ("unknown glue kind", set_key("glue_mtl.configs.pal.kind", "pals"), "glue_mtl.configs.pal.kind: got 'pals'"),
    ("d_s not divisible by heads", set_key("glue_mtl.configs.pal.d_s", 100), "glue_mtl.configs.pal.d_s: 100 is not divisible"),
    ("zero seeds", set_key("cross_task.fewshot.seeds", []), "cross_task.fewshot.seeds"),
    ("negative steps", set_key("cross_task.pretrain.steps", -5), "cross_task.pretrain.steps"),
    ("resources for no stage", set_key("resources.evaluate", {"gpu": 1}), "resources.evaluate: not a stage of dvc.yaml"),
    ("missing data directory", set_key("data.root", "/nonexistent/glue_data"), "data.root: data directory '/nonexistent/glue_data' does not exist"),
]


@pytest.mark.parametrize("case,mutate,expected", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_one_line_exit_2_nothing_written(case, mutate, expected, tmp_path, capsys, monkeypatch):
    params_path = write_params(tmp_path, mutate)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("PIPELINE_DATA_ROOT", raising=False)
    code = main(["download", "--params", str(params_path), "--task", "sst2"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err, err
    assert list(work.iterdir()) == []  # nothing written


def test_bad_yaml(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n")
    assert main(["validate", "--params", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_default_params_validate():
    params = load_config(REPO / "params.yaml", check_data=False)
    assert params.cross_task.inventories["mhr"].n_heads > 1


def test_heads_must_divide_adapted_dims(tmp_path):
    # MiniLM: hidden 384, intermediate 1536; 5 heads divide neither.
    params = load_config(write_params(tmp_path, set_key("cross_task.inventories.mhr.n_heads", 5)))
    with pytest.raises(PipelineError, match=r"cross_task.inventories.mhr.n_heads: 5 does not divide the dims of '.*' \(384 -> 384\)"):
        check_model_dims(params)
    check_model_dims(load_config(write_params(tmp_path, lambda p: None)))


def test_kshot_larger_than_train_split(tmp_path):
    def mutate(p):
        set_key("cross_task.fewshot.shots", 240)(p)
        set_key("cross_task.fewshot.selection", 32)(p)

    params = load_config(write_params(tmp_path, mutate))
    with pytest.raises(PipelineError, match=r"cross_task.fewshot.shots: 240 shots \+ 32 selection examples exceed cb's train split \(250 rows\)"):
        check_fewshot_sizes(params, {"cb": 250, "rte": 2490})


def test_cli_subprocess_exit_code(tmp_path):
    params_path = write_params(tmp_path, set_key("adapter.rank", 0))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline_src", "validate", "--params", str(params_path)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "adapter.rank" in result.stderr


def test_unknown_adapter_targets(tmp_path):
    params = load_config(write_params(tmp_path, set_key("adapter.targets", ["qkv_proj"])))
    with pytest.raises(PipelineError, match=r"adapter.targets: no nn.Linear module matches target patterns \['qkv_proj'\]"):
        check_model_dims(params)
