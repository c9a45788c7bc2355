"""One-shot pruning by importance: score the units of a model, then keep the best ones to meet a params target.

Scores (`Scores`: per layer a score per query head and per FFN neuron, one per hidden channel; higher = more
important) come from one of three methods:

- `magnitude`: the L2 norm of the weights a unit owns (a head: its q rows, o columns and its share of k/v rows;
  a neuron: its up/gate rows and down column; a hidden channel: its embedding column and every layer
  projection's row or column on that channel). No data.
- `taylor`: first-order Taylor, |dL/dm| for a multiplicative mask m = 1 on the unit (`compress.prune.apply`), which
  equals |sum over the unit's weights of grad x weight|; summed over a few batches of a loss.
- `activation` (Minitron): mean |activation| over calibration tokens: each head's slice of the o-projection's input,
  each neuron's input to the down projection, each hidden channel's output of the hidden-width norms.

`plan_for_target` turns scores into a `KeepPlan`: one keep ratio for the chosen granularities, found by bisection
so that `count_params(model, plan)` meets the target (params or a fraction of the model's). `scope='layer'` keeps the
same share in every layer; `scope='global'` ranks each granularity across layers (a layer can lose all its heads
or neurons: the sub-layer is then removed). GQA models lose whole key/value groups (a group's score is the sum of
its query heads'), so the result is always a valid grouping. `round_to` rounds kept FFN and hidden sizes up to a
multiple (heads stay whole heads).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import InputError
from compress.models import get_adapter, proj_weight
from compress.prune.plan import KeepPlan

log = logging.getLogger(__name__)

METHODS = ("magnitude", "taylor", "activation")
GRANULARITIES = ("heads", "ffn", "hidden", "layers")
Batch = dict[str, torch.Tensor]


@dataclass
class Scores:
    """Importance per unit (higher = keep). Layer keys are the model's layer indices."""

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    method: str = ""
    layers: torch.Tensor | None = None  # one per layer (block importance), when asked for

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "heads": {str(k): v.tolist() for k, v in self.heads.items()},
                "ffn": {str(k): v.tolist() for k, v in self.ffn.items()},
                "hidden": None if self.hidden is None else self.hidden.tolist(),
                "layers": None if self.layers is None else self.layers.tolist()}


# ---------------------------------------------------------------------------------------------------- counting


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of `model` whose parameters and buffers live on the meta device (no memory, no data)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def count_params(model: nn.Module, plan: KeepPlan | None = None) -> int:
    """Parameters `model` has (shared ones once), or would have after `shrink(model, plan)` (computed on a meta
    copy: no weights are touched)."""
    from compress.prune.shrink import shrink

    if plan is None:
        return sum(p.numel() for p in model.parameters())
    pruned = shrink(meta_copy(model), plan)
    return sum(p.numel() for p in pruned.parameters())


# ---------------------------------------------------------------------------------------------------- scores


def _sq(t: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Sum of squares of `t` over every dimension but `dim`."""
    if t is None:
        return torch.tensor(0.0)
    t = t.detach().float()
    if t.dim() == 1:
        return t.pow(2)
    return t.pow(2).sum(dim=1 - dim)


def magnitude_scores(model: nn.Module) -> Scores:
    adapter = get_adapter(model)
    scores = Scores(method="magnitude")
    hidden = torch.zeros(adapter.hidden_size)
    for lv in adapter.layers:
        att, ffn = lv.attention, lv.ffn
        hd, g = att.head_dim, max(1, att.kv_groups) if att.num_kv_heads else 1
        if att.num_heads:
            q, k, v, o = (att.proj_weight(x).detach().float() for x in ("q", "k", "v", "o"))
            per_q = q.pow(2).reshape(att.num_heads, hd, -1).sum(dim=(1, 2))
            per_o = o.pow(2).reshape(o.shape[0], att.num_heads, hd).sum(dim=(0, 2))
            kv = (k.pow(2) + v.pow(2)).reshape(att.num_kv_heads, hd, -1).sum(dim=(1, 2))
            per_kv = kv.repeat_interleave(g) / g
            scores.heads[lv.index] = (per_q + per_o + per_kv).sqrt()
            hidden += q.pow(2).sum(0) + k.pow(2).sum(0) + v.pow(2).sum(0) + o.pow(2).sum(1)
        if ffn.intermediate_size:
            up, down = proj_weight(ffn.up).detach().float(), proj_weight(ffn.down).detach().float()
            per = up.pow(2).sum(1) + down.pow(2).sum(0)
            hidden += up.pow(2).sum(0) + down.pow(2).sum(1)
            if ffn.gate is not None:
                gate = proj_weight(ffn.gate).detach().float()
                per = per + gate.pow(2).sum(1)
                hidden += gate.pow(2).sum(0)
            scores.ffn[lv.index] = per.sqrt()
    from compress.prune.shrink import word_embedding

    if adapter.vocab_size is not None:
        hidden += word_embedding(adapter).weight.detach().float().pow(2).sum(0)
    scores.hidden = hidden.sqrt()
    return scores


def _default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    kwargs = dict(batch)
    if "labels" not in kwargs and getattr(model.config, "is_decoder", False) is False and \
            get_adapter(model).causal and "input_ids" in kwargs:
        kwargs["labels"] = kwargs["input_ids"]
    out = model(**kwargs)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise InputError("importance 'taylor': the batches carry no labels and the model returns no loss; "
                         "give batches with labels or a loss_fn")
    return loss


def taylor_scores(model: nn.Module, batches: Iterable[Batch],
                  loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None) -> Scores:
    """|dL/dm| of unit masks m = 1 (first-order Taylor), summed over `batches`; the model's weights get no
    gradient and are left as they were."""
    from compress.prune.apply import MaskSet, apply_masks

    adapter = get_adapter(model)
    views = adapter.layers
    p = next(model.parameters())
    masks = MaskSet(
        heads={lv.index: torch.ones(lv.attention.num_heads, device=p.device, requires_grad=True)
               for lv in views if lv.attention.num_heads},
        ffn={lv.index: torch.ones(lv.ffn.intermediate_size, device=p.device, requires_grad=True)
             for lv in views if lv.ffn.intermediate_size},
        hidden=torch.ones(adapter.hidden_size, device=p.device, requires_grad=True),
    )
    totals = Scores(method="taylor", heads={k: torch.zeros_like(v) for k, v in masks.heads.items()},
                    ffn={k: torch.zeros_like(v) for k, v in masks.ffn.items()},
                    hidden=torch.zeros(adapter.hidden_size, device=p.device))
    loss_fn = loss_fn or _default_loss
    flags = [q.requires_grad for q in model.parameters()]
    was_training = model.training
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    n = 0
    try:
        with apply_masks(model, masks):
            for batch in batches:
                leaves = [*masks.heads.values(), *masks.ffn.values(), masks.hidden]
                grads = torch.autograd.grad(loss_fn(model, batch), leaves, allow_unused=True)
                for key, grad in zip([*[("heads", k) for k in masks.heads], *[("ffn", k) for k in masks.ffn],
                                      ("hidden", None)], grads):
                    if grad is None:
                        continue
                    if key[0] == "hidden":
                        totals.hidden += grad.abs()
                    else:
                        getattr(totals, key[0])[key[1]] += grad.abs()
                n += 1
    finally:
        for q, flag in zip(model.parameters(), flags):
            q.requires_grad_(flag)
        model.train(was_training)
    if n == 0:
        raise InputError("importance 'taylor': no batches; give at least one calibration batch")
    totals.heads = {k: v.detach().cpu() for k, v in totals.heads.items()}
    totals.ffn = {k: v.detach().cpu() for k, v in totals.ffn.items()}
    totals.hidden = totals.hidden.detach().cpu()
    return totals


def activation_scores(model: nn.Module, batches: Iterable[Batch]) -> Scores:
    """Minitron: mean |activation| per head (its slice of the o-projection input), per neuron (its input to the
    down projection) and per hidden channel (the outputs of the hidden-width norms), over all tokens."""
    from compress.prune.units import hidden_sites

    adapter = get_adapter(model)
    views = adapter.layers
    sums: dict[tuple[str, int], torch.Tensor] = {}
    counts: dict[tuple[str, int], int] = {}
    handles = []

    def add(key: tuple[str, int], x: torch.Tensor) -> None:
        x = x.detach().float().abs()
        flat = x.reshape(-1, x.shape[-1])
        sums[key] = sums.get(key, 0) + flat.sum(0).cpu()
        counts[key] = counts.get(key, 0) + flat.shape[0]

    for lv in views:
        if lv.attention.num_heads:
            hd = lv.attention.head_dim

            def o_in(m: nn.Module, args: tuple, i: int = lv.index, hd: int = hd) -> None:
                x = args[0]
                add(("heads", i), x.reshape(*x.shape[:-1], -1, hd).norm(dim=-1))

            handles.append(lv.attention.o.register_forward_pre_hook(o_in))
        if lv.ffn.intermediate_size:
            handles.append(lv.ffn.down.register_forward_pre_hook(
                lambda m, args, i=lv.index: add(("ffn", i), args[0])))
    for norm in hidden_sites(adapter).norms:
        handles.append(norm.register_forward_hook(lambda m, args, out: add(("hidden", 0), out)))
    n = 0
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise InputError("importance 'activation': no batches; give at least one calibration batch")
    mean = {k: v / counts[k] for k, v in sums.items()}
    return Scores(method="activation",
                  heads={i: v for (kind, i), v in mean.items() if kind == "heads"},
                  ffn={i: v for (kind, i), v in mean.items() if kind == "ffn"},
                  hidden=mean.get(("hidden", 0)))


def layer_scores(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """Block importance of every layer (ShortGPT; Minitron's depth importance): 1 - the mean cosine similarity
    between a layer's input and output hidden states over all tokens. A layer that barely changes its input
    scores near 0 and is the first to go."""
    adapter = get_adapter(model)
    n = adapter.num_layers
    sims = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def first(x: Any) -> torch.Tensor:
        return x[0] if isinstance(x, (tuple, list)) else x

    for lv in adapter.layers:
        def pre(m: nn.Module, args: tuple, kwargs: dict, i: int = lv.index) -> None:
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any, i: int = lv.index) -> None:
            x, y = inputs.pop(i).float(), first(out).detach().float()
            cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
            sims[i] += cos.double().sum().cpu()
            counts[i] += cos.numel()

        handles.append(lv.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(lv.module.register_forward_hook(post, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not counts.all():
        raise InputError("importance of layers: no batches; give at least one calibration batch")
    return (1 - sims / counts).float()


def score_units(model: nn.Module, method: str, batches: Iterable[Batch] | None = None,
                loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None, *, layers: bool = False) -> Scores:
    """Scores of every head, FFN neuron and hidden channel by `method` (see the module docstring); with
    `layers`, also each whole layer's block importance (`layer_scores`, from `batches` whatever the method)."""
    if method not in METHODS:
        raise InputError(f"importance method '{method}': choose one of {', '.join(METHODS)}")
    if batches is not None:
        batches = list(batches)
    if (method != "magnitude" or layers) and batches is None:
        what = f"importance method '{method}'" if method != "magnitude" else "pruning whole layers"
        raise InputError(f"{what} needs calibration batches (data.calibration or data.train)")
    if method == "magnitude":
        scores = magnitude_scores(model)
    else:
        scores = taylor_scores(model, batches, loss_fn) if method == "taylor" else activation_scores(model, batches)
    if layers:
        scores.layers = layer_scores(model, batches)
    return scores


# ---------------------------------------------------------------------------------------------------- plans


def round_up(k: int, n: int, multiple: int | None) -> int:
    """`k` rounded up to a multiple of `multiple`, at most `n` (0 stays 0)."""
    if not multiple or k == 0:
        return k
    return min(n, int(math.ceil(k / multiple) * multiple))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    k = max(0, min(int(k), scores.numel()))
    if k == 0:
        return []
    return sorted(torch.topk(scores.float(), k).indices.tolist())


def _head_units(model: nn.Module, scores: Scores) -> dict[int, tuple[torch.Tensor, int]]:
    """layer -> (scores of its prunable head units, query heads per unit): kv groups for GQA, else heads."""
    out = {}
    for lv in get_adapter(model).layers:
        s = scores.heads.get(lv.index)
        att = lv.attention
        if s is None or not att.num_heads:
            continue
        g = att.kv_groups
        out[lv.index] = (s.float().reshape(-1, g).sum(1) if g > 1 else s.float(), g)
    return out


def _expand_heads(units: list[int], g: int) -> list[int]:
    return [u * g + t for u in units for t in range(g)]


def _even_heads(model: nn.Module, scores: Scores, ratio: float) -> dict[int, list[int]]:
    """GQA, query heads removed evenly: in every kv group of every layer, the best round(ratio * group) (at least
    one) of its query heads."""
    kept: dict[int, list[int]] = {}
    for lv in get_adapter(model).layers:
        s, att = scores.heads.get(lv.index), lv.attention
        if s is None or not att.num_heads:
            continue
        g = att.kv_groups
        per_group = max(1, round(ratio * g))
        kept[lv.index] = sorted(grp * g + j for grp, row in enumerate(s.float().reshape(-1, g))
                                for j in torch.topk(row, per_group).indices.tolist())
    return kept


def plan_at_ratio(model: nn.Module, scores: Scores, ratio: float, *, granularities: Iterable[str] = ("heads", "ffn"),
                  scope: Literal["global", "layer"] = "global", round_to: int | None = None,
                  gqa: Literal["groups", "even"] = "groups") -> KeepPlan:
    """Keep the best `ratio` share of each granularity's units (per layer, or ranked across layers). GQA models
    lose whole kv groups (`gqa='groups'`) or the same number of query heads in every group (`'even'`, per
    layer whatever the scope)."""
    grans = set(granularities)
    unknown = grans - set(GRANULARITIES)
    if unknown:
        raise InputError(f"prune granularities: unknown {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(GRANULARITIES)}")
    if gqa not in ("groups", "even"):
        raise InputError(f"prune gqa: '{gqa}' should be 'groups' (drop whole key/value groups) or 'even' (the same "
                         "number of query heads in every group)")
    adapter = get_adapter(model)
    plan = KeepPlan()
    if "heads" in grans and gqa == "even" and adapter.num_kv_heads < adapter.num_heads:
        plan.heads = _even_heads(model, scores, ratio)
        grans = grans - {"heads"}
    tables: list[tuple[str, dict[int, tuple[torch.Tensor, int]]]] = []
    if "heads" in grans:
        tables.append(("heads", _head_units(model, scores)))
    if "ffn" in grans:
        tables.append(("ffn", {i: (s.float(), 1) for i, s in scores.ffn.items()}))
    for name, table in tables:
        if not table:
            continue
        kept: dict[int, list[int]] = {}
        if scope == "layer":
            for i, (s, g) in table.items():
                kept[i] = _top(s, max(1, round(ratio * s.numel())))
        else:  # global: normalise each layer's scores by its mean so that layers compare
            flat = torch.cat([s / (s.mean() + 1e-12) for s, _ in table.values()])
            k = max(1, round(ratio * flat.numel()))
            threshold = torch.topk(flat, k).values.min()
            for i, (s, g) in table.items():
                kept[i] = [j for j, v in enumerate((s / (s.mean() + 1e-12)).tolist()) if v >= threshold]
        for i, units in kept.items():
            s, g = table[i]
            if name == "ffn" and round_to:
                units = _top(s, round_up(len(units), s.numel(), round_to))
            getattr(plan, name)[i] = _expand_heads(units, g) if name == "heads" else units
    if "hidden" in grans and scores.hidden is not None:
        n = scores.hidden.numel()
        plan.hidden = _top(scores.hidden, round_up(max(1, round(ratio * n)), n, round_to))
    if "layers" in grans:  # the best round(ratio * n) layers (at least one), by block importance
        if scores.layers is None:
            raise InputError("prune granularity 'layers': the scores have no layer importance; score with "
                             "score_units(..., layers=True) on calibration batches")
        plan.layers = _top(scores.layers, max(1, round(ratio * scores.layers.numel())))
    del adapter
    return plan


def plan_for_target(model: nn.Module, scores: Scores, *, params: int | None = None, fraction: float | None = None,
                    granularities: Iterable[str] = ("heads", "ffn"), scope: Literal["global", "layer"] = "global",
                    round_to: int | None = None, keep_vocab: list[int] | None = None,
                    gqa: Literal["groups", "even"] = "groups") -> KeepPlan:
    """The plan with the largest keep ratio whose `count_params` is at most the target: `params` (a count) or
    `fraction` (of the model's parameters, in (0, 1]). InputError when the target cannot be met by these
    granularities (the smallest plan they allow is still larger)."""
    total = count_params(model)
    if (params is None) == (fraction is None):
        raise InputError("prune target: give exactly one of params or fraction")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise InputError(f"prune target fraction: {fraction} must be in (0, 1] (the share of parameters kept; "
                             "sparsity = 1 - fraction must stay below 1)")
        params = int(fraction * total)
    assert params is not None
    grans = tuple(granularities)

    def build(r: float) -> KeepPlan:
        plan = plan_at_ratio(model, scores, r, granularities=grans, scope=scope, round_to=round_to, gqa=gqa)
        plan.vocab = keep_vocab
        return plan

    if count_params(model, build(1.0)) <= params:
        return build(1.0)
    floor = count_params(model, build(0.0))
    if floor > params:
        raise InputError(f"prune target: {params} parameters cannot be met by pruning {', '.join(grans)} "
                         f"(the smallest such model has {floor} of {total}); add granularities (hidden, vocab) or "
                         "raise the target")
    lo, hi = 0.0, 1.0  # count(build(lo)) <= params < count(build(hi))
    for _ in range(20):
        mid = (lo + hi) / 2
        if count_params(model, build(mid)) <= params:
            lo = mid
        else:
            hi = mid
    plan = build(lo)
    log.info("importance plan: keep ratio %.4f -> %d params (target %d of %d)", lo, count_params(model, plan),
             params, total)
    return plan


def _grow(kept: list[int], n: int, target: int, scores: torch.Tensor | None) -> list[int]:
    if target <= len(kept):
        return list(kept)
    missing = [j for j in range(n) if j not in set(kept)]
    if scores is not None:
        missing.sort(key=lambda j: -float(scores[j]))
    return sorted([*kept, *missing[: target - len(kept)]])


def round_plan(model: nn.Module, plan: KeepPlan, multiple: int, scores: Scores | None = None) -> KeepPlan:
    """`plan` with every kept FFN width and the kept hidden size rounded up to a multiple of `multiple` (at most
    the full size), adding the best-scored missing units (the lowest indices without scores). Heads stay as they
    are (whole heads); an empty list (a removed sub-layer) stays empty."""
    if multiple not in (1, 8, 16, 32, 64, 128):
        raise InputError(f"prune round_to: {multiple} should be one of 8, 16, 32, 64, 128 (or 1 for no rounding)")
    adapter = get_adapter(model)
    sizes = {lv.index: lv.ffn.intermediate_size for lv in adapter.layers}
    out = KeepPlan(layers=None if plan.layers is None else list(plan.layers),
                   heads={k: list(v) for k, v in plan.heads.items()},
                   vocab=None if plan.vocab is None else list(plan.vocab))
    for i, kept in plan.ffn.items():
        n = sizes[int(i)]
        s = None if scores is None else scores.ffn.get(int(i))
        out.ffn[i] = _grow(list(kept), n, round_up(len(kept), n, multiple), s)
    if plan.hidden is not None:
        n = adapter.hidden_size
        out.hidden = _grow(list(plan.hidden), n, round_up(len(plan.hidden), n, multiple),
                           None if scores is None else scores.hidden)
    return out
