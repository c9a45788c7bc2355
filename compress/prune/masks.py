"""Learned structured pruning masks (CoFi, DPHuBERT): hard-concrete gates, their expected model size, the
Lagrangian sparsity constraint, the masked forward pass and the materialisation into a `KeepPlan`.

Gates (DESIGN.md, Algorithms: Hard concrete; beta = 2/3, l = -0.1, r = 1.1):

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta);  z = clamp(s (r - l) + l, 0, 1)

in training (sampled, so z is exactly 0 or 1 with positive probability), and deterministic in evaluation
(`HardConcrete.deterministic`, CoFi's estimator: per row of a gate tensor the round(sum P(z > 0)) units with
the largest log_alpha keep the value sigmoid(0.8 log_alpha / beta), the others 0).
P(z > 0) = sigmoid(log_alpha - beta log(-l / r)).

Granularities (`LearnedMasks`), each optional:
- `heads` [layers x kv groups]: a gate per key/value group with all its query heads (GQA-aware: a group is
  removed only with all of its query heads; for multi-head attention a group is one head);
- `attention` [layers]: the whole attention sub-layer;
- `ffn` [layers x d_ff]: FFN neurons (up / gate rows, down columns);
- `ffn_layer` [layers]: the whole FFN sub-layer;
- `hidden` [d]: hidden channels of the residual stream (binary in evaluation: 1 where z > 0).

The gates act through the one masked forward, `compress.prune.apply.apply_masks` (forward hooks through the
model adapters, the definition `shrink` is tested against): heads on the o-projection's input, attention and
hidden on its output, FFN neurons on the down projection's input, ffn_layer and hidden on its output, hidden on
the first layer's input, the norms (statistics over the kept channels) and the other hidden writers. Every
soft value of the deterministic gates sits on an o or down projection, so `fold_masks` moves them into those
weights: then `shrink(folded, plan)` computes what `apply_masks(model, z)` does (`materialise`, through apply.py).

Expected size: `LearnedMasks.expected_params` is the expected parameter count of the materialised model, a
differentiable polynomial of the P(z > 0) (independent gates, as in CoFi): per layer the attention
projections scale with the expected kept groups and hidden channels, the FFN with the expected kept neurons
and hidden channels, and every other tensor with the expected hidden size along its dimensions of size d.
Constraint (`lagrangian`): L_c = lambda1 (s_hat - t) + lambda2 (s_hat - t)^2 with s_hat = 1 - E[params] / P0
and t the target sparsity, ramping linearly from 0; the lambdas are trained by gradient ascent
(`ParamGroup(ascent=True)` of the shared trainer).
"""
from __future__ import annotations

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


class LearnedMasks(nn.Module):
    """The gates of one model, for the granularities asked (`granularities` among GRANULARITIES).
    `forward()` gives the gate values by granularity: sampled in train mode, deterministic in eval mode
    (with the consistency rules of `consistent`)."""

    def __init__(self, model: nn.Module, granularities: tuple[str, ...] | list[str], init_keep: float = 0.95,
                 multiple: int = 1, vocab_removed: int = 0):
        super().__init__()
        from compress.models import get_adapter

        unknown = [g for g in granularities if g not in GRANULARITIES]
        if unknown:
            raise InputError(f"learned masks: unknown granularity {unknown}; use {', '.join(GRANULARITIES)}")
        ad = get_adapter(model)
        layers = ad.layers
        self.num_layers = len(layers)
        self.groups = [lv.attention.num_kv_heads for lv in layers]
        self.kv_groups = layers[0].attention.kv_groups if layers else 1
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
        # embedding rows that vocabulary trimming removes with the plan (counted out of the sizes below)
        self.vocab_removed = vocab_removed

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
        if "hidden" in z:  # hidden channels pass through norms: only 0/1 values fold into a smaller model
            z["hidden"] = (z["hidden"] > 0).to(z["hidden"].dtype)
        return consistent(z)

    def probs(self) -> dict[str, Tensor]:
        return {k: gate.prob_nonzero() for k, gate in self.gates.items()}

    def expected_params(self, model: nn.Module, probs: Mapping[str, Tensor] | None = None) -> Tensor:
        """E[parameters] of the materialised model under the gates' P(z > 0) (or `probs`; a dict of binary
        keep masks gives the exact count of the model the plan makes), less the trimmed vocabulary's rows."""
        probs = self.probs() if probs is None else probs
        total = expected_params(model, probs)
        if self.vocab_removed:
            h = probs["hidden"].sum() if "hidden" in probs else self.hidden_size
            total = total - self.vocab_removed * h
        return total

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
        projections: set[int] = set()
        for m in (att.q, att.k, att.v, att.o, ffn.up, ffn.down, ffn.gate):
            if m is not None:
                projections.update(id(p) for p in m.parameters())
        alive = 1 - (1 - a_i) * (1 - f_i)  # a layer without attention and FFN is dropped with its norms
        owner: dict[int, Tensor] = {}
        if lv.norm_position == "post":  # a removed post-norm sub-layer goes with its norm
            owner.update({id(p): a_i for p in lv.attn_norm.parameters()})
            owner.update({id(p): f_i for p in lv.ffn_norm.parameters()})
        for p in lv.module.parameters():
            if id(p) not in projections and id(p) not in counted:
                total = total + _scaled(p, d, h) * owner.get(id(p), alive)
                counted.add(id(p))
        counted |= projections
    for p in model.parameters():
        if id(p) not in counted:
            total = total + _scaled(p, d, h)
    return total


# ---------------------------------------------------------------------------------------------- masked forward


def to_maskset(values: Mapping[str, Tensor], kv_groups: int) -> Any:
    """Gate values (granularity -> tensor, heads per kv group) as the `compress.prune.apply.MaskSet` the masked
    forward reads (heads per query head)."""
    from compress.prune.apply import MaskSet as Applied

    heads = values.get("heads")
    if heads is not None and kv_groups > 1:
        heads = heads.repeat_interleave(kv_groups, dim=-1)
    return Applied(heads=heads, attention=values.get("attention"), ffn=values.get("ffn"),
                   ffn_layer=values.get("ffn_layer"), hidden=values.get("hidden"))


def set_values(applied: Any, values: Mapping[str, Tensor], kv_groups: int) -> None:
    """Replace the values an installed masked forward reads (a new sample each training step)."""
    new = to_maskset(values, kv_groups)
    for name in GRANULARITIES:
        setattr(applied, name, getattr(new, name))


@contextmanager
def masked(model: nn.Module, values: Mapping[str, Tensor], kv_groups: int = 1) -> Iterator[Any]:
    """`model` runs with the gate `values` (compress.prune.apply.apply_masks, the one masked forward that
    `shrink` is tested against); yields the applied MaskSet (change its values with `set_values`)."""
    from compress.prune.apply import apply_masks

    applied = to_maskset(values, kv_groups)
    handle = apply_masks(model, applied)
    try:
        yield applied
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- materialise


def binary(z: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The keep masks (1 where z > 0) of gate values."""
    return {k: (v > 0).float() for k, v in z.items()}


def exact_params(model: nn.Module, z: Mapping[str, Tensor], masks: LearnedMasks | None = None) -> int:
    """Parameters of the model the plan of deterministic gates `z` makes (the expected count at P in {0, 1};
    with `masks`, less the rows vocabulary trimming removes)."""
    count = masks.expected_params(model, binary(z)) if masks is not None else expected_params(model, binary(z))
    return int(round(float(count)))


def fit_budget(model: nn.Module, masks: LearnedMasks, max_params: int, iterations: int = 40) -> float:
    """Shift every log_alpha by one constant c (in place; the learned ranking of units and the allocation across
    granularities stay) so that the deterministic gates keep at most `max_params` parameters, with the largest
    such c (bisection; the kept count grows with c). The Lagrangian brings the expected size to the target, but
    after a short run the gates' P(z > 0) are not yet 0 or 1 and the deterministic model differs from the
    expectation by a few points: this closes that gap. Returns c (0 when the budget already holds exactly)."""
    def count(shift: float) -> int:
        with torch.no_grad():
            for gate in masks.gates.values():
                gate.log_alpha.add_(shift)
            n = exact_params(model, masks.deterministic(), masks)
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


def materialise(model: nn.Module, masks: LearnedMasks) -> tuple[nn.Module, KeepPlan, dict[str, Tensor]]:
    """A copy of `model` with the deterministic gates folded in, the plan that removes the zeroed units, and
    the gates. `compress.prune.shrink.shrink(copy, plan)` then gives the smaller model. The folding and the plan
    are `compress.prune.apply`'s (`fold_masks`, `plan_from_masks`), the ones `shrink` is tested against."""
    from compress.prune.apply import fold_masks, plan_from_masks

    masks.eval()
    z = masks.deterministic()
    applied = to_maskset(z, masks.kv_groups)
    return fold_masks(model, applied), plan_from_masks(model, applied), z


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

    def __init__(self, masks: LearnedMasks, final: float, ramp_steps: int, start: float = 0.0):
        self.masks, self.final, self.ramp_steps, self.start = masks, final, max(1, ramp_steps), start
        self.target = start
        self.history: list[dict[str, float]] = []

    def on_step_start(self, step: int) -> None:
        self.target = self.start + (self.final - self.start) * min(1.0, step / self.ramp_steps)

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
    mask_lr: float = 0.1,
    lambda_lr: float = 1.0,
    ramp: float = 0.3,
    init_keep: float = 0.99,
    multiple: int = 1,
    remap_every: int = 10,
    vocab_removed: int = 0,
    checkpoint_dir: Any = None,
    progress: Any = None,
    label: str = "prune",
    where: str = "prune",
) -> tuple[LearnedMasks, dict[str, Any]]:
    """Train hard-concrete masks over `student` (and the student itself) jointly with distillation from
    `teacher` (compress.distill.objective.DistillObjective, its layer map dynamic when `objective_cfg.mapping`
    says so, re-matched every `remap_every` steps through the masked student) plus the Lagrangian constraint
    towards `target_sparsity` (of the student's parameters), with the one trainer (compress.train.trainer).
    The target ramps linearly from the gates' starting expected sparsity (about 0; more when `vocab_removed`
    rows go with vocabulary trimming) over the first `ramp` fraction of the steps. Returns the masks (in eval
    mode: deterministic) and the trainer's result with `sparsity_curve` (target and expected sparsity per step)."""
    from compress.distill.objective import DistillObjective
    from compress.passes.common import model_inputs
    from compress.train.trainer import ParamGroup, StepOutput, Trainer

    if not 0 <= target_sparsity < 1:
        raise InputError(f"{where}: target sparsity {target_sparsity:.4g} must be in [0, 1)")
    device = next(student.parameters()).device
    masks = LearnedMasks(student, granularities, init_keep=init_keep, multiple=multiple,
                         vocab_removed=vocab_removed).to(device)
    lagrange = Lagrange().to(device)
    objective = DistillObjective(student, teacher, objective_cfg, task=task, where=where)
    dynamic = objective.cfg.mapping.strategy == "dynamic"
    steps_hint = train_cfg.steps or 1
    # the ramp starts where the gates start (about 0; more with vocabulary trimming, which needs no learning):
    # a target below the start would first push every gate up into saturation, where the constraint's
    # gradient vanishes
    with torch.no_grad():
        start = min(target_sparsity, max(0.0, float(masks.expected_sparsity(student))))
    hook = TargetRamp(masks, target_sparsity, int(math.ceil(ramp * steps_hint)), start=start)

    def loss_fn(model: nn.Module, batch: dict[str, Tensor], step: int) -> StepOutput:
        set_values(applied, masks(), masks.kv_groups)
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
    with masked(student, {}, masks.kv_groups) as applied:
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
