"""Learned structured pruning masks (CoFi, DPHuBERT): hard-concrete gates, their expected model size, the
Lagrangian sparsity constraint, the masked forward pass and the materialisation into a `KeepPlan`.

Gates (DESIGN.md, Algorithms: Hard concrete; beta = 2/3, l = -0.1, r = 1.1):

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta);  z = clamp(s (r - l) + l, 0, 1)

in training (sampled, so z is exactly 0 or 1 with positive probability), and deterministic in evaluation
(`HardConcrete.deterministic`, CoFi's estimator: per row of a gate tensor the round(sum P(z > 0)) units with
the largest log_alpha keep the value sigmoid(0.8 log_alpha / beta), the others 0).
P(z > 0) = sigmoid(log_alpha - beta log(-l / r)).

Granularities (`MaskSet`), each optional:
- `heads` [layers x kv groups]: a gate per key/value group with all its query heads (GQA-aware: a group is
  removed only with all of its query heads; for multi-head attention a group is one head);
- `attention` [layers]: the whole attention sub-layer;
- `ffn` [layers x d_ff]: FFN neurons (up / gate rows, down columns);
- `ffn_layer` [layers]: the whole FFN sub-layer;
- `hidden` [d]: hidden channels of the residual stream.

Where the gates act (`apply_masks`, forward hooks through the model adapters; every soft value sits at the
output of a module with weights, so `fold_masks` can move it into those weights):
- heads: the input of the attention output projection, per head (its columns);
- attention x hidden: the output of the attention output projection (its rows and bias);
- ffn: the input of the FFN down projection (its columns); ffn_layer x hidden: its output (rows, bias);
- hidden: every norm that normalises the residual stream (the layers' two norms, the final norm, the
  embeddings' LayerNorm, other hidden-size norms of the heads) is computed over the kept channels only (mean /
  variance or RMS over the channels with z > 0) and its output multiplied by z; the input of the first layer
  and the output of square hidden -> hidden Linears outside the layers (BERT's pooler, RoBERTa's classifier
  dense, DistilBERT's pre-classifier) are multiplied by the binary keep mask (z > 0).
A model whose pruned units are exactly zero thus computes what the physically smaller one does, so
`fold_masks(model, z)` then `shrink(model, plan)` gives the model `apply_masks(model, z)` computes.

Expected size: `MaskSet.expected_params` is the expected parameter count of the materialised model, a
differentiable polynomial of the P(z > 0) (independent gates, as in CoFi): per layer the attention
projections scale with the expected kept groups and hidden channels, the FFN with the expected kept neurons
and hidden channels, and every other tensor with the expected hidden size along its dimensions of size d.
Constraint (`lagrangian`): L_c = lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 with s_hat = 1 - E[params] / P0
and t the target sparsity, ramping linearly from 0; the lambdas are trained by gradient ascent
(`ParamGroup(ascent=True)` of the shared trainer).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from compress.errors import InputError
from compress.prune.plan import KeepPlan

log = logging.getLogger(__name__)

BETA, LIMIT_L, LIMIT_R = 2.0 / 3.0, -0.1, 1.1
EPS = 1e-6
# CoFi's deterministic value of a kept unit: sigmoid(log_alpha / beta * 0.8)
_DETERMINISTIC_SCALE = 0.8
GRANULARITIES = ("heads", "attention", "ffn", "ffn_layer", "hidden")


# ---------------------------------------------------------------------------------------------- gates


class HardConcrete(nn.Module):
    """A tensor of hard-concrete gates of `shape` (rows are the last dimension's groups: the deterministic
    estimator keeps round(sum P(z > 0)) units per row)."""

    def __init__(self, shape: tuple[int, ...], init_keep: float = 0.95, beta: float = BETA,
                 limit_l: float = LIMIT_L, limit_r: float = LIMIT_R):
        super().__init__()
        if not 0 < init_keep < 1:
            raise ValueError(f"init_keep {init_keep} must be in (0, 1)")
        self.beta, self.limit_l, self.limit_r = beta, limit_l, limit_r
        # P(z > 0) = sigmoid(log_alpha - beta log(-l/r)) = init_keep at the start
        start = math.log(init_keep / (1 - init_keep)) + beta * math.log(-limit_l / limit_r)
        self.log_alpha = nn.Parameter(torch.full(shape, float(start)))

    def prob_nonzero(self) -> Tensor:
        """P(z > 0) per gate, differentiable in log_alpha."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.limit_l / self.limit_r))

    def sample(self) -> Tensor:
        u = torch.rand_like(self.log_alpha).clamp(EPS, 1 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / self.beta)
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def deterministic(self, multiple: int = 1) -> Tensor:
        """CoFi's test-time gates: per row, the round(sum P(z > 0)) largest log_alphas (rounded to a multiple of
        `multiple`, at least one multiple when any is kept) keep sigmoid(0.8 log_alpha / beta), the rest 0.
        A 0-d or [n] tensor of single gates (whole sub-layers) keeps each gate with P(z > 0) > 0.5."""
        with torch.no_grad():
            la = self.log_alpha.detach()
            soft = torch.sigmoid(la / self.beta * _DETERMINISTIC_SCALE)
            p = self.prob_nonzero().detach()
            rows = la.reshape(-1, la.shape[-1]) if la.ndim > 1 else la.reshape(1, -1)
            prows = p.reshape(rows.shape)
            out = torch.zeros_like(rows)
            for r in range(rows.shape[0]):
                keep = int(round(float(prows[r].sum())))
                if multiple > 1 and keep > 0:
                    keep = min(rows.shape[1], max(multiple, int(round(keep / multiple)) * multiple))
                if keep > 0:
                    idx = torch.topk(rows[r], keep).indices
                    out[r, idx] = 1.0
            return (out.reshape(la.shape) * soft)

    def forward(self) -> Tensor:
        return self.sample() if self.training else self.deterministic()

    def clamp_(self, low: float = math.log(1e-2), high: float = math.log(1e2)) -> None:
        """Keep log_alpha in a range where gradients still flow (CoFi clamps to log(1e-2)..log(1e2))."""
        with torch.no_grad():
            self.log_alpha.clamp_(low, high)


def _single_gates(shape: tuple[int, ...], init_keep: float) -> HardConcrete:
    return HardConcrete(shape, init_keep)


# ---------------------------------------------------------------------------------------------- the mask set


class MaskSet(nn.Module):
    """The gates of one model, for the granularities asked (`granularities` among GRANULARITIES).
    `forward()` gives the gate values by granularity: sampled in train mode, deterministic in eval mode
    (with the consistency rules of `consistent`)."""

    def __init__(self, model: nn.Module, granularities: tuple[str, ...] | list[str], init_keep: float = 0.95,
                 multiple: int = 1):
        super().__init__()
        from compress.models import get_adapter

        unknown = [g for g in granularities if g not in GRANULARITIES]
        if unknown:
            raise InputError(f"learned masks: unknown granularity {unknown}; use {', '.join(GRANULARITIES)}")
        ad = get_adapter(model)
        layers = ad.layers
        self.num_layers = len(layers)
        self.groups = [lv.attention.num_kv_heads for lv in layers]
        self.ffn_sizes = [lv.ffn.intermediate_size for lv in layers]
        if len(set(self.groups)) > 1 or len(set(self.ffn_sizes)) > 1:
            raise InputError("learned masks: the model's layers have different sizes already; learn masks on a "
                             "model with uniform layers")
        self.hidden_size = ad.hidden_size
        self.multiple = multiple
        self.granularities = tuple(g for g in GRANULARITIES if g in granularities)
        n, g, f = self.num_layers, self.groups[0], self.ffn_sizes[0]
        shapes = {"heads": (n, g), "attention": (n,), "ffn": (n, f), "ffn_layer": (n,), "hidden": (self.hidden_size,)}
        self.gates = nn.ModuleDict({k: HardConcrete(shapes[k], init_keep) for k in self.granularities})
        self.params_start = sum(p.numel() for p in model.parameters())

    def log_alphas(self) -> list[nn.Parameter]:
        return [gate.log_alpha for gate in self.gates.values()]

    def clamp_(self) -> None:
        for gate in self.gates.values():
            gate.clamp_()

    def forward(self) -> dict[str, Tensor]:
        if self.training:
            return {k: gate.sample() for k, gate in self.gates.items()}
        return self.deterministic()

    def deterministic(self) -> dict[str, Tensor]:
        """Test-time gates (rounded to `multiple` for FFN neurons and hidden channels), made consistent."""
        z = {k: gate.deterministic(self.multiple if k in ("ffn", "hidden") else 1) for k, gate in self.gates.items()}
        return consistent(z)

    def probs(self) -> dict[str, Tensor]:
        return {k: gate.prob_nonzero() for k, gate in self.gates.items()}

    def expected_params(self, model: nn.Module, probs: Mapping[str, Tensor] | None = None) -> Tensor:
        """E[parameters] of the materialised model under the gates' P(z > 0) (or `probs`; a dict of binary
        keep masks gives the exact count of the model the plan makes)."""
        return expected_params(model, self.probs() if probs is None else probs)

    def expected_sparsity(self, model: nn.Module) -> Tensor:
        return 1.0 - self.expected_params(model) / self.params_start


def consistent(z: dict[str, Tensor]) -> dict[str, Tensor]:
    """Deterministic gates whose zeros agree across granularities: a sub-layer whose units are all removed
    is removed as a whole (and the other way round), so the masked model computes what the plan's smaller
    model does (a removed sub-layer adds nothing, not even its output bias)."""
    z = dict(z)
    for units, whole in (("heads", "attention"), ("ffn", "ffn_layer")):
        if units in z:
            alive = (z[units] > 0).any(dim=-1).to(z[units].dtype)
            z[whole] = z[whole] * alive if whole in z else alive
            z[units] = z[units] * (z[whole] > 0).to(z[units].dtype).unsqueeze(-1)
    return z


def lagrangian(sparsity: Tensor, target: float, lambda1: Tensor, lambda2: Tensor) -> Tensor:
    """CoFi's constraint term L_c = lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 (the trainer ascends the lambdas)."""
    gap = sparsity - target
    return lambda1 * gap + lambda2 * gap * gap


# ---------------------------------------------------------------------------------------------- sizes


def _bias(module: nn.Module) -> int:
    return int(getattr(module, "bias", None) is not None)


def _scaled(t: Tensor | nn.Parameter, d: int, h: Tensor | float) -> Tensor | float:
    """numel of `t` with each dimension of size d replaced by h (the expected hidden size)."""
    out: Tensor | float = 1.0
    for size in t.shape:
        out = out * (h if size == d else size)
    return out


def expected_params(model: nn.Module, probs: Mapping[str, Tensor]) -> Tensor:
    """Expected parameter count of `model` once the units are removed with the keep probabilities `probs`
    (granularity -> tensor shaped like the gates; missing granularities keep everything)."""
    from compress.models import get_adapter

    ad = get_adapter(model)
    layers = ad.layers
    d = ad.hidden_size
    ref = next(model.parameters())
    one = torch.ones((), device=ref.device)
    h = probs["hidden"].sum() if "hidden" in probs else one * d
    counted: set[int] = set()
    total = one * 0.0
    for i, lv in enumerate(layers):
        att, ffn = lv.attention, lv.ffn
        a_i = probs["attention"][i] if "attention" in probs else one
        groups = probs["heads"][i] * a_i if "heads" in probs else a_i * one.expand(att.num_kv_heads)
        kept_groups = groups.sum()
        q_out = kept_groups * att.kv_groups * att.head_dim
        kv_out = kept_groups * att.head_dim
        if att.fused_qkv:
            total = total + (q_out + 2 * kv_out) * (h + _bias(att.q))
        else:
            total = total + q_out * (h + _bias(att.q)) + kv_out * (h + _bias(att.k)) + kv_out * (h + _bias(att.v))
        total = total + q_out * h + _bias(att.o) * h * a_i
        f_i = probs["ffn_layer"][i] if "ffn_layer" in probs else one
        neurons = (probs["ffn"][i] * f_i).sum() if "ffn" in probs else f_i * ffn.intermediate_size
        total = total + neurons * (h + _bias(ffn.up)) + neurons * h + _bias(ffn.down) * h * f_i
        if ffn.gate is not None:
            total = total + neurons * (h + _bias(ffn.gate))
        for m in (att.q, att.k, att.v, att.o, ffn.up, ffn.down, ffn.gate):
            if m is not None:
                counted.update(id(p) for p in m.parameters())
    for p in model.parameters():
        if id(p) not in counted:
            total = total + _scaled(p, d, h)
    return total


# ---------------------------------------------------------------------------------------------- masked forward


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if "RMSNorm" in type(module).__name__:
        return "rms"
    return None


def masked_norm(module: nn.Module, x: Tensor, keep: Tensor) -> Tensor:
    """The norm `module` (LayerNorm or RMSNorm) of x computed over the channels where keep is 1 (what the
    physically smaller norm computes on the kept channels; pruned channels come out as the formula gives them
    and are zeroed by the caller)."""
    kind = _norm_kind(module)
    n = keep.sum().clamp(min=1.0)
    xf = x.float()
    k = keep.to(xf.dtype)
    if kind == "layer":
        eps = float(module.eps)
        mean = (xf * k).sum(-1, keepdim=True) / n
        var = (((xf - mean) * k) ** 2).sum(-1, keepdim=True) / n
        y = (xf - mean) * torch.rsqrt(var + eps)
        if module.weight is not None:
            y = y * module.weight.float()
        if getattr(module, "bias", None) is not None:
            y = y + module.bias.float()
        return y.to(x.dtype)
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    ms = ((xf * k) ** 2).sum(-1, keepdim=True) / n
    y = xf * torch.rsqrt(ms + eps)
    return (module.weight * y.to(x.dtype)) if getattr(module, "weight", None) is not None else y.to(x.dtype)


def hidden_norms(model: nn.Module) -> list[nn.Module]:
    """Every norm over the hidden size: the layers' two norms, the final norm, and the LayerNorms / RMSNorms
    outside the layers whose width is the hidden size (embeddings, heads)."""
    from compress.models import get_adapter

    ad = get_adapter(model)
    d = ad.hidden_size
    found: dict[int, nn.Module] = {}
    layer_ids = {id(m) for lv in ad.layers for m in lv.module.modules()}
    for lv in ad.layers:
        for m in (lv.attn_norm, lv.ffn_norm):
            found[id(m)] = m
    for m in model.modules():
        if id(m) in layer_ids or id(m) in found or _norm_kind(m) is None:
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, Tensor) and w.shape == (d,):
            found[id(m)] = m
    return list(found.values())


def hidden_squares(model: nn.Module) -> list[nn.Module]:
    """Linear layers outside the transformer layers mapping hidden -> hidden (BERT's pooler, RoBERTa's
    classifier dense, DistilBERT's pre-classifier): their outputs are hidden channels too."""
    from compress.models import get_adapter

    ad = get_adapter(model)
    d = ad.hidden_size
    layer_ids = {id(m) for lv in ad.layers for m in lv.module.modules()}
    return [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in layer_ids
            and m.in_features == d and m.out_features == d]


class MaskState:
    """The gate values the hooks read; set `values` before each forward (a new sample per training step)."""

    def __init__(self, values: Mapping[str, Tensor] | None = None):
        self.values: dict[str, Tensor] = dict(values or {})

    def get(self, name: str) -> Tensor | None:
        return self.values.get(name)


@contextmanager
def apply_masks(model: nn.Module, masks: MaskState | Mapping[str, Tensor]) -> Iterator[MaskState]:
    """Run `model` with the gate values of `masks` (granularity -> tensor; a `MaskState` whose values may change
    between forward passes) applied through forward hooks (see the module doc). Hooks are removed on exit."""
    from compress.models import get_adapter

    state = masks if isinstance(masks, MaskState) else MaskState(masks)
    ad = get_adapter(model)
    layers = ad.layers
    handles: list[Any] = []

    def hidden_z() -> tuple[Tensor | None, Tensor | None]:
        z = state.get("hidden")
        return (None, None) if z is None else (z, (z > 0).to(z.dtype))

    def head_pre(i: int, head_dim: int, per_group: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> Any:
            z = state.get("heads")
            if z is None:
                return None
            scale = z[i].repeat_interleave(per_group * head_dim)
            return (args[0] * scale.to(args[0].dtype), *args[1:])
        return hook

    def units_pre(i: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> Any:
            z = state.get("ffn")
            if z is None:
                return None
            return (args[0] * z[i].to(args[0].dtype), *args[1:])
        return hook

    def out_hook(i: int, whole: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Any:
            w, (zh, _) = state.get(whole), hidden_z()
            if w is None and zh is None:
                return None
            y = output
            if w is not None:
                y = y * w[i].to(y.dtype)
            if zh is not None:
                y = y * zh.to(y.dtype)
            return y
        return hook

    def norm_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        zh, keep = hidden_z()
        if zh is None:
            return None
        x = args[0]
        return masked_norm(module, x, keep) * zh.to(x.dtype)

    def first_pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        _, keep = hidden_z()
        if keep is None:
            return None
        if args and isinstance(args[0], Tensor):
            return (args[0] * keep.to(args[0].dtype), *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), Tensor):
            kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"] * keep.to(kwargs["hidden_states"].dtype))
            return args, kwargs
        return None

    def square_hook(module: nn.Module, args: tuple, output: Tensor) -> Any:
        _, keep = hidden_z()
        return None if keep is None else output * keep.to(output.dtype)

    try:
        handles.append(layers[0].module.register_forward_pre_hook(first_pre, with_kwargs=True))
        for lv in layers:
            att = lv.attention
            handles.append(att.o.register_forward_pre_hook(head_pre(lv.index, att.head_dim, att.kv_groups)))
            handles.append(att.o.register_forward_hook(out_hook(lv.index, "attention")))
            handles.append(lv.ffn.down.register_forward_pre_hook(units_pre(lv.index)))
            handles.append(lv.ffn.down.register_forward_hook(out_hook(lv.index, "ffn_layer")))
        for m in hidden_norms(model):
            handles.append(m.register_forward_hook(norm_hook))
        for m in hidden_squares(model):
            handles.append(m.register_forward_hook(square_hook))
        yield state
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- materialise


def _scale_rows(module: nn.Module, scale: Tensor) -> None:
    from compress.models.base import proj_weight

    w = proj_weight(module)
    w.mul_(scale.to(w.dtype).unsqueeze(1))
    b = getattr(module, "bias", None)
    if b is not None:
        b.mul_(scale.to(b.dtype))


def _scale_cols(module: nn.Module, scale: Tensor) -> None:
    from compress.models.base import proj_weight

    w = proj_weight(module)
    w.mul_(scale.to(w.dtype).unsqueeze(0))


def fold_masks(model: nn.Module, z: Mapping[str, Tensor]) -> nn.Module:
    """Move the soft gate values of `z` (deterministic, consistent) into the weights of `model`, in place: then
    `model` under the binary masks (z > 0) computes what it computed under `z`, and the removed units are zero
    (so removing them physically changes nothing). Returns `model`."""
    from compress.models import get_adapter

    ad = get_adapter(model)
    zh = z.get("hidden")
    with torch.no_grad():
        for lv in ad.layers:
            i, att = lv.index, lv.attention
            if "heads" in z:
                _scale_cols(att.o, z["heads"][i].repeat_interleave(att.kv_groups * att.head_dim))
            out = torch.ones(ad.hidden_size)
            if "attention" in z:
                out = out * z["attention"][i]
            if zh is not None:
                out = out * zh
            _scale_rows(att.o, out)
            if "ffn" in z:
                _scale_cols(lv.ffn.down, z["ffn"][i])
            out = torch.ones(ad.hidden_size)
            if "ffn_layer" in z:
                out = out * z["ffn_layer"][i]
            if zh is not None:
                out = out * zh
            _scale_rows(lv.ffn.down, out)
        if zh is not None:
            for m in hidden_norms(model):
                if getattr(m, "weight", None) is not None:
                    m.weight.mul_(zh.to(m.weight.dtype))
                if getattr(m, "bias", None) is not None:
                    m.bias.mul_(zh.to(m.bias.dtype))
    return model


def binary(z: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keep masks (1 where z > 0) of gate values."""
    return {k: (v > 0).float() for k, v in z.items()}


def keep_plan(model: nn.Module, z: Mapping[str, Tensor]) -> KeepPlan:
    """The `KeepPlan` of deterministic, consistent gate values `z` for `model`: kept query heads (every head
    of a kept group), FFN neurons and hidden channels, by original index. A layer whose attention and FFN are
    both removed is dropped only in pre-norm families (where it is then the identity); post-norm layers keep
    their norms."""
    from compress.models import get_adapter

    ad = get_adapter(model)
    plan = KeepPlan()
    dropped: list[int] = []
    for lv in ad.layers:
        i, att = lv.index, lv.attention
        attn_off = "attention" in z and float(z["attention"][i]) <= 0
        ffn_off = "ffn_layer" in z and float(z["ffn_layer"][i]) <= 0
        if "heads" in z or "attention" in z:
            if attn_off:
                plan.heads[i] = []
            elif "heads" in z:
                groups = [g for g in range(att.num_kv_heads) if float(z["heads"][i][g]) > 0]
                plan.heads[i] = [g * att.kv_groups + j for g in groups for j in range(att.kv_groups)]
        if "ffn" in z or "ffn_layer" in z:
            if ffn_off:
                plan.ffn[i] = []
            elif "ffn" in z:
                plan.ffn[i] = [int(n) for n in torch.nonzero(z["ffn"][i] > 0).flatten().tolist()]
        if attn_off and ffn_off and lv.norm_position == "pre":
            dropped.append(i)
    if dropped:
        plan.layers = [i for i in range(len(ad.layers)) if i not in dropped]
        for i in dropped:
            plan.heads.pop(i, None)
            plan.ffn.pop(i, None)
    if "hidden" in z:
        plan.hidden = [int(c) for c in torch.nonzero(z["hidden"] > 0).flatten().tolist()]
    for i, heads in list(plan.heads.items()):  # drop "keep all" entries: None means keep all
        if len(heads) == ad.layers[i].attention.num_heads:
            del plan.heads[i]
    for i, neurons in list(plan.ffn.items()):
        if len(neurons) == ad.layers[i].ffn.intermediate_size:
            del plan.ffn[i]
    if plan.hidden is not None and len(plan.hidden) == ad.hidden_size:
        plan.hidden = None
    return plan


def exact_params(model: nn.Module, z: Mapping[str, Tensor]) -> int:
    """Parameters of the model the plan of deterministic gates `z` makes (the expected count at P in {0, 1})."""
    return int(round(float(expected_params(model, binary(z)))))


def fit_budget(model: nn.Module, masks: MaskSet, max_params: int, iterations: int = 40) -> float:
    """Shift every log_alpha by one constant c (in place; the learned ranking of units and the allocation across
    granularities stay) so that the deterministic gates keep at most `max_params` parameters, with the largest
    such c (bisection; the kept count grows with c). The Lagrangian brings the expected size to the target, but
    after a short run the gates' P(z > 0) are not yet 0 or 1 and the deterministic model differs from the
    expectation by a few points: this closes that gap. Returns c (0 when the budget already holds exactly)."""
    def count(shift: float) -> int:
        with torch.no_grad():
            for gate in masks.gates.values():
                gate.log_alpha.add_(shift)
            n = exact_params(model, masks.deterministic())
            for gate in masks.gates.values():
                gate.log_alpha.sub_(shift)
        return n

    lo, hi = -30.0, 30.0
    if count(lo) > max_params:
        raise InputError(f"prune: {max_params} parameters cannot be reached by the learned masks' granularities "
                         f"(the smallest model they make has {count(lo)}); add granularities or raise the target")
    if count(hi) <= max_params:
        lo = hi
    else:
        for _ in range(iterations):
            mid = (lo + hi) / 2
            if count(mid) <= max_params:
                lo = mid
            else:
                hi = mid
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.add_(lo)
    return lo


def materialise(model: nn.Module, masks: MaskSet) -> tuple[nn.Module, KeepPlan, dict[str, Tensor]]:
    """A copy of `model` with the deterministic gates folded in, the plan that removes the zeroed units, and
    the gates. `compress.prune.shrink.shrink(copy, plan)` then gives the smaller model."""
    masks.eval()
    z = masks.deterministic()
    folded = fold_masks(copy.deepcopy(model), z)
    return folded, keep_plan(model, z), z


# ---------------------------------------------------------------------------------------------- training


class Lagrange(nn.Module):
    """The two Lagrange multipliers of the sparsity constraint (trained by gradient ascent)."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))


class TargetRamp:
    """Step hook of the mask training: the target sparsity t ramps linearly from 0 to `final` over
    `ramp_steps`, the log_alphas are clamped after each step, and the expected sparsity is recorded. Its
    state is checkpointed with the trainer's (`state_dict`)."""

    def __init__(self, masks: MaskSet, final: float, ramp_steps: int):
        self.masks, self.final, self.ramp_steps = masks, final, max(1, ramp_steps)
        self.target = 0.0
        self.history: list[dict[str, float]] = []

    def on_step_start(self, step: int) -> None:
        self.target = self.final * min(1.0, step / self.ramp_steps)

    def on_after_backward(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, out: Any) -> None:
        self.masks.clamp_()
        terms = out.terms
        self.history.append({"step": step, "target": self.target,
                             "expected_sparsity": float(terms.get("expected_sparsity", float("nan")))})

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))


def learn_masks(
    student: nn.Module,
    teacher: nn.Module,
    *,
    objective_cfg: Any,
    task: str,
    train_cfg: Any,
    train_batches: Any,
    target_sparsity: float,
    granularities: tuple[str, ...] | list[str],
    mask_lr: float = 0.05,
    lambda_lr: float = 0.05,
    ramp: float = 0.5,
    init_keep: float = 0.95,
    multiple: int = 1,
    remap_every: int = 10,
    checkpoint_dir: Any = None,
    progress: Any = None,
    label: str = "prune",
    where: str = "prune",
) -> tuple[MaskSet, dict[str, Any]]:
    """Train hard-concrete masks over `student` (and the student itself) jointly with distillation from
    `teacher` (compress.distill.objective.DistillObjective, its layer map dynamic when `objective_cfg.mapping`
    says so, re-matched every `remap_every` steps through the masked student) plus the Lagrangian constraint
    towards `target_sparsity` (of the student's parameters), with the one trainer (compress.train.trainer).
    The target ramps linearly from 0 over the first `ramp` fraction of the steps. Returns the masks (in eval
    mode: deterministic) and the trainer's result with `sparsity_curve` (target and expected sparsity per step)."""
    from compress.distill.objective import DistillObjective
    from compress.passes.common import model_inputs
    from compress.train.trainer import ParamGroup, StepOutput, Trainer

    if not 0 <= target_sparsity < 1:
        raise InputError(f"{where}: target sparsity {target_sparsity:.4g} must be in [0, 1)")
    device = next(student.parameters()).device
    masks = MaskSet(student, granularities, init_keep=init_keep, multiple=multiple).to(device)
    lagrange = Lagrange().to(device)
    objective = DistillObjective(student, teacher, objective_cfg, task=task, where=where)
    state = MaskState()
    dynamic = objective.cfg.mapping.strategy == "dynamic"
    steps_hint = train_cfg.steps or 1
    hook = TargetRamp(masks, target_sparsity, int(math.ceil(ramp * steps_hint)))

    def loss_fn(model: nn.Module, batch: dict[str, Tensor], step: int) -> StepOutput:
        state.values = masks()
        if dynamic and (step - 1) % remap_every == 0:
            objective.match_layers(model_inputs(batch))
        out = objective(batch, model=model)
        sparsity = masks.expected_sparsity(student)
        constraint = lagrangian(sparsity, hook.target, lagrange.lambda1, lagrange.lambda2)
        terms = {**out.floats(), "lagrangian": float(constraint.detach()),
                 "expected_sparsity": float(sparsity.detach()), "target_sparsity": hook.target}
        return StepOutput(loss=out.total + constraint, terms=terms)

    groups = [ParamGroup("masks", masks, lr=mask_lr, schedule=False),
              ParamGroup("lagrange", lagrange, lr=lambda_lr, ascent=True, schedule=False)]
    with apply_masks(student, state):
        trainer = Trainer(student, train_cfg, loss_fn=loss_fn, train_batches=train_batches,
                          checkpoint_dir=checkpoint_dir, extra_modules=objective.modules(), param_groups=groups,
                          extra_state={"target_ramp": hook}, progress=progress, hooks=[hook], label=label)
        hook.ramp_steps = max(1, int(math.ceil(ramp * trainer.total_steps)))
        result = trainer.train()
    masks.eval()
    result["sparsity_curve"] = list(hook.history)
    result["lambdas"] = [float(lagrange.lambda1.detach()), float(lagrange.lambda2.detach())]
    result["layer_map"] = [list(p) for p in objective.pairs]
    return masks, result
