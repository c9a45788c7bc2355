"""A searched student made from the teacher's weights (TinyCLIP-style weight inheritance): `plan_for` turns a
shape (`compress.search.space.Candidate`) into a `compress.prune.KeepPlan` (kept layers, uniform or by importance;
the most important heads, FFN neurons and hidden channels by `compress.prune` importance scores), and
`build_student` applies it with `compress.prune.shrink`: the pruning code, one slicing, not two."""
from __future__ import annotations

from typing import Any

from torch import nn

from compress.errors import InputError
from compress.search.inherit import uniform_layers

LAYER_CHOICES = ("uniform", "importance")


def layer_importance(scores: Any, num_layers: int) -> list[float]:
    """One number per teacher layer: the sum of its heads' and FFN neurons' importance, each granularity
    normalised by its mean over all layers so that heads and neurons weigh alike."""
    def per_layer(table: dict[int, Any]) -> list[float]:
        sums = [float(table[i].float().sum()) if i in table else 0.0 for i in range(num_layers)]
        mean = sum(sums) / max(1, num_layers)
        return [s / mean if mean > 0 else 0.0 for s in sums]

    h, f = per_layer(scores.heads), per_layer(scores.ffn)
    return [a + b for a, b in zip(h, f)]


def _top(values: Any, k: int) -> list[int]:
    import torch

    t = torch.as_tensor(values, dtype=torch.float32)
    if k >= t.numel():
        return list(range(t.numel()))
    return sorted(torch.topk(t, k).indices.tolist())


def plan_for(teacher: nn.Module, cand: Any, scores: Any, *, layers: str = "uniform",
             kept_vocab: list[int] | None = None) -> Any:
    """The `compress.prune.KeepPlan` that slices `teacher` to the shape `cand` (a `compress.search.space.Candidate`):
    its layers (every k-th, or the most important), then in each kept layer the most important query heads (for
    grouped-query families: the most important key/value groups, and in each the most important query heads),
    FFN neurons and hidden channels by `scores` (`compress.prune.Scores`). A dimension equal to the teacher's keeps
    everything, in order, so the teacher's own shape gives a plan that keeps the teacher whole."""
    from compress.models import get_adapter
    from compress.prune.plan import KeepPlan

    a = get_adapter(teacher)
    n, nh, kv, ff, hid = a.num_layers, a.num_heads, a.num_kv_heads, a.intermediate_size, a.hidden_size
    if layers not in LAYER_CHOICES:
        raise InputError(f"search.inherit_layers: '{layers}' is not one of {', '.join(LAYER_CHOICES)}")
    if cand.layers == n:
        kept_layers = list(range(n))
    elif layers == "uniform":
        kept_layers = uniform_layers(n, cand.layers)
    else:
        kept_layers = _top(layer_importance(scores, n), cand.layers)
    plan = KeepPlan(layers=None if kept_layers == list(range(n)) else kept_layers)
    group = nh // kv
    s_kv = cand.kv_heads or cand.heads
    per_group = cand.heads // s_kv
    for i in kept_layers:
        if cand.heads != nh:
            hs = scores.heads[i].float()
            if group > 1:  # whole key/value groups, then the best query heads inside each
                groups = _top(hs.reshape(kv, group).sum(1), s_kv)
                plan.heads[i] = sorted(g * group + j for g in groups for j in _top(hs[g * group:(g + 1) * group], per_group))
            else:
                plan.heads[i] = _top(hs, cand.heads)
        if cand.ffn != ff:
            plan.ffn[i] = _top(scores.ffn[i], cand.ffn)
    if cand.hidden != hid:
        plan.hidden = _top(scores.hidden, cand.hidden)
    if getattr(cand, "trim_vocab", False) and kept_vocab is not None:
        plan.vocab = list(kept_vocab)
    return plan


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Random init in place (the family's own `_init_weights`), for comparison with inheritance."""
    import torch

    torch.manual_seed(seed)
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise InputError(f"search.init: {type(model).__name__} has no _init_weights; use init: inherit")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight") or hasattr(m, "bias"):
                init(m)
    return model


def build_student(teacher: nn.Module, cand: Any, scores: Any, *, layers: str = "uniform", init: str = "inherit",
                  kept_vocab: list[int] | None = None, unk_id: int | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    """The student of shape `cand` sliced from `teacher` with `compress.prune.shrink` (the one slicing: the
    same code that physically prunes), and the plan used. A trimmed vocabulary goes through
    `compress.prune.vocab.trim_model` (kept rows, then one extra row for every dropped token, a copy of [UNK]'s).
    `init='random'` re-initialises the student afterwards."""
    import dataclasses

    from compress.prune.shrink import shrink

    plan = plan_for(teacher, cand, scores, layers=layers, kept_vocab=kept_vocab)
    student = shrink(teacher, dataclasses.replace(plan, vocab=None))
    if plan.vocab is not None:
        from compress.prune.vocab import trim_model

        if unk_id is None:
            raise InputError("search.space.trim_vocab: the tokenizer has no unknown token to send dropped tokens to")
        student = trim_model(student, plan.vocab, unk_id)
    if init == "random":
        reinitialise(student, seed)
    elif init != "inherit":
        raise InputError(f"search.init: '{init}' is not one of inherit, random")
    return student, plan
