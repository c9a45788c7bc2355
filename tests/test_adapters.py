"""Model adapters on tiny random models of every supported family (built from configs in code)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import InputError
from compress.models import get_adapter, in_features, out_features, supported_families

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 100, 32, 3, 4, 64
BATCH, SEQ = 2, 7


def _build(family: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN)
    if family == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=VOCAB, **common))
    elif family == "roberta":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=VOCAB, **common))
    elif family == "distilbert":
        model = T.DistilBertForSequenceClassification(
            T.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN))
    elif family == "vit":
        model = T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=8, num_labels=3, **common))
    elif family == "gpt2":  # n_inner left None: the FFN is 4 * n_embd
        model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                                n_positions=64, bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **common))
    elif family == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=2, **common))
    else:
        raise AssertionError(family)
    return model.eval()


EXPECTED = {  # family: (kv heads, FFN width, has gate, fused qkv, norm position)
    "bert": (HEADS, FFN, False, False, "post"),
    "roberta": (HEADS, FFN, False, False, "post"),
    "distilbert": (HEADS, FFN, False, False, "post"),
    "vit": (HEADS, FFN, False, False, "pre"),
    "gpt2": (HEADS, 4 * HIDDEN, False, True, "pre"),
    "llama": (2, FFN, True, False, "pre"),
    "qwen2": (2, FFN, True, False, "pre"),
}
FAMILIES = sorted(EXPECTED)


def _inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


def _seq_len(family: str) -> int:
    return 5 if family == "vit" else SEQ  # ViT: (16/8)^2 patches + CLS


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {f: _build(f) for f in FAMILIES}


def test_supported_families() -> None:
    assert supported_families() == sorted(["bert", "roberta", "distilbert", "vit", "gpt2", "llama", "qwen2"])


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_config(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    ad = get_adapter(model)
    kv, ffn, *_ = EXPECTED[family]
    assert ad.family == family and ad.model is model and ad.config is model.config
    assert (ad.num_layers, ad.hidden_size, ad.num_heads, ad.num_kv_heads) == (LAYERS, HIDDEN, HEADS, kv)
    assert ad.head_dim == HIDDEN // HEADS
    assert ad.intermediate_size == ffn
    assert ad.vocab_size == (None if family == "vit" else VOCAB)
    assert len(ad.layers) == ad.num_layers
    assert [lv.index for lv in ad.layers] == list(range(LAYERS))
    # config_fields name real attributes holding those counts (what shrinking rewrites)
    cfg, fields = model.config, ad.config_fields
    assert set(fields) >= {"num_layers", "num_heads", "num_kv_heads", "intermediate_size", "hidden_size"}
    assert getattr(cfg, fields["num_layers"]) == LAYERS
    assert getattr(cfg, fields["num_heads"]) == HEADS
    assert getattr(cfg, fields["num_kv_heads"]) == kv
    assert getattr(cfg, fields["hidden_size"]) == HIDDEN
    assert getattr(cfg, fields["intermediate_size"]) == (None if family == "gpt2" else FFN)
    assert fields["num_layers"] in cfg.to_dict()  # the stored attribute, not an alias
    sizes = (fields["num_layers"], fields["num_heads"], fields["hidden_size"], fields["intermediate_size"])
    if family == "distilbert":
        assert sizes == ("n_layers", "n_heads", "dim", "hidden_dim")
    if family == "gpt2":
        assert sizes == ("n_layer", "n_head", "n_embd", "n_inner")
    if family in ("llama", "qwen2"):
        assert fields["num_kv_heads"] == "num_key_value_heads" and fields["head_dim"] == "head_dim"


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_shapes(models: dict[str, nn.Module], family: str) -> None:
    ad = get_adapter(models[family])
    kv, ffn, gated, fused, norm_pos = EXPECTED[family]
    hd = ad.head_dim
    seen = set()
    for lv in ad.layers:
        att = lv.attention
        assert (att.num_heads, att.num_kv_heads, att.head_dim, att.fused_qkv) == (HEADS, kv, hd, fused)
        assert tuple(att.proj_weight("q").shape) == (HEADS * hd, HIDDEN)
        assert tuple(att.proj_weight("k").shape) == (kv * hd, HIDDEN)
        assert tuple(att.proj_weight("v").shape) == (kv * hd, HIDDEN)
        assert tuple(att.proj_weight("o").shape) == (HIDDEN, HEADS * hd)
        assert out_features(att.o) == HIDDEN and in_features(att.o) == HEADS * hd
        w, b = att.head_weight("k", kv - 1)
        assert tuple(w.shape) == (hd, HIDDEN) and (b is None or tuple(b.shape) == (hd,))
        assert att.kv_groups == HEADS // kv
        assert [att.kv_head_of(h) for h in range(HEADS)] == [h // (HEADS // kv) for h in range(HEADS)]
        assert (att.q is att.k is att.v) == fused
        f = lv.ffn
        assert f.intermediate_size == ffn and out_features(f.up) == ffn and in_features(f.down) == ffn
        assert out_features(f.down) == HIDDEN and in_features(f.up) == HIDDEN
        assert (f.gate is not None) == gated and (f.gate is None or out_features(f.gate) == ffn)
        assert f.act is not None and f.module is not None
        assert lv.norm_position == norm_pos
        assert lv.attn_norm.weight.shape == (HIDDEN,) and lv.ffn_norm.weight.shape == (HIDDEN,)
        assert lv.attn_norm is not lv.ffn_norm
        # every layer's view points at its own modules
        ids = (id(lv.module), id(att.q), id(att.o), id(f.up), id(f.down))
        assert not seen & set(ids)
        seen.update(ids)
        assert any(m is att.q for m in lv.module.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_per_part_and_per_head_weights_reproduce_the_projection(models: dict[str, nn.Module], family: str) -> None:
    att = get_adapter(models[family]).layers[1].attention
    x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for kind in ("q", "k", "v"):
            full = att.proj_module(kind)(x)[..., att.qkv_slice(kind)]
            assert torch.allclose(F.linear(x, att.proj_weight(kind), att.proj_bias(kind)), full, atol=1e-6)
            heads = att.num_heads if kind == "q" else att.num_kv_heads
            for h in range(heads):
                w, b = att.head_weight(kind, h)
                part = full[..., h * att.head_dim : (h + 1) * att.head_dim]
                assert torch.allclose(F.linear(x, w, b), part, atol=1e-6)
        y = torch.randn(2, 3, att.num_heads * att.head_dim)
        assert torch.allclose(att.o(y), F.linear(y, att.proj_weight("o"), att.proj_bias("o")), atol=1e-6)
    with pytest.raises(IndexError):
        att.head_slice("k", att.num_kv_heads)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head(models: dict[str, nn.Module], family: str) -> None:
    model = models[family]
    ad = get_adapter(model)
    expected_head = {"bert": "classifier", "roberta": "classifier", "distilbert": "classifier", "vit": "classifier",
                     "gpt2": "lm_head", "llama": "lm_head", "qwen2": "lm_head"}[family]
    assert ad.head is getattr(model, expected_head)
    assert any(m is ad.embeddings for m in ad.base_model.modules())
    if family in ("gpt2", "llama", "qwen2"):
        assert ad.embeddings is model.get_input_embeddings() and ad.causal
        assert ad.final_norm is not None
    else:
        assert not ad.causal
    assert (ad.final_norm is None) == (family in ("bert", "roberta", "distilbert"))
    assert get_adapter(ad.base_model).head is None  # a bare base model has no task head
    assert len(ad.layer_list) == LAYERS and ad.layer_list[0] is ad.layers[0].module


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_hidden_states_equal_hf(models: dict[str, nn.Module], family: str) -> None:
    model, inputs = models[family], _inputs(family)
    ad = get_adapter(model)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
        with ad.capture() as cap:
            model(**inputs)
    hs = cap.hidden_states
    assert len(hs) == ad.num_layers + 1 == len(ref)
    for i, (ours, theirs) in enumerate(zip(hs, ref)):
        assert ours.shape == (BATCH, _seq_len(family), HIDDEN)
        assert torch.allclose(ours, theirs, atol=1e-5), f"hidden state {i}"
    assert len(cap.layer_outputs) == LAYERS and cap.layer_outputs[0] is hs[1]
    assert cap.attentions == [None] * LAYERS  # not requested


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_attentions_equal_hf_eager(models: dict[str, nn.Module], family: str) -> None:
    model, inputs = models[family], _inputs(family, seed=2)
    ad = get_adapter(model)
    before = model.config._attn_implementation
    assert before == "sdpa"  # the default: no probabilities, so capture must switch to eager itself
    with torch.no_grad():
        with ad.capture(hidden_states=False, attentions=True) as cap:
            model(**inputs)
            assert model.config._attn_implementation == "eager"
        assert model.config._attn_implementation == before
        model.set_attn_implementation("eager")
        try:
            ref = model(**inputs, output_attentions=True).attentions
        finally:
            model.set_attn_implementation(before)
    t = _seq_len(family)
    assert len(cap.attentions) == LAYERS == len(ref) and cap.hidden_states == []
    for ours, theirs in zip(cap.attentions, ref):
        assert ours.shape == (BATCH, HEADS, t, t)
        assert torch.allclose(ours, theirs, atol=1e-6)
        assert torch.allclose(ours.sum(-1), torch.ones(BATCH, HEADS, t), atol=1e-5)
    if family != "vit":  # the padded key positions get no attention
        assert float(cap.attentions[0][1, :, :, -2:].abs().max()) < 1e-6
    if ad.causal:  # nothing above the diagonal
        assert float(torch.triu(cap.attentions[-1][0], diagonal=1).abs().max()) < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_attention_outputs_and_qkv(models: dict[str, nn.Module], family: str) -> None:
    model, inputs = models[family], _inputs(family, seed=3)
    ad = get_adapter(model)
    t, hd, kv = _seq_len(family), ad.head_dim, ad.num_kv_heads
    with torch.no_grad(), ad.capture(attention_outputs=True, qkv=True) as cap:
        model(**inputs)
    for i, lv in enumerate(ad.layers):
        assert cap.attention_outputs[i].shape == (BATCH, t, HIDDEN)
        assert cap.q[i].shape == (BATCH, t, HEADS * hd)
        assert cap.k[i].shape == (BATCH, t, kv * hd) and cap.v[i].shape == (BATCH, t, kv * hd)
        # q/k/v are the projections of the layer's (normed, for pre-norm) input, before RoPE
        x = cap.hidden_states[i]
        with torch.no_grad():
            x = lv.attn_norm(x) if lv.norm_position == "pre" else x
            for kind, got in (("q", cap.q[i]), ("k", cap.k[i]), ("v", cap.v[i])):
                want = F.linear(x, lv.attention.proj_weight(kind), lv.attention.proj_bias(kind))
                assert torch.allclose(got, want, atol=1e-5), f"layer {i} {kind}"
    # the attention output is the sub-layer's contribution before the residual: post-norm layers add it back
    lv = ad.layers[0]
    if lv.norm_position == "post":
        with torch.no_grad():
            normed = lv.attn_norm(cap.attention_outputs[0] + cap.hidden_states[0])
            layer_out = lv.ffn_norm(lv.ffn.down(lv.ffn.act(lv.ffn.up(normed))) + normed)
        assert torch.allclose(layer_out, cap.hidden_states[1], atol=1e-5)
    else:
        mid = cap.hidden_states[0] + cap.attention_outputs[0]
        with torch.no_grad():
            h = lv.ffn_norm(mid)
            inner = lv.ffn.act(lv.ffn.gate(h)) * lv.ffn.up(h) if lv.ffn.gate is not None else lv.ffn.act(lv.ffn.up(h))
            layer_out = mid + lv.ffn.down(inner)
        assert torch.allclose(layer_out, cap.layer_outputs[0], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_removed_after_context_and_on_exception(family: str) -> None:
    model = _build(family)  # fresh: transformers installs its own hooks once output_* flags are used
    ad = get_adapter(model)
    inputs = _inputs(family)
    assert _hook_count(model) == 0
    with torch.no_grad():
        with ad.capture(attentions=True, attention_outputs=True, qkv=True) as cap:
            assert _hook_count(model) > 0
            model(**inputs)
        assert _hook_count(model) == 0 and cap.forward_passes == 1
        assert model.config._attn_implementation == "sdpa"
        model(**inputs)  # afterwards the model runs without hooks: the capture sees nothing
        assert cap.forward_passes == 1

        with pytest.raises(RuntimeError, match="boom"):
            with ad.capture(attentions=True, attention_outputs=True, qkv=True) as cap2:
                model(**inputs)
                raise RuntimeError("boom")
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
        assert cap2.forward_passes == 1
        model(**inputs)
        assert cap2.forward_passes == 1

        # an error raised by the model itself (bad input) inside the context
        bad = {k: v[:, :, :3] if k == "pixel_values" else v.float() for k, v in inputs.items()}
        with pytest.raises(Exception):
            with ad.capture(attentions=True):
                model(**bad)
        assert _hook_count(model) == 0 and model.config._attn_implementation == "sdpa"


def test_capture_holds_the_latest_forward_and_keeps_gradients() -> None:
    model = _build("llama")
    ad = get_adapter(model)
    a, b = _inputs("llama", seed=4), _inputs("llama", seed=5)
    with ad.capture(attentions=True) as cap:
        model(**a)
        first = cap.hidden_states[2].detach().clone()
        model(**b)
        assert cap.forward_passes == 2
        assert not torch.allclose(cap.hidden_states[2], first)
        loss = cap.hidden_states[-1].pow(2).mean() + cap.attentions[0].mean()
    loss.backward()  # captures keep the autograd graph (distillation losses go through them)
    assert ad.layers[0].attention.q.weight.grad is not None
    assert float(ad.layers[0].attention.q.weight.grad.abs().sum()) > 0
    with torch.no_grad():
        ref = model(**b, output_hidden_states=True).hidden_states
    assert torch.allclose(cap.hidden_states[2], ref[2], atol=1e-5)
    with ad.capture(detach=True) as cap:
        model(**a)
    assert not cap.hidden_states[1].requires_grad


def test_views_follow_physical_edits() -> None:
    model = _build("bert")
    ad = get_adapter(model)
    parent_list = ad.layer_list
    model.bert.encoder.layer = nn.ModuleList([parent_list[0], parent_list[2]])
    setattr(model.config, ad.config_fields["num_layers"], 2)
    assert ad.num_layers == 2 and len(ad.layers) == 2 and ad.layers[1].module is parent_list[2]
    with torch.no_grad(), ad.capture() as cap:
        model(**_inputs("bert"))
    assert len(cap.hidden_states) == 3


def test_unsupported_model_type_is_an_input_error() -> None:
    import transformers as T

    torch.manual_seed(0)
    albert = T.AlbertModel(T.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=HIDDEN, num_hidden_layers=1,
                                          num_attention_heads=HEADS, intermediate_size=FFN))
    expected = r"model type 'albert' is not supported by compress adapters: missing .*supported: bert"
    with pytest.raises(InputError, match=expected):
        get_adapter(albert)
    with pytest.raises(InputError, match=r"model type 'Linear' .*missing config.model_type"):
        get_adapter(nn.Linear(2, 2))
    broken = _build("bert")
    del broken.bert.encoder.layer  # a supported type whose structure does not fit the table
    expected = r"model type 'bert' \(BertForSequenceClassification\).*missing the layer list"
    with pytest.raises(InputError, match=expected):
        get_adapter(broken)


def test_attention_capture_fails_loudly_without_probabilities() -> None:
    """An attention module that returns no probabilities is an error, not silently empty lists."""
    from compress.errors import CompressError
    from compress.models import FamilySpec, register_family
    from compress.models.base import FAMILY_SPECS as _SPECS

    model = _build("bert")
    spec = _SPECS["bert"]
    # point the attention module at the self-output block, which returns a single tensor
    register_family(FamilySpec(**{**spec.__dict__, "attn_module": ("attention.output",)}))
    try:
        ad = get_adapter(model)
        with pytest.raises(CompressError, match="returned no probabilities"), ad.capture(attentions=True):
            with torch.no_grad():
                model(**_inputs("bert"))
        assert _hook_count(model) == 0
    finally:
        register_family(spec)
