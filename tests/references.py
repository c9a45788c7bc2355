"""Float64 references of the distillation losses, written straight from their definitions (no masking tricks),
shared by the loss tests, the kernel tests and the distill-pass wiring tests."""
from __future__ import annotations

import math

import torch

from compress.distill import losses as L

#: The logit losses with the coefficients the tests use (kernel tests add boundary cases).
LOGIT_FNS = {
    "forward_kl": (L.forward_kl, {}),
    "reverse_kl": (L.reverse_kl, {}),
    "jsd": (L.jsd, {"beta": 0.3}),
    "skew_kl": (L.skew_kl, {"alpha": 0.1}),
    "skew_reverse_kl": (L.skew_reverse_kl, {"alpha": 0.2}),
    "taid": (L.taid, {"t": 0.6}),
}

#: Test-case names that are another loss at a boundary value of its coefficient.
ALIASES = {"taid": "forward_kl", "jsd_beta0": "forward_kl", "jsd_beta1": "reverse_kl"}


def hand_rows(s: torch.Tensor, teacher: torch.Tensor, name: str, tau: float, **kw: float) -> torch.Tensor:
    """Per-row divergence of 2-D logits in float64. ``name`` is a loss name or one of `ALIASES`; TAID takes
    its interpolation ``t`` in ``kw`` and is the forward KL to the interpolated target."""
    xs = s.double() / tau
    xt = teacher.double() / tau
    if name == "taid":
        xt = (1 - kw["t"]) * xs.detach() + kw["t"] * xt
    name = ALIASES.get(name, name)
    q = torch.softmax(xs, -1)
    p = torch.softmax(xt, -1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        beta = kw["beta"]
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_kl":
        return kl(p, kw["alpha"] * p + (1 - kw["alpha"]) * q)
    if name == "skew_reverse_kl":
        return kl(q, (1 - kw["alpha"]) * p + kw["alpha"] * q)
    raise AssertionError(name)


def relation_kl_float64(qkv_s: list[torch.Tensor], qkv_t: list[torch.Tensor], mask: torch.Tensor,
                         heads: int) -> float:
    """MiniLMv2's relation loss written from the paper in float64 with loops: for each of Q, K, V, each
    relation head a and each valid query i, KL(R_T[a, i] || R_S[a, i]) over the valid keys, where
    R = softmax(X_a X_a^T / sqrt(d_r)); averaged over heads and valid queries, summed over Q, K, V."""
    total = 0.0
    for xs, xt in zip(qkv_s, qkv_t):
        per_query = []
        for b in range(xs.shape[0]):
            valid = [j for j in range(xs.shape[1]) if mask[b, j]]
            for a in range(heads):
                def relation(x: torch.Tensor) -> torch.Tensor:
                    d_r = x.shape[-1] // heads
                    xa = x[b, valid, a * d_r:(a + 1) * d_r].double()
                    return torch.softmax(xa @ xa.T / math.sqrt(d_r), dim=-1)

                r_s, r_t = relation(xs), relation(xt)
                for i in range(len(valid)):
                    per_query.append(float((r_t[i] * (r_t[i].log() - r_s[i].log())).sum()))
        total += sum(per_query) / len(per_query)
    return total


def taid_rows_masked(s: torch.Tensor, teacher: torch.Tensor, t: float, tau: float) -> torch.Tensor:
    """TAID's per-row divergence in float64 when some entries are -inf on one side only: the target
    ``softmax(((1 - t) s + t z_T) / tau)`` over the entries finite on both sides (masked elsewhere), and
    ``KL(p_t || q)`` summed over the target's support."""
    xs = s.double() / tau
    xt = teacher.double() / tau
    both = torch.isfinite(xs) & torch.isfinite(xt)
    rows = []
    for i in range(xs.shape[0]):
        keep = both[i]
        target = (1 - t) * xs[i, keep] + t * xt[i, keep]
        p = torch.softmax(target, -1)
        log_q = torch.log_softmax(xs[i], -1)[keep]
        rows.append((p * (p.log() - log_q)).sum())
    return torch.stack(rows)


def taid_t_sequence(losses: list[float], *, t_start: float, t_end: float, momentum: float, step_size: float,
                    total_steps: int | None, eps: float = 1e-8) -> list[float]:
    """TAID's interpolation t after each step, from the paper's update written out once more: relative
    decrease of the loss, its exponential moving average, a sigmoid-scaled step towards 1, the linear floor."""
    t, m, prev, out = t_start, 0.0, None, []
    for n, loss in enumerate(losses, start=1):
        delta = 0.0 if prev is None else (prev - loss) / (prev + eps)
        m = momentum * m + (1 - momentum) * delta
        proposal = t + step_size * (1 - t) / (1 + math.exp(-m))
        floor = t_start if total_steps is None else t_start + (t_end - t_start) * min(1.0, n / total_steps)
        t = min(t_end, max(floor, proposal))
        prev = loss
        out.append(t)
    return out
