"""One-shot importance (compress.prune.importance) on constructed cases: a unit made useless is pruned first."""
from __future__ import annotations

import pytest
import torch

from compress.errors import InputError
from compress.models import get_adapter, proj_weight
from compress.prune.importance import count_params, plan_at_ratio, plan_for_target, score_units
from compress.prune.plan import KeepPlan
from compress.prune.shrink import shrink
from tests.test_adapters import _build, _inputs


def _silence(model, layer: int, head: int, neuron: int) -> None:
    """Head `head` of `layer` outputs nothing (its v rows and o columns are 0) and FFN neuron `neuron` neither
    (its up row, bias and down column are 0)."""
    lv = get_adapter(model).layers[layer]
    att, ffn = lv.attention, lv.ffn
    hd = att.head_dim
    with torch.no_grad():
        att.proj_weight("v")[head * hd:(head + 1) * hd] = 0
        att.proj_weight("q")[head * hd:(head + 1) * hd] = 0
        att.proj_weight("k")[head * hd:(head + 1) * hd] = 0
        for kind in ("q", "k", "v"):
            b = att.proj_bias(kind)
            if b is not None:
                b[head * hd:(head + 1) * hd] = 0
        att.proj_weight("o")[:, head * hd:(head + 1) * hd] = 0
        proj_weight(ffn.up)[neuron] = 0
        if ffn.up.bias is not None:
            ffn.up.bias[neuron] = 0
        proj_weight(ffn.down)[:, neuron] = 0


@pytest.mark.parametrize("method", ["magnitude", "taylor", "activation"])
def test_a_silenced_head_and_neuron_are_pruned_first(method: str) -> None:
    model = _build("bert")
    _silence(model, layer=1, head=2, neuron=5)
    x = _inputs("bert")
    batches = [{**x, "labels": torch.tensor([0, 1])}, {**_inputs("bert", seed=2), "labels": torch.tensor([1, 1])}]
    scores = score_units(model, method, batches)
    assert int(scores.heads[1].argmin()) == 2
    assert int(scores.ffn[1].argmin()) == 5
    assert float(scores.ffn[1][5]) < 1e-6 * float(scores.ffn[1].max()) or method == "magnitude" and float(scores.ffn[1][5]) == 0
    plan = plan_at_ratio(model, scores, 0.75, granularities=("heads", "ffn"), scope="layer")
    assert 2 not in plan.heads[1] and 5 not in plan.ffn[1] and len(plan.heads[1]) == 3


def test_gqa_models_lose_whole_groups_and_hidden_channels_are_ranked() -> None:
    model = _build("llama")  # 4 query heads in 2 kv groups
    scores = score_units(model, "magnitude")
    scores.heads[0] = torch.tensor([5.0, 4.0, 0.1, 0.2])
    scores.hidden = torch.arange(32, dtype=torch.float)
    plan = plan_at_ratio(model, scores, 0.5, granularities=("heads", "hidden"), scope="layer")
    assert plan.heads[0] == [0, 1] and plan.hidden == list(range(16, 32))
    shrink(model, plan)  # a valid grouping
    # 'even': the best query head of each group (head 0 of group 0, head 3 of group 1)
    even = plan_at_ratio(model, scores, 0.5, granularities=("heads",), gqa="even")
    assert even.heads[0] == [0, 3]
    assert get_adapter(shrink(model, even)).layers[0].attention.num_kv_heads == 2


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_plan_for_target_meets_a_params_target_and_rounds(scope: str) -> None:
    model = _build("bert")
    total = count_params(model)
    scores = score_units(model, "magnitude")
    plan = plan_for_target(model, scores, fraction=0.6, granularities=("heads", "ffn", "hidden"), scope=scope, round_to=8)
    kept = count_params(model, plan)
    assert 0.45 * total < kept <= 0.6 * total
    assert kept == sum(p.numel() for p in shrink(model, plan).parameters())
    assert all(len(v) % 8 == 0 for v in plan.ffn.values()) and len(plan.hidden) % 8 == 0
    assert plan_for_target(model, scores, params=kept, granularities=("heads", "ffn", "hidden"), scope=scope,
                           round_to=8).to_dict() == plan.to_dict()


def test_count_params_of_a_plan_equals_the_shrunk_model() -> None:
    model = _build("gpt2")  # tied LM head counted once
    plan = KeepPlan(layers=[0, 2], heads={0: [1]}, ffn={2: list(range(7))}, hidden=list(range(12)), vocab=list(range(50)))
    assert count_params(model, plan) == sum(p.numel() for p in shrink(model, plan).parameters())
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_bad_targets_and_methods_are_input_errors() -> None:
    model = _build("bert")
    scores = score_units(model, "magnitude")
    with pytest.raises(InputError, match="sparsity = 1 - fraction must stay below 1"):
        plan_for_target(model, scores, fraction=0.0)
    with pytest.raises(InputError, match="cannot be met by pruning heads, ffn"):
        plan_for_target(model, scores, fraction=0.05, granularities=("heads", "ffn"))
    with pytest.raises(InputError, match="importance method 'fisher': choose one of magnitude, taylor, activation"):
        score_units(model, "fisher", [])
    with pytest.raises(InputError, match="needs calibration batches"):
        score_units(model, "taylor")
    with pytest.raises(InputError, match="prune granularities: unknown vocabulary"):
        plan_at_ratio(model, scores, 0.5, granularities=("vocabulary",))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_a_layer_that_passes_its_input_through_is_dropped_first(family: str) -> None:
    """Layer 1 made an identity (its attention output and FFN down projections are 0): its block importance
    (1 - cos(input, output)) is about 0, the lowest; a layers plan drops it, and for pre-norm families the
    shrunk model computes exactly what the model did."""
    model = _build(family).eval()
    lv = get_adapter(model).layers[1]
    with torch.no_grad():
        for lin in (lv.attention.o, lv.ffn.down):
            proj_weight(lin).zero_()
            if getattr(lin, "bias", None) is not None:
                lin.bias.zero_()
    x = _inputs(family)
    scores = score_units(model, "activation", [x], layers=True)
    assert scores.layers.shape == (3,) and int(scores.layers.argmin()) == 1
    assert float(scores.layers[1]) < 0.1 * float(scores.layers[[0, 2]].min()), scores.layers
    plan = plan_at_ratio(model, scores, 0.6, granularities=["layers"])
    assert plan.layers == [0, 2]
    small = shrink(model, plan)
    assert get_adapter(small).num_layers == 2
    if get_adapter(model).layers[0].norm_position == "pre":
        with torch.no_grad():
            torch.testing.assert_close(small(**x).logits, model(**x).logits, atol=1e-5, rtol=1e-4)
    # the layer scores do not depend on the unit method; magnitude needs batches for them
    if family == "bert":
        labelled = {**x, "labels": torch.zeros(x["input_ids"].shape[0], dtype=torch.long)}
        torch.testing.assert_close(score_units(model, "taylor", [labelled], layers=True).layers, scores.layers)
    with pytest.raises(InputError, match="pruning whole layers needs calibration batches"):
        score_units(model, "magnitude", layers=True)
    with pytest.raises(InputError, match="no layer importance"):
        plan_at_ratio(model, score_units(model, "magnitude"), 0.5, granularities=["layers"])
