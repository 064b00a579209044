"""The seq2seq (T5) path of the cross-task experiment, stage by stage and end to end.

A tiny T5 built from a config is saved with the real MiniLM tokenizer (vocab 30522, pad 0,
[SEP] as eos) into a temp folder that `model.name` points to. Covered: the tokenize stage's
seq2seq columns, `build_choice_model` / the adaptation methods' trainable sets for T5 targets,
per-example losses for the loop, `predict_dataset`, beam search with the real routed LoRA
(several tasks in one batch), the paper-scale params files (validate + plan), and a whole
`dvc repro` of tokenize -> pretrain -> subsets -> adapt (+ dev scoring) -> zeroshot -> report.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from pipeline_src.adapters.inject import inject_routed_lora, routed_layers
from pipeline_src.config import Params, load_config
from pipeline_src.models.backbone import resolve_model_name
from pipeline_src.models.evaluate_utils import predict_dataset
from pipeline_src.models.seq2seq import Seq2SeqChoiceScorer, build_tiny_t5, generate_with_tasks
from pipeline_src.models.seq2seq_collate import SEQ2SEQ_FIELDS, collate_seq2seq, seq2seq_special_ids
from pipeline_utils import REPO, default_params, make_project, run, write_standin_inventories

T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random T5 (d_model 32, 2+2 layers) saved with the MiniLM tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name("minilm"))
    pad, eos = seq2seq_special_ids(tokenizer)
    model = build_tiny_t5(vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=eos, d_model=32, layers=2,
                          heads=4, d_kv=8, d_ff=64, dropout=0.0, seed=0)
    folder = tmp_path_factory.mktemp("tiny_t5")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def seq2seq_params(data_root: Path | None, model_dir: str) -> dict:
    """The default params turned into a tiny seq2seq cross-task experiment (2 steps everywhere)."""
    params = default_params()
    params["glue_mtl"]["configs"] = {}  # the GLUE experiment needs an encoder: no glue_mtl stage
    params["glue_mtl"]["tasks"] = ["sst2"]
    params["data"]["root"] = str(data_root) if data_root else params["data"]["root"]
    params["data"]["tasks"] = ["sst2", "mrpc", "rte", "copa"]
    params["model"].update(name=model_dir, kind="seq2seq", max_length=64, max_target_length=8,
                           seq2seq_loss="ce_unlikelihood_lennorm")
    params["adapter"].update(targets=T5_TARGETS, rank=2, alpha=4.0)
    ct = params["cross_task"]
    ct["train_tasks"] = ["sst2", "mrpc"]
    ct["heldout_tasks"] = ["rte", "copa"]  # copa: per-example choices
    ct["inventories"] = {"lora": {"n_skills": 1, "n_heads": 1}, "mhr": {"n_skills": 2, "n_heads": 2}}
    ct["pretrain"].update(steps=2, batch_size=2, checkpoint_every=1, align_every=1)
    ct["fewshot"].update(shots=1, selection=1, seeds=[42])
    ct["adapt_methods"] = {
        "lora_scratch": {"init": None, "mode": "scratch_lora"},
        "full_ft": {"init": None, "mode": "full"},
        "mtl_lora": {"init": "lora", "mode": "finetune"},
        "mhr": {"init": "mhr", "mode": "finetune"},
        "mhr_z": {"init": "mhr", "mode": "routing_only"},
        "mhr_mu": {"init": "mhr", "mode": "mean"},
    }
    ct["adapt"].update(steps=2, batch_size=2)
    ct["zeroshot_methods"] = {"mtl_lora_zs": {"init": "lora", "mode": "as_is", "extra_steps": 0},
                              "mhr_mu_zs": {"init": "mhr", "mode": "mean", "extra_steps": 2}}
    ct["eval_max_examples"] = None
    return params


# ---------------------------------------------------------------- tokenize

def test_tokenize_writes_seq2seq_columns_only_for_seq2seq(tiny_data_root, tiny_t5_dir, tmp_path):
    from transformers import AutoTokenizer

    from pipeline_src.data.download import download_task
    from pipeline_src.data.tokenize import TOKENIZED_SCHEMA, tokenize_split
    from pipeline_src.tasks.registry import get_task

    download_task("copa", tmp_path / "raw", files_root=tiny_data_root, source="files")
    raw = tmp_path / "raw/copa/train.parquet"
    meta = tokenize_split(raw, tmp_path / "s2s.parquet", tiny_t5_dir, max_length=64, max_target_length=5)
    plain = tokenize_split(raw, tmp_path / "enc.parquet", tiny_t5_dir, max_length=64)
    assert pq.read_table(tmp_path / "enc.parquet").schema.remove_metadata().equals(TOKENIZED_SCHEMA)
    assert "seq2seq" not in plain and meta["seq2seq"]["max_target_length"] == 5
    table = pq.read_table(tmp_path / "s2s.parquet")
    assert table.schema.names == TOKENIZED_SCHEMA.names + [f.name for f in SEQ2SEQ_FIELDS]
    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    eos = tok.sep_token_id
    spec = get_task("copa")
    for raw_row, row in zip(pq.read_table(raw).to_pylist(), table.to_pylist()):
        prompt, choices = spec.render(raw_row)
        assert row["prompt_input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"] + [eos]
        assert len(row["target_input_ids"]) == len(choices)
        for ids, choice in zip(row["target_input_ids"], choices):
            assert ids == tok(choice, add_special_tokens=False)["input_ids"][:4] + [eos]
        assert row["choice_input_ids"]  # the encoder columns are still there


# ---------------------------------------------------------------- model, methods, losses

@pytest.fixture()
def params(tiny_t5_dir, tmp_path, monkeypatch) -> Params:
    """Seq2seq params; stand-in pre-trained inventories under tmp_path/models."""
    monkeypatch.chdir(tmp_path)
    params = Params.model_validate(seq2seq_params(None, tiny_t5_dir))
    write_standin_inventories(params)
    return params


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_build_choice_model_injects_t5_targets(params):
    from pipeline_src.stages.common import build_choice_model, has_score_head

    model, tokenizer = build_choice_model(params, params.cross_task.inventories["mhr"], n_tasks=2)
    assert isinstance(model, Seq2SeqChoiceScorer) and not has_score_head(model)
    assert model.loss_name == "ce_unlikelihood_lennorm" and tokenizer.pad_token_id == 0
    names = list(routed_layers(model.backbone))
    # encoder: (q,k,v,o) + (wi_0, wi_1, wo) per layer; decoder adds cross-attention q,k,v,o
    assert len(names) == 2 * (4 + 3) + 2 * (4 + 4 + 3)
    assert any("EncDecAttention.k" in n for n in names) and any(n.endswith("DenseReluDense.wo") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"lora_A", "lora_B", "routing_logits"}


@pytest.mark.parametrize("method,kinds", [
    ("lora_scratch", {"lora_A", "lora_B"}),  # no scorer head in seq2seq
    ("mhr", {"lora_A", "lora_B", "routing_logits"}),
    ("mhr_z", {"routing_logits"}),
    ("mhr_mu", {"lora_A", "lora_B"}),
])
def test_adapt_methods_train_the_right_parameters(params, method, kinds):
    from pipeline_src.stages.adapt import build_adapt_model

    model, _, task_id = build_adapt_model(params, method, seed=0)
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == kinds
    assert task_id == (len(params.cross_task.train_tasks) if method in ("mhr", "mhr_z") else 0)


def test_full_finetuning_trains_the_whole_t5(params):
    from pipeline_src.stages.adapt import build_adapt_model

    model, _, _ = build_adapt_model(params, "full_ft", seed=0)
    assert trainable(model) == {n for n, _ in model.named_parameters()} and not routed_layers(model.backbone)


def toy_rows(tokenizer) -> list[dict]:
    """Tokenized seq2seq rows: two tasks, 2 and 3 choices, different lengths."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]

    return [
        {"task": "rte", "idx": 0, "label": 1, "prompt_input_ids": ids("a man sleeps. true or false?"),
         "target_input_ids": [ids("true"), ids("false")]},
        {"task": "cb", "idx": 1, "label": 2, "prompt_input_ids": ids("it rained yesterday, maybe"),
         "target_input_ids": [ids("true"), ids("it is false"), ids("neither")]},
        {"task": "rte", "idx": 2, "label": 0, "prompt_input_ids": ids("short"),
         "target_input_ids": [ids("yes"), ids("no")]},
    ]


@pytest.mark.parametrize("loss", ["ce", "ce_unlikelihood_lennorm"])
def test_loss_fn_gives_per_example_losses(params, loss):
    """The loop needs [B] losses: per example, each term is normalised per example."""
    from pipeline_src.data.tokenized import TokenizedSplit
    from pipeline_src.stages.common import build_choice_model, choice_loss_fn
    from pipeline_src.training.sampling import BatchPlan

    params = params.model_copy(update={"model": params.model.model_copy(update={"seq2seq_loss": loss})})
    model, tok = build_choice_model(params, params.cross_task.inventories["mhr"], n_tasks=2)
    for layer in routed_layers(model.backbone).values():
        torch.nn.init.normal_(layer.lora_B, 0, 0.5)
    rows = toy_rows(tok)
    split = TokenizedSplit("mix", "train", pa.Table.from_pylist(rows), {})
    plan = BatchPlan(step=0, epoch=1, items=((0, 0), (0, 1), (0, 2)))
    losses = choice_loss_fn([split], tok.pad_token_id, task_id_of=lambda t: 1)(model, plan)
    assert losses.shape == (3,) and torch.isfinite(losses).all() and (losses > 0).all()
    losses.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    batch = collate_seq2seq(rows, tok.pad_token_id, task_ids=[1, 1, 1])
    with torch.no_grad():
        scores = model(batch)
        again = model(batch, example_losses=True)
    torch.testing.assert_close(again, losses.detach())
    ce = -scores[torch.arange(3), batch["labels"]]  # length-normalised CE of the correct choice
    if loss == "ce":
        torch.testing.assert_close(losses.detach(), ce)
    else:
        lennorm = torch.nn.functional.cross_entropy(scores, batch["labels"], reduction="none")
        with torch.no_grad():  # unlikelihood by hand: mean over the incorrect choices' tokens, per example
            logp, mask = model.token_logprobs(batch)
        unlikely = []
        for n in range(3):
            wrong = (batch["pair_example"] == n) & (batch["pair_choice"] != batch["labels"][n])
            tokens = logp[wrong][mask[wrong]]
            unlikely.append(-torch.log1p(-tokens.exp() + model.unlikelihood_eps).mean())
        torch.testing.assert_close(losses.detach(), ce + torch.stack(unlikely) + lennorm)
        # rows with equal-length correct targets and the same incorrect-token count: the mean of the
        # per-example losses is the scalar T-Few loss
        same = [rows[0], rows[2]]
        b2 = collate_seq2seq(same, tok.pad_token_id, task_ids=[1, 1])
        with torch.no_grad():
            torch.testing.assert_close(model(b2, example_losses=True).mean(), model.loss(b2))


def test_predict_dataset_handles_the_seq2seq_scorer(params):
    from pipeline_src.stages.common import build_choice_model

    model, tok = build_choice_model(params, params.cross_task.inventories["mhr"], n_tasks=2)
    rows = toy_rows(tok)
    preds = predict_dataset(model, rows, batch_size=2, pad_id=tok.pad_token_id, task_ids=[0, 1, 0])
    with torch.no_grad():
        want = model(collate_seq2seq(rows, tok.pad_token_id, task_ids=[0, 1, 0])).argmax(-1)
    assert preds.dtype.kind == "i" and preds.tolist() == want.tolist()


# ---------------------------------------------------------------- beam search, real routed LoRA

def test_beam_search_routes_each_row_with_real_routed_lora():
    """MHR on every T5 target, 4 rows of 3 tasks (two rows share an input), padded prompts: every
    beam-searched row equals that row generated alone with its task; returned sequences too."""
    model = build_tiny_t5(vocab_size=48, pad_token_id=0, eos_token_id=1, dropout=0.0, seed=7).double().eval()
    inject_routed_lora(model, T5_TARGETS, n_tasks=3, n_skills=3, n_heads=2, rank=2)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in routed_layers(model).values():
            layer.lora_B.normal_(0, 2.0)
            layer.routing_logits.normal_(0, 3.0)
    prompts = [[5, 6, 7, 8, 1], [5, 6, 7, 8, 1], [9, 10, 1], [11, 12, 13, 1]]
    task_ids = [0, 2, 1, 2]
    width = max(map(len, prompts))
    input_ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = (input_ids != 0).long()
    kwargs = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5, do_sample=False)

    def strip(seq: torch.Tensor) -> list[int]:
        return [t for t in seq.tolist() if t != 0]

    with torch.no_grad():
        batched = generate_with_tasks(model, input_ids, mask, task_ids, **kwargs)
        many = generate_with_tasks(model, input_ids, mask, task_ids, num_return_sequences=2, **kwargs)
        alone = [generate_with_tasks(model, torch.tensor([p]), None, [t], num_return_sequences=2, **kwargs)
                 for p, t in zip(prompts, task_ids)]
    for i in range(len(prompts)):
        assert strip(batched[i]) == strip(alone[i][0]), i
        assert [strip(s) for s in many[2 * i:2 * i + 2]] == [strip(s) for s in alone[i]], i
    assert strip(alone[0][0]) != strip(alone[1][0])  # same input, other task: routing decides
    assert all(layer._task_ids is None for layer in routed_layers(model).values())  # ids restored


# ---------------------------------------------------------------- paper-scale params

def planned_stages(project: Path) -> list[str]:
    out = run(["dvc", "repro", "--dry", "--force"], project).stdout
    return re.findall(r"Running stage '(.+?)'", out)


@pytest.mark.parametrize("name", ["t0_paper", "pals_paper"])
def test_paper_params_validate_and_plan(name, tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_DATA_ROOT", raising=False)
    path = REPO / "params" / f"{name}.yaml"
    assert run(["python", "-m", "pipeline_src", "validate", "--params", str(path)], REPO).stdout.strip().endswith("ok")
    params = load_config(path)
    raw = yaml.safe_load(path.read_text())
    ct = params.cross_task
    if name == "t0_paper":
        assert params.model.kind == "seq2seq" and params.model.name == "google/t5-xl-lm-adapt"
        assert params.adapter.targets == T5_TARGETS and params.adapter.rank == 1
        assert {k: (v.n_skills, v.n_heads) for k, v in ct.inventories.items()} == {
            "lora": (1, 1), "poly": (8, 1), "mhr": (8, 64)}
        assert (ct.pretrain.steps, ct.pretrain.batch_size, ct.pretrain.optimizer) == (100000, 16, "adafactor")
        assert (ct.adapt.steps, ct.adapt.lr, ct.fewshot.seeds) == (1000, 3e-3, [42, 1024, 0])
        assert {t: params.task_shots(t) for t in ("rte", "hellaswag", "winogrande", "story_cloze")} == {
            "rte": 32, "hellaswag": 20, "winogrande": 50, "story_cloze": 70}
        assert set(ct.heldout_tasks) == {"anli_r1", "anli_r2", "anli_r3", "cb", "copa", "hellaswag", "rte",
                                         "story_cloze", "wsc", "wic", "winogrande"}
        assert raw["resources"]["pretrain"]["gpu"] == 1 and raw["resources"]["adapt"]["gpu"] == 1
        assert raw["resources"]["report"]["gpu"] == 0
    else:
        assert params.model.name == "bert-base-uncased" and params.glue_mtl is not None
        assert params.glue_mtl.tasks == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
        pal = params.glue_mtl.configs["pal"]
        assert (pal.kind, pal.d_s, pal.n_attention_heads) == ("pal", 204, 6)
        assert_whole_pals_grid(params)
        train = params.glue_mtl.train
        assert (train.lr, train.batch_size, train.steps, train.epochs) == (2e-5, 32, 60000, 25)
    assert params.data.source == "hub"

    project = make_project(tmp_path / name, raw)
    stages = planned_stages(project)
    n_tasks, n_held = len(params.data.tasks), len(ct.heldout_tasks)
    n_runs = len(ct.adapt_methods) * n_held  # one job per (method, task), seeds inside
    expected = {"download": n_tasks, "tokenize": n_tasks, "pretrain": len(ct.inventories), "subsets": n_held,
                "adapt": n_runs, "zeroshot": len(ct.zeroshot_methods), "report": 1,  # adapt also scores dev
                "glue_mtl": len(params.glue_mtl.configs)}  # T0: none (configs: {}); PALs: one per config
    counts: dict[str, int] = {}
    for stage in stages:
        base = stage.split("@")[0]
        counts[base] = counts.get(base, 0) + 1
    assert {k: counts.get(k, 0) for k in expected} == expected


def assert_whole_pals_grid(params: Params) -> None:
    """Every task-specific kind, PAL in every placement, and PAL under every sampler of the paper."""
    from pipeline_src.config import TASK_SPECIFIC_KINDS

    configs = params.glue_mtl.configs.values()
    assert {c.kind for c in configs} == set(TASK_SPECIFIC_KINDS)
    pals = [c for c in configs if c.kind == "pal"]
    assert {c.layers for c in pals} == {"all", "first_half", "final_half"}
    assert {c.placement for c in pals} == {"parallel", "serial"}
    samplers = {c.sampler if "sampler" in c.model_fields_set else params.glue_mtl.train.sampler for c in pals}
    assert samplers == {"round_robin", "proportional", "sqrt", "annealed"}


def test_default_params_run_the_whole_pals_grid():
    assert_whole_pals_grid(load_config(REPO / "params.yaml"))


def test_seq2seq_params_refuse_glue_configs_and_file_only_hub_tasks(tiny_t5_dir):
    from pydantic import ValidationError

    raw = seq2seq_params(None, tiny_t5_dir)
    raw["glue_mtl"]["configs"] = {"pal": {"kind": "pal", "d_s": 8, "n_attention_heads": 2}}
    with pytest.raises(ValidationError, match="needs model.kind encoder"):
        Params.model_validate(raw)
    raw = seq2seq_params(None, tiny_t5_dir)
    raw["data"].update(source="files", tasks=raw["data"]["tasks"] + ["anli_r1"])
    with pytest.raises(ValidationError, match="anli_r1 exist only on the hub"):
        Params.model_validate(raw)


# ---------------------------------------------------------------- the whole graph

def e2e_params(data_root: Path, model_dir: str) -> dict:
    """As few stages as cover the seq2seq path: one held-out task with per-example choices (COPA),
    two seeds (run by the same adapt job), the MHR inventory and the methods that use it in every
    mode, plus full fine-tuning. (~20 stages; each is a fresh Python process, so this is what the
    test's time goes to.)"""
    params = seq2seq_params(data_root, model_dir)
    params["data"]["tasks"] = ["sst2", "mrpc", "copa"]
    ct = params["cross_task"]
    ct["heldout_tasks"] = ["copa"]
    ct["fewshot"]["seeds"] = [1, 2]
    ct["inventories"] = {"mhr": {"n_skills": 2, "n_heads": 2}}
    ct["adapt_methods"] = {name: ct["adapt_methods"][name] for name in ("full_ft", "mhr", "mhr_z", "mhr_mu")}
    ct["zeroshot_methods"] = {"mhr_mu_zs": ct["zeroshot_methods"]["mhr_mu_zs"]}
    return params


@pytest.mark.slow
def test_dvc_repro_cross_task_with_tiny_t5(tmp_path, tiny_data_root, tiny_t5_dir):
    params = e2e_params(tiny_data_root, tiny_t5_dir)
    project = make_project(tmp_path / "p", params)
    run(["dvc", "repro"], project, timeout=900)
    ct = params["cross_task"]

    table = pq.read_table(project / "data/tokenized/copa/train.parquet")
    assert {"prompt_input_ids", "target_input_ids"} <= set(table.schema.names)
    routing = json.loads((project / "models/cross_task/pretrain/mhr/routing.json").read_text())
    assert routing["n_heads"] == 2 and routing["n_skills"] == 2 and routing["layers"]
    assert any(".EncDecAttention." in name for name in routing["layers"])

    for method in ct["adapt_methods"]:
        for task in ct["heldout_tasks"]:
            for seed in ct["fewshot"]["seeds"]:
                path = project / f"results/metrics/cross_task_fewshot/{method}/{task}/s{seed}.json"
                result = json.loads(path.read_text())
                assert result["k"] == 1 and 0.0 <= result["metrics"]["accuracy"] <= 1.0
                assert result["n_eval"] == 2 and result["params"]["trainable_per_task"] > 0
                run_dir = project / f"runs/cross_task/{method}/{task}/s{seed}"
                assert (run_dir / "weights.safetensors").is_file() and (run_dir / "selection.json").is_file()
                assert not (run_dir / "checkpoint").exists()  # adapt never resumes: no optimizer state written
    for method in ct["zeroshot_methods"]:
        for task in ct["heldout_tasks"]:
            result = json.loads((project / f"results/metrics/cross_task_zeroshot/{method}/{task}/s0.json").read_text())
            assert result["params"]["trainable_per_task"] == 0 and result["n_eval"] == 2

    tables = {p.name for p in (project / "results/tables").iterdir()}
    assert {"cross_task_fewshot.md", "cross_task_fewshot.csv", "cross_task_zeroshot.md"} <= tables
    fewshot = (project / "results/tables/cross_task_fewshot.md").read_text()
    assert all(method in fewshot for method in ct["adapt_methods"])
    summary = json.loads((project / "results/metrics.json").read_text())
    assert summary and any("mhr" in key for key in _flat_keys(summary))
    assert "Running stage" not in run(["dvc", "repro"], project).stdout  # cached: nothing reruns

    # One adapt job runs every seed; a seed run alone gives the same result as after the other
    # seeds in that job (each seed starts from its own seeded state).
    method, task, seed = "mhr", ct["heldout_tasks"][0], ct["fewshot"]["seeds"][-1]
    assert len(ct["fewshot"]["seeds"]) > 1
    path = project / f"results/metrics/cross_task_fewshot/{method}/{task}/s{seed}.json"
    in_job = json.loads(path.read_text())
    run(["python", "-m", "pipeline_src", "adapt", "--method", method, "--task", task, "--seed", str(seed)], project)
    assert json.loads(path.read_text()) == in_job


def _flat_keys(obj, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, value in obj.items() for k in _flat_keys(value, f"{prefix}{key}.")]
    return [prefix]
