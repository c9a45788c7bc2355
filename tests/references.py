"""Float64 references of the logit losses, written straight from their definitions (no masking tricks),
shared by the loss tests and the kernel tests."""
from __future__ import annotations

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
