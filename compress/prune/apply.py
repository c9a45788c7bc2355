"""The masked model: what a pruning decision computes before anything is removed.

`apply_masks(model, masks)` puts forward hooks on the model (through the model adapters and `units.hidden_sites`)
that multiply units by mask values; `shrink(model, plan)` gives the same outputs as
`apply_masks(model, MaskSet.from_plan(model, plan))` (tested to ~1e-5 on every family). The definition, per mask:

- heads[l] ([num query heads]): multiplies each head's slice of the o-projection's input (GQA: query heads;
  a kv head only feeds its own query heads, so removing all of them removes it);
- attention[l] (scalar): multiplies the attention sub-layer's output (the o-projection's output). When it is
  exactly 0 in a post-norm family (BERT, RoBERTa, DistilBERT), the sub-layer's LayerNorm is skipped too, so the
  sub-layer is the identity (as CoFi does when the sub-layer's output is all zeros);
- ffn[l] ([intermediate]): multiplies the down projection's input; ffn_layer[l] (scalar): its output, with the
  same post-norm rule;
- hidden ([hidden]): multiplies the output of every projection that writes the hidden size (o, down, and
  outside the layers a pooler's or classifier's dense) and of every LayerNorm/RMSNorm of hidden width, and each
  such norm computes its statistics over the channels whose mask is non-zero only (CoFi's hidden masking); the
  input of the first layer (the embeddings' output) is multiplied by the mask's 0/1 indicator (mask != 0). With
  0/1 masks the removed channels are exactly 0 everywhere, which is what removing them computes; soft values
  sit only where `fold_masks` can put them into weights.

Mask values are read at every forward from the `MaskSet` (dicts of tensors, or tensors indexed by layer), so a
learner can replace them (e.g. hard-concrete samples that require grad) between steps; gradients flow to them.
Whole layers in a plan become attention = ffn_layer = 0 (the layer is then the identity).

Soft masks (values in (0, 1]) are materialised by `materialize(model, masks)`: `fold_masks` multiplies the values
into the weights (o columns per head, o rows and bias by the attention scalar and the hidden mask, down columns per
neuron, down rows and bias, norms' weight and bias, the outside writers), `plan_from_masks` keeps the units whose
mask is non-zero, and `shrink` removes the rest; the result computes what the masked model computes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compress.models import get_adapter
from compress.prune.plan import KeepPlan
from compress.prune.units import hidden_sites

Table = dict[int, torch.Tensor] | torch.Tensor


def _at(table: Table | None, layer: int) -> torch.Tensor | None:
    if table is None:
        return None
    if isinstance(table, torch.Tensor):
        return table[layer] if layer < table.shape[0] else None
    return table.get(layer)


@dataclass
class MaskSet:
    """Mask values per granularity; None or a missing layer = not masked. Layer keys are the model's layer
    indices."""

    heads: Table | None = None
    attention: Table | None = None
    ffn: Table | None = None
    ffn_layer: Table | None = None
    hidden: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, model: nn.Module, plan: KeepPlan) -> MaskSet:
        """0/1 masks that compute what `shrink(model, plan)` computes (vocabulary trimming needs no mask: it
        removes rows that kept text never looks up)."""
        from compress.prune.shrink import check_plan

        check_plan(model, plan)
        adapter = get_adapter(model)
        views = adapter.layers
        p = next(model.parameters())
        heads: dict[int, torch.Tensor] = {}
        attention: dict[int, torch.Tensor] = {}
        ffn: dict[int, torch.Tensor] = {}
        ffn_layer: dict[int, torch.Tensor] = {}

        def ones(n: int, kept: list[int] | None) -> torch.Tensor:
            m = torch.zeros(n, device=p.device, dtype=p.dtype)
            m[list(kept) if kept is not None else slice(None)] = 1
            return m

        dropped = set() if plan.layers is None else set(range(len(views))) - {int(i) for i in plan.layers}
        for lv in views:
            i = lv.index
            if i in dropped:
                attention[i] = torch.zeros((), device=p.device, dtype=p.dtype)
                ffn_layer[i] = torch.zeros((), device=p.device, dtype=p.dtype)
                continue
            if i in plan.heads:
                kept = list(plan.heads[i])
                heads[i] = ones(lv.attention.num_heads, kept)
                if not kept:
                    attention[i] = torch.zeros((), device=p.device, dtype=p.dtype)
            if i in plan.ffn:
                kept = list(plan.ffn[i])
                ffn[i] = ones(lv.ffn.intermediate_size, kept)
                if not kept:
                    ffn_layer[i] = torch.zeros((), device=p.device, dtype=p.dtype)
        hidden = None if plan.hidden is None else ones(adapter.hidden_size, list(plan.hidden))
        return cls(heads=heads, attention=attention, ffn=ffn, ffn_layer=ffn_layer, hidden=hidden)


class MaskHandle:
    """The hooks `apply_masks` installed; `remove()` (or leaving the `with` block) takes them all off."""

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> MaskHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def masked_norm(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`module` (LayerNorm or RMSNorm) applied over the channels where `mask` is non-zero, times the mask
    (zeros elsewhere)."""
    weight = module.weight
    if mask is None:
        return module(x)
    keep = (mask != 0).nonzero().flatten()
    xk = x.index_select(-1, keep)
    if isinstance(module, nn.LayerNorm) or getattr(module, "bias", None) is not None:
        eps = getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5))
        bias = getattr(module, "bias", None)
        yk = F.layer_norm(xk, (keep.numel(),), weight.index_select(0, keep),
                          None if bias is None else bias.index_select(0, keep), eps)
    else:  # RMSNorm (LLaMA/Qwen2): float32 statistics, as the HF modules compute them
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        xf = xk.float()
        yk = weight.index_select(0, keep) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = x.new_zeros(*x.shape[:-1], x.shape[-1]).to(yk.dtype)
    out = out.index_copy(-1, keep, yk)
    return out * mask.to(out.dtype)


def _scale_last(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return x * m.to(x.dtype)


def apply_masks(model: nn.Module, masks: MaskSet) -> MaskHandle:
    """Install the masked forward on `model` (in place, until `remove()`); see the module docstring."""
    adapter = get_adapter(model)
    views = adapter.layers
    handles: list[torch.utils.hooks.RemovableHandle] = []
    sites = hidden_sites(adapter) if masks.hidden is not None else None

    def hidden() -> torch.Tensor | None:
        return masks.hidden

    # hidden: the stream entering layer 0, by the 0/1 indicator of the mask (soft values are carried by the
    # writers and the norms, so that they fold into weights exactly, tied embeddings included)
    def enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        m = hidden()
        if m is None:
            return None
        m = (m != 0).to(m.dtype)
        if args and isinstance(args[0], torch.Tensor):
            return (_scale_last(args[0], m), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": _scale_last(kwargs["hidden_states"], m)}
        return None

    if views:
        handles.append(views[0].module.register_forward_pre_hook(enter, with_kwargs=True))

    post = adapter.spec.norm_position == "post"
    skip_norm: dict[int, Callable[[], torch.Tensor | None]] = {}  # id(norm) -> the sub-layer's scalar mask
    for lv in views:
        i, att, ffn = lv.index, lv.attention, lv.ffn
        hd = att.head_dim

        def o_in(module: nn.Module, args: tuple, i: int = i, hd: int = hd) -> tuple | None:
            m = _at(masks.heads, i)
            if m is None:
                return None
            return (_scale_last(args[0], m.repeat_interleave(hd)), *args[1:])

        def o_out(module: nn.Module, args: tuple, out: torch.Tensor, i: int = i) -> torch.Tensor:
            z = _at(masks.attention, i)
            out = out if z is None else out * z.to(out.dtype)
            h = hidden()
            return out if h is None else _scale_last(out, h)

        def down_in(module: nn.Module, args: tuple, i: int = i) -> tuple | None:
            m = _at(masks.ffn, i)
            return None if m is None else (_scale_last(args[0], m), *args[1:])

        def down_out(module: nn.Module, args: tuple, out: torch.Tensor, i: int = i) -> torch.Tensor:
            z = _at(masks.ffn_layer, i)
            out = out if z is None else out * z.to(out.dtype)
            h = hidden()
            return out if h is None else _scale_last(out, h)

        handles += [att.o.register_forward_pre_hook(o_in), att.o.register_forward_hook(o_out),
                    ffn.down.register_forward_pre_hook(down_in), ffn.down.register_forward_hook(down_out)]
        if post:
            skip_norm[id(lv.attn_norm)] = lambda i=i: _at(masks.attention, i)
            skip_norm[id(lv.ffn_norm)] = lambda i=i: _at(masks.ffn_layer, i)

    norms = list(sites.norms) if sites is not None else []
    norm_ids = {id(n) for n in norms}
    for lv in views if post else []:
        for n in (lv.attn_norm, lv.ffn_norm):
            if id(n) not in norm_ids:
                norms.append(n)
                norm_ids.add(id(n))

    def norm_hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        z = skip_norm.get(id(module), lambda: None)()
        if z is not None and bool((z == 0).all()):
            return x  # a removed post-norm sub-layer: x + 0, norm skipped
        h = hidden()
        return out if h is None else masked_norm(module, x, h)

    for n in norms:
        handles.append(n.register_forward_hook(norm_hook))

    def writer_out(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        h = hidden()
        return out if h is None else _scale_last(out, h)

    for w in sites.writers if sites is not None else []:
        handles.append(w.register_forward_hook(writer_out))
    return MaskHandle(handles)


# ---------------------------------------------------------------------------------------------------- materialise


def plan_from_masks(model: nn.Module, masks: MaskSet, threshold: float = 0.0) -> KeepPlan:
    """The units whose mask value is above `threshold` (layers whose attention and FFN are both removed are
    dropped as layers). GQA: the kept query heads must form a valid grouping (see `shrink.check_plan`)."""
    adapter = get_adapter(model)
    plan = KeepPlan()
    dropped: list[int] = []
    for lv in adapter.layers:
        i = lv.index
        att_z, ffn_z = _at(masks.attention, i), _at(masks.ffn_layer, i)
        att_off = att_z is not None and float(att_z) <= threshold
        ffn_off = ffn_z is not None and float(ffn_z) <= threshold
        if att_off and ffn_off:
            dropped.append(i)
            continue
        h = _at(masks.heads, i)
        if att_off:
            plan.heads[i] = []
        elif h is not None:
            plan.heads[i] = (h.detach() > threshold).nonzero().flatten().tolist()
        f = _at(masks.ffn, i)
        if ffn_off:
            plan.ffn[i] = []
        elif f is not None:
            plan.ffn[i] = (f.detach() > threshold).nonzero().flatten().tolist()
    if dropped:
        plan.layers = [lv.index for lv in adapter.layers if lv.index not in dropped]
    if masks.hidden is not None:
        plan.hidden = (masks.hidden.detach() > threshold).nonzero().flatten().tolist()
    return plan


def _scale_rows(module: nn.Module, scale: torch.Tensor) -> None:
    """Output features of a Linear / Conv1D times `scale` ([out] or a scalar), bias included."""
    from compress.models import proj_weight

    w = proj_weight(module)
    w.mul_(scale.reshape(-1, 1) if scale.dim() else scale)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(scale)


def fold_masks(model: nn.Module, masks: MaskSet) -> nn.Module:
    """A copy of `model` whose plain forward computes what `model` under `apply_masks(masks)` computes on the
    channels that stay (the removed ones still hold their weights: `shrink` drops them, and only then do the norms
    normalise over the kept channels alone)."""
    import copy

    from compress.models import proj_weight

    folded = copy.deepcopy(model)
    adapter = get_adapter(folded)
    with torch.no_grad():
        for lv in adapter.layers:
            i, att, ffn = lv.index, lv.attention, lv.ffn
            h = _at(masks.heads, i)
            if h is not None and att.num_heads:
                proj_weight(att.o).mul_(h.detach().to(proj_weight(att.o).dtype).repeat_interleave(att.head_dim))
            z = _at(masks.attention, i)
            if z is not None and att.num_heads:
                _scale_rows(att.o, z.detach())
            f = _at(masks.ffn, i)
            if f is not None and ffn.intermediate_size:
                proj_weight(ffn.down).mul_(f.detach().to(proj_weight(ffn.down).dtype))
            z = _at(masks.ffn_layer, i)
            if z is not None and ffn.intermediate_size:
                _scale_rows(ffn.down, z.detach())
        if masks.hidden is not None:
            hz = masks.hidden.detach()
            sites = hidden_sites(adapter)
            for lv in adapter.layers:
                for m in (lv.attention.o, lv.ffn.down):
                    if getattr(m, "weight", None) is not None and m.weight.numel():
                        _scale_rows(m, hz)
            for m in sites.writers:
                _scale_rows(m, hz)
            for norm in sites.norms:
                norm.weight.mul_(hz)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.mul_(hz)
    return folded


def materialize(model: nn.Module, masks: MaskSet, threshold: float = 0.0) -> tuple[nn.Module, KeepPlan]:
    """(the physically pruned model that computes what the masked model computes, the plan it kept)."""
    from compress.prune.shrink import shrink

    plan = plan_from_masks(model, masks, threshold)
    return shrink(fold_masks(model, masks), plan), plan
