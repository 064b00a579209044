"""Few-shot subsets and what each adaptation method trains (tiny BERT, tiny files)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_src.adapters.inject import routed_layers
from pipeline_src.config import Params
from pipeline_src.stages.adapt import build_adapt_model, trainable_counts
from pipeline_src.stages.common import build_choice_model, pretrain_dir
from pipeline_src.stages.subsets import make_subsets
from pipeline_utils import default_params, write_standin_inventories


# ---------------------------------------------------------------- subsets

def test_subsets_deterministic_disjoint_stratified():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    train, select = make_subsets(labels, k=20, n_select=10, seed=42)
    again_train, again_select = make_subsets(labels, k=20, n_select=10, seed=42)
    assert np.array_equal(train, again_train) and np.array_equal(select, again_select)
    assert len(train) == 20 and len(select) == 10
    assert len(set(train.tolist())) == 20 and not set(train.tolist()) & set(select.tolist())
    assert np.bincount(labels[train], minlength=3).tolist() == [12, 6, 2]  # label proportions kept
    other, _ = make_subsets(labels, k=20, n_select=10, seed=1024)
    assert not np.array_equal(np.sort(train), np.sort(other))


def test_subsets_every_label_present_when_k_allows():
    labels = np.array([0] * 95 + [1] * 3 + [2] * 2)
    train, select = make_subsets(labels, k=4, n_select=4, seed=0)
    assert set(labels[train].tolist()) == {0, 1, 2}
    assert not set(train.tolist()) & set(select.tolist())


# ---------------------------------------------------------------- methods

@pytest.fixture()
def params(tiny_bert_dir, tmp_path, monkeypatch) -> Params:
    monkeypatch.chdir(tmp_path)
    raw = default_params()
    raw["model"]["name"] = tiny_bert_dir
    raw["cross_task"]["inventories"] = {"lora": {"n_skills": 1, "n_heads": 1}, "poly": {"n_skills": 4, "n_heads": 1},
                                        "mhr": {"n_skills": 4, "n_heads": 4}}
    raw["cross_task"]["adapt_methods"]["poly_z"] = {"init": "poly", "mode": "routing_only"}
    params = Params.model_validate(raw)
    write_standin_inventories(params, train_score_head=True)
    return params


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def kinds(names: set[str]) -> set[str]:
    return {n.rsplit(".", 1)[-1] if "lora" in n or "routing" in n else n.split(".")[0] for n in names}


def test_full_finetuning_trains_everything(params):
    model, _, _ = build_adapt_model(params, "full_ft", seed=0)
    assert trainable(model) == {n for n, _ in model.named_parameters()}
    assert not routed_layers(model.backbone)


def test_scratch_lora_trains_a_fresh_lora_and_the_head(params):
    model, _, task_id = build_adapt_model(params, "lora_scratch", seed=0)
    assert kinds(trainable(model)) == {"lora_A", "lora_B", "score"}
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in routed_layers(model.backbone).values())
    assert task_id == 0


@pytest.mark.parametrize("method,inventory", [("mhr", "mhr"), ("poly", "poly")])
def test_finetune_trains_inventory_and_the_new_routing_row(params, method, inventory):
    model, _, task_id = build_adapt_model(params, method, seed=0)
    n_train = len(params.cross_task.train_tasks)
    assert task_id == n_train  # a fresh row after the training tasks
    assert kinds(trainable(model)) == {"lora_A", "lora_B", "routing_logits"}
    inv = params.cross_task.inventories[inventory]
    layers = routed_layers(model.backbone).values()
    assert all(layer.routing_logits.shape == (n_train + 1, inv.n_heads * inv.n_skills) for layer in layers)
    counts = trainable_counts(model)
    per_layer = [l.lora_A.numel() + l.lora_B.numel() + inv.n_heads * inv.n_skills for l in layers]
    assert counts["trainable_per_task"] == sum(per_layer)


def test_mhr_z_trains_only_its_routing_row(params):
    model, _, task_id = build_adapt_model(params, "mhr_z", seed=0)
    assert kinds(trainable(model)) == {"routing_logits"}
    inv = params.cross_task.inventories["mhr"]
    layers = list(routed_layers(model.backbone).values())
    assert trainable_counts(model)["trainable_per_task"] == len(layers) * inv.n_heads * inv.n_skills
    # A gradient step reaches only the new task's row.
    from pipeline_src.adapters.task_context import use_tasks

    x = torch.randint(1000, 2000, (2, 8))
    with use_tasks(model.backbone, [task_id, task_id]):
        model.backbone(input_ids=x).last_hidden_state.sum().backward()
    grad = layers[0].routing_logits.grad
    assert torch.count_nonzero(grad[:task_id]) == 0 and torch.count_nonzero(grad[task_id]) > 0


def test_mhr_mu_is_one_plain_lora(params):
    model, _, _ = build_adapt_model(params, "mhr_mu", seed=0)
    assert kinds(trainable(model)) == {"lora_A", "lora_B"}
    for layer in routed_layers(model.backbone).values():
        assert layer.n_skills == 1 and layer.routing_logits is None
    mhr, _, _ = build_adapt_model(params, "mhr", seed=0)
    inv = params.cross_task.inventories["mhr"]
    mu_params = trainable_counts(model)["trainable_per_task"]
    routing_rows = len(routed_layers(mhr.backbone)) * inv.n_heads * inv.n_skills
    # the mean adapter is 1/K of the inventory; MHR fine-tuning trains the inventory + one routing row
    assert mu_params * inv.n_skills + routing_rows == trainable_counts(mhr)["trainable_per_task"]


def test_zero_shot_scoring_adds_no_parameters(params):
    from pipeline_src.adapters.inject import collapse_all_to_mean
    from pipeline_src.stages.common import load_weights

    inv = params.cross_task.inventories["mhr"]
    model, tok = build_choice_model(params, inv, n_tasks=len(params.cross_task.train_tasks))
    load_weights(model, pretrain_dir("cross_task", "mhr") / "adapter.safetensors")
    collapse_all_to_mean(model.backbone)
    before = sum(p.numel() for p in model.parameters())
    from pipeline_src.models.collate import collate_choices

    enc = tok("an unseen task's prompt", "yes")
    row = {"task": "copa", "idx": 0, "label": 0, "choice_input_ids": [enc["input_ids"]] * 2,
           "choice_token_type_ids": [enc["token_type_ids"]] * 2, "choice_attention_mask": [enc["attention_mask"]] * 2}
    model.eval()
    with torch.no_grad():
        model(collate_choices([row], tok.pad_token_id, task_ids=[0]))
    assert sum(p.numel() for p in model.parameters()) == before
