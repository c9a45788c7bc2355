"""Distillation losses (DESIGN.md, Algorithms): the PyTorch reference and the one public entry point per loss.

Logit losses
------------
``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``skew_reverse_kl``, ``TAID`` and ``fused_linear_kd``
take student and teacher logits shaped ``[..., V]`` (``labels`` shaped ``[...]``). With ``q`` the student's
and ``p`` the teacher's distribution at temperature ``tau`` (``softmax(logits / tau)``):

* forward KL        ``KL(p || q)``
* reverse KL        ``KL(q || p)``
* JSD(beta)         ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``;
  beta = 0 is *defined* as forward KL and beta = 1 as reverse KL (the convention of DESIGN.md and of
  Liger-Kernel; the mixture formula itself would give 0 there)
* skew KL           ``KL(p || alpha p + (1 - alpha) q)``          [alpha = 0.1]
* skew reverse KL   ``KL(q || (1 - alpha) p + alpha q)``          [alpha = 0.1]
* TAID              ``KL(p_t || q)``, ``p_t = softmax(((1 - t) stopgrad(s) + t z_T) / tau)``, t adapted
  during training (see `TAID`)

Conventions shared by all of them:

* **tau^2 scaling**: the returned value is ``tau^2 * mean_rows(divergence)`` (Hinton et al.), so that
  the gradient's magnitude does not shrink as 1/tau^2 when the temperature grows. At tau = 1 it is the
  plain mean divergence. The gradient wrt the student logits is therefore ``tau * dD/dx``, e.g.
  ``tau (q - p) / n_valid`` per row for forward KL.
* **mean over valid rows**: rows whose label equals ``ignore_index`` are left out (loss 0, gradient 0);
  without ``labels`` every row counts. All rows ignored gives 0.
* **fp32**: logits of any float dtype are upcast to fp32; probabilities come from ``log_softmax``.
* **-inf entries** (a padded or masked vocabulary) contribute 0 and get a 0 gradient; ``vocab_mask``
  (bool ``[V]``, True = real token) masks columns the same way without the caller writing -inf.
  A column that is -inf for the teacher but finite for the student is fine for forward KL; the reverse
  (student -inf, teacher finite) makes forward KL infinite, as it should.
* **different vocab padding**: when the student has V=1000 and the teacher V=1024 (pad columns), pass
  ``vocab_size=1000``: both are sliced to the common real vocabulary first.
* **the teacher gets no gradient**: its logits are detached.
* **dispatch**: on CUDA tensors with triton installed the fused Triton kernel (`compress.kernels`) runs,
  otherwise this module's PyTorch reference; ``use_kernel=True/False`` forces one. Both give the same
  numbers up to fp32 rounding (and the rounding of the gradient to the logits' dtype on the kernel path).

Hidden states and attention
---------------------------
``hidden_mse``, ``hidden_cosine`` (with `HiddenProjector` when widths differ, and the TED-style
`TaskAwareFilter`), ``attention_kl``, ``attention_output_mse`` (KD for QAT, Kim et al. 2022) and
``minilm_relation_kl`` (MiniLMv2), all averaged over the valid tokens of ``attention_mask``.

Weighted sums
-------------
The distillation objective (compress/distill/objective.py) weighs these terms: `LossWeights` names one
weight per term, and `DistillObjective` returns the weighted total and the terms by name.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import InputError
from compress.kernels import KERNEL_KINDS, kernel_usable, triton_installed

log = logging.getLogger(__name__)

#: A finite stand-in for -inf inside the reference (keeps every autograd path NaN-free).
_NEG = -1e30

LogitKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"]


# ----------------------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------------------
def _check_temperature(temperature: float, where: str) -> float:
    tau = float(temperature)
    if not math.isfinite(tau) or tau <= 0:
        raise InputError(f"{where}: temperature must be a positive number, got {temperature!r}")
    return tau


def _check_unit(value: float, name: str, where: str, *, closed_right: bool) -> float:
    v = float(value)
    ok = 0.0 <= v <= 1.0 if closed_right else 0.0 <= v < 1.0
    if not ok:
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise InputError(f"{where}: {name} must lie in {bound}, got {value!r}")
    return v


def _want_kernel(use_kernel: bool | None, where: str, *tensors: torch.Tensor) -> bool:
    """Decide between the fused kernel and the reference (see the module docstring, dispatch)."""
    if use_kernel is False:
        return False
    if use_kernel is None:
        return all(t.is_cuda for t in tensors) and kernel_usable(*tensors)
    if not triton_installed():
        raise InputError(f"{where}: use_kernel=True needs triton: `pip install triton`, or pass use_kernel=None")
    if not kernel_usable(*tensors):
        raise InputError(
            f"{where}: use_kernel=True needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
            "for CPU tensors); move the tensors to a GPU or pass use_kernel=None"
        )
    return True


def _shared_vocab(v_student: int, v_teacher: int, vocab_size: int | None, where: str) -> int:
    """The vocabulary width both sides are scored on: ``vocab_size`` (checked), else the common width."""
    if vocab_size is not None:
        if not 0 < vocab_size <= min(v_student, v_teacher):
            raise InputError(f"{where}: vocab_size={vocab_size} must be in 1..{min(v_student, v_teacher)} "
                             "(the smaller of the two vocabularies)")
        return vocab_size
    if v_student != v_teacher:
        raise InputError(f"{where}: student vocabulary {v_student} != teacher vocabulary {v_teacher}; pass "
                         "vocab_size=<size of the real shared vocabulary> to slice off the padded columns")
    return v_student


def _flatten_logits(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    vocab_size: int | None,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Slice to the common vocabulary and flatten to ``[N, V]`` (labels to ``[N]``)."""
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise InputError(f"{where}: logits must be floating point, got {student.dtype} and {teacher.dtype}")
    if student.dim() < 1 or student.shape[:-1] != teacher.shape[:-1]:
        raise InputError(
            f"{where}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} must agree "
            "on every dimension but the last (vocabulary)"
        )
    v = _shared_vocab(student.shape[-1], teacher.shape[-1], vocab_size, where)
    student = student[..., :v]
    teacher = teacher[..., :v]
    s2 = student.reshape(-1, v)
    t2 = teacher.reshape(-1, v)
    lab = None
    if labels is not None:
        if labels.shape != student.shape[:-1]:
            raise InputError(
                f"{where}: labels {tuple(labels.shape)} must have the logits' shape without the vocabulary "
                f"dimension, {tuple(student.shape[:-1])}"
            )
        lab = labels.reshape(-1)
    return s2, t2, lab


def _check_vocab_mask(vocab_mask: torch.Tensor | None, v: int, where: str) -> torch.Tensor | None:
    if vocab_mask is None:
        return None
    if vocab_mask.dim() != 1 or vocab_mask.shape[0] < v:
        raise InputError(f"{where}: vocab_mask must be a 1-D bool tensor of at least {v} entries (True = real token)")
    return vocab_mask[:v].to(torch.bool)


def _valid_rows(labels: torch.Tensor | None, n_rows: int, ignore_index: int, device: torch.device) -> torch.Tensor:
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return labels != ignore_index


def _kernel_valid_count(labels: torch.Tensor | None, n_rows: int, ignore_index: int) -> torch.Tensor | float:
    """The kernels' number of valid rows: known on the host without labels (no device work, no sync), else a
    one-element device tensor (counting the labels on the host would sync)."""
    if labels is None:
        return float(n_rows)
    return (labels != ignore_index).sum().clamp_min(1).to(torch.float32).reshape(1)


def _resolve_kind(kind: str, beta: float, alpha: float, where: str) -> tuple[str, float, float]:
    """Map a loss name and its coefficient to the kernel's kind and mixture weights (c_teacher, c_student)."""
    if kind == "forward_kl" or kind == "reverse_kl":
        return kind, 0.0, 0.0
    if kind == "jsd":
        b = _check_unit(beta, "beta", where, closed_right=True)
        if b == 0.0:
            return "forward_kl", 0.0, 0.0
        if b == 1.0:
            return "reverse_kl", 0.0, 0.0
        return "jsd", b, 1.0 - b
    if kind == "skew_kl":
        a = _check_unit(alpha, "alpha", where, closed_right=False)
        return ("forward_kl", 0.0, 0.0) if a == 0.0 else ("skew_kl", a, 1.0 - a)
    if kind == "skew_reverse_kl":
        a = _check_unit(alpha, "alpha", where, closed_right=False)
        return ("reverse_kl", 0.0, 0.0) if a == 0.0 else ("skew_reverse_kl", 1.0 - a, a)
    raise InputError(f"{where}: unknown logit loss kind {kind!r}; choose one of {sorted(KERNEL_KINDS)}")


# ----------------------------------------------------------------------------------------------------------
# PyTorch reference of the logit losses
# ----------------------------------------------------------------------------------------------------------
def reference_divergence_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    c_teacher: float = 0.0,
    c_student: float = 0.0,
    mix: float | None = None,
    vocab_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row divergence (unscaled, fp32) of 2-D logits ``[N, V]``; ``kind`` is a kernel kind, the mixture
    is ``m = c_teacher p + c_student q``; ``mix`` is TAID's t. Differentiable wrt ``student``, NaN-free with
    -inf entries."""
    if kind not in KERNEL_KINDS:  # before any arithmetic: the mixture's log(0) would fail first otherwise
        raise InputError(f"unknown logit loss kind {kind!r}; choose one of {sorted(KERNEL_KINDS)}")
    xs = student.float() / temperature
    xt = teacher.detach().float() / temperature
    if vocab_mask is not None:
        xs = xs.masked_fill(~vocab_mask, float("-inf"))
        xt = xt.masked_fill(~vocab_mask, float("-inf"))
    if mix is not None:
        xd = xs.detach()
        either = torch.isneginf(xd) | torch.isneginf(xt)
        blend = (1.0 - mix) * xd.masked_fill(either, 0.0) + mix * xt.masked_fill(either, 0.0)
        xt = blend.masked_fill(either, float("-inf"))
    a = torch.log_softmax(xs, dim=-1)
    b = torch.log_softmax(xt, dim=-1)
    s_ok = a > float("-inf")
    t_ok = b > float("-inf")
    a0 = torch.where(s_ok, a, 0.0)
    b0 = torch.where(t_ok, b, 0.0)
    q = torch.where(s_ok, a0.exp(), 0.0)
    p = torch.where(t_ok, b0.exp(), 0.0)
    if kind == "forward_kl":
        return torch.where(t_ok, p * (b0 - a), 0.0).sum(-1)
    if kind == "reverse_kl":
        return torch.where(s_ok, q * (a0 - b), 0.0).sum(-1)
    a_f = torch.where(s_ok, a0, _NEG)
    b_f = torch.where(t_ok, b0, _NEG)
    lm = torch.logaddexp(math.log(c_teacher) + b_f, math.log(c_student) + a_f)
    kl_p = torch.where(t_ok, p * (b0 - lm), 0.0).sum(-1)  # KL(p || m)
    kl_q = torch.where(s_ok, q * (a0 - lm), 0.0).sum(-1)  # KL(q || m)
    if kind == "jsd":
        return c_teacher * kl_p + c_student * kl_q
    if kind == "skew_kl":
        return kl_p
    return kl_q  # skew_reverse_kl


def _logit_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    labels: torch.Tensor | None,
    ignore_index: int,
    vocab_size: int | None,
    vocab_mask: torch.Tensor | None,
    use_kernel: bool | None,
    beta: float = 0.5,
    alpha: float = 0.1,
    mix: float | None = None,
    where: str,
    block_size: int | None = None,
) -> torch.Tensor:
    tau = _check_temperature(temperature, where)
    k_kind, c_t, c_s = _resolve_kind(kind, beta, alpha, where)
    s2, t2, lab = _flatten_logits(student_logits, teacher_logits, labels, vocab_size, where)
    n_rows, v = s2.shape
    vm = _check_vocab_mask(vocab_mask, v, where)
    if vm is not None and vm.device != s2.device:
        vm = vm.to(s2.device)
    if _want_kernel(use_kernel, where, s2, t2):
        from compress.kernels.kd_loss import fused_kd_loss

        if s2.stride(-1) != 1:
            s2 = s2.contiguous()
        if t2.stride(-1) != 1:
            t2 = t2.contiguous()
        return fused_kd_loss(
            s2, t2.detach(), labels=lab.contiguous().to(torch.int64) if lab is not None else None,
            vocab_mask=vm.to(torch.int8).contiguous() if vm is not None else None,
            n_valid=_kernel_valid_count(lab, n_rows, ignore_index),
            kind=KERNEL_KINDS[k_kind], temperature=tau, c_teacher=c_t, c_student=c_s, mix=mix,
            ignore_index=ignore_index, block_size=block_size,
        )
    valid = _valid_rows(lab, n_rows, ignore_index, s2.device)
    n_valid = valid.sum().clamp_min(1).to(torch.float32)
    if lab is not None:  # zero the ignored rows so that nothing they hold (even NaN) reaches the gradient
        s2 = torch.where(valid[:, None], s2, torch.zeros((), dtype=s2.dtype, device=s2.device))
        t2 = torch.where(valid[:, None], t2, torch.zeros((), dtype=t2.dtype, device=t2.device))
    rows = reference_divergence_rows(s2, t2, kind=k_kind, temperature=tau, c_teacher=c_t, c_student=c_s,
                                     mix=mix, vocab_mask=vm)
    rows = torch.where(valid, rows, 0.0)
    return rows.sum() * (tau * tau) / n_valid


_LOGIT_ARGS_DOC = """
    Args:
        student_logits: ``[..., V]`` logits of the student (any float dtype; receives the gradient).
        teacher_logits: ``[..., V']`` logits of the teacher (detached).
        temperature: tau > 0; the loss is scaled by tau^2 (module docstring).
        labels: optional ``[...]`` token labels, used only to drop rows equal to ``ignore_index``.
        ignore_index: label value of rows to leave out.
        vocab_size: slice both to the first ``vocab_size`` columns (teacher and student padded differently).
        vocab_mask: optional bool ``[V]``, False marks a column as masked (-inf for both).
        use_kernel: None = fused Triton kernel on CUDA when triton is installed, True / False force it.
    Returns:
        a scalar fp32 tensor.
"""


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    return _logit_loss("forward_kl", student_logits, teacher_logits, temperature=temperature, labels=labels,
                       ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, where="forward_kl")


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    return _logit_loss("reverse_kl", student_logits, teacher_logits, temperature=temperature, labels=labels,
                       ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, where="reverse_kl")


def jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    return _logit_loss("jsd", student_logits, teacher_logits, beta=beta, temperature=temperature, labels=labels,
                       ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, where="jsd")


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    return _logit_loss("skew_kl", student_logits, teacher_logits, alpha=alpha, temperature=temperature,
                       labels=labels, ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, where="skew_kl")


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    return _logit_loss("skew_reverse_kl", student_logits, teacher_logits, alpha=alpha, temperature=temperature,
                       labels=labels, ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, where="skew_reverse_kl")


forward_kl.__doc__ = "Forward KL(p_teacher || q_student) at temperature tau, scaled by tau^2.\n" + _LOGIT_ARGS_DOC
reverse_kl.__doc__ = "Reverse KL(q_student || p_teacher) at temperature tau, scaled by tau^2.\n" + _LOGIT_ARGS_DOC
jsd.__doc__ = (
    "Generalised Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;\n"
    "beta = 0 is forward KL and beta = 1 reverse KL by definition. Scaled by tau^2.\n"
    "    beta: in [0, 1].\n" + _LOGIT_ARGS_DOC
)
skew_kl.__doc__ = (
    "Skew KL(p || alpha p + (1 - alpha) q) (DistiLLM); alpha = 0 is forward KL. Scaled by tau^2.\n"
    "    alpha: in [0, 1).\n" + _LOGIT_ARGS_DOC
)
skew_reverse_kl.__doc__ = (
    "Skew reverse KL(q || (1 - alpha) p + alpha q) (DistiLLM); alpha = 0 is reverse KL. Scaled by tau^2.\n"
    "    alpha: in [0, 1).\n" + _LOGIT_ARGS_DOC
)


class TAID:
    """TAID, temporally adaptive interpolated distillation (Shing et al., ICLR 2025).

    The target is ``p_t = softmax(((1 - t) stopgrad(student_logits) + t teacher_logits) / tau)`` and the loss
    ``tau^2 KL(p_t || q)`` (forward KL, same conventions as `forward_kl`); an entry masked (-inf) in either
    logits is masked in the target. ``t`` starts at ``t_start`` and only grows towards ``t_end``: call
    `step` (or its alias `update`) with the loss once per optimisation step. With ``J`` that loss,

        delta_n = (J_{n-1} - J_n) / (J_{n-1} + eps)          relative decrease of the loss
        m_n     = momentum m_{n-1} + (1 - momentum) delta_n
        t_{n+1} = min(t_end, max(t_linear(n), t_n + step_size sigmoid(m_n) (1 - t_n)))

    so t moves faster while the student is still learning quickly (the loss falls), and never falls behind
    the linear ramp ``t_linear(n) = t_start + (t_end - t_start) n / total_steps`` when ``total_steps`` is
    given (no floor otherwise). Defaults follow the paper: t_start 0.4, t_end 1.0, step_size 5e-4,
    momentum 0.99.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        momentum: float = 0.99,
        step_size: float = 5e-4,
        total_steps: int | None = None,
        adaptive: bool = True,
        eps: float = 1e-8,
    ) -> None:
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise InputError(f"TAID: need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if not 0.0 <= momentum < 1.0:
            raise InputError(f"TAID: momentum must lie in [0, 1), got {momentum}")
        if step_size < 0:
            raise InputError(f"TAID: step_size must be >= 0, got {step_size}")
        if total_steps is not None and total_steps <= 0:
            raise InputError(f"TAID: total_steps must be a positive integer, got {total_steps}")
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.momentum = float(momentum)
        self.step_size = float(step_size)
        self.total_steps = total_steps
        self.adaptive = adaptive
        self.eps = eps
        self.t = float(t_start)
        self.m = 0.0
        self.steps = 0
        self.prev_loss: float | None = None

    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        temperature: float = 1.0,
        labels: torch.Tensor | None = None,
        ignore_index: int = -100,
        vocab_size: int | None = None,
        vocab_mask: torch.Tensor | None = None,
        use_kernel: bool | None = None,
    ) -> torch.Tensor:
        """The TAID loss at the current t (arguments as in `forward_kl`)."""
        return _logit_loss("forward_kl", student_logits, teacher_logits, temperature=temperature, labels=labels,
                           ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                           use_kernel=use_kernel, mix=self.t, where="taid")

    def linear_t(self, step: int) -> float:
        """The linear ramp's t at `step` (t_start when total_steps is unknown)."""
        if self.total_steps is None:
            return self.t_start
        frac = min(1.0, step / self.total_steps)
        return self.t_start + (self.t_end - self.t_start) * frac

    def step(self, loss: float | torch.Tensor) -> float:
        """Adapt t from this step's loss; returns the new t. A non-finite loss leaves the state unchanged."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            log.warning("TAID.step: non-finite loss %s, t left at %.4f", value, self.t)
            return self.t
        self.steps += 1
        floor = self.linear_t(self.steps)
        if self.adaptive:
            delta = 0.0 if self.prev_loss is None else (self.prev_loss - value) / (self.prev_loss + self.eps)
            self.m = self.momentum * self.m + (1.0 - self.momentum) * delta
            sig = 1.0 / (1.0 + math.exp(-self.m))
            proposal = self.t + self.step_size * sig * (1.0 - self.t)
        else:
            proposal = self.t
        self.t = min(self.t_end, max(floor, proposal))
        self.prev_loss = value
        return self.t

    def update(self, loss: float | torch.Tensor) -> float:
        """Alias of `step`."""
        return self.step(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "m": self.m, "steps": self.steps, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = float(state["t"])
        self.m = float(state["m"])
        self.steps = int(state["steps"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])


def taid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    t: float = 0.4,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """TAID's loss at a fixed interpolation ``t`` (stateless; `TAID` adapts t)."""
    _check_unit(t, "t", "taid", closed_right=True)
    return _logit_loss("forward_kl", student_logits, teacher_logits, temperature=temperature, labels=labels,
                       ignore_index=ignore_index, vocab_size=vocab_size, vocab_mask=vocab_mask,
                       use_kernel=use_kernel, mix=float(t), where="taid")


def fused_linear_kd(
    hidden_s: torch.Tensor,
    head_weight_s: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    *,
    kind: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"] = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    taid_t: float = 0.4,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    vocab_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    strategy: Literal["auto", "vocab", "rows"] = "auto",
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """A logit loss computed through the student's LM head: ``student_logits = hidden_s @ head_weight_s.T``.

    On the kernel path the full ``[N, V]`` student logits never exist: the logits are computed one chunk at a
    time (``strategy``: ``"rows"`` cuts the rows, fastest; ``"vocab"`` cuts every row into column chunks, least
    memory; ``"auto"`` takes ``"rows"``, see `compress.kernels.kd_loss.STRATEGIES`), the fused kernel writes each
    chunk's logit gradient in place, and the gradients of ``hidden_s`` and ``head_weight_s`` are accumulated
    in a custom autograd Function (the weight's gradient in the weight's dtype). The reference path
    materialises the logits and calls the reference loss.

    Args:
        hidden_s: ``[..., Ds]`` student hidden states before the head.
        head_weight_s: ``[Vs, Ds]`` student LM-head weight (no bias).
        teacher: the teacher's logits ``[..., Vt]``, or ``(hidden_t [..., Dt], head_weight_t [Vt, Dt])``.
        kind: which logit loss; ``beta`` (jsd), ``alpha`` (skew losses), ``taid_t`` (taid at a fixed t).
        chunk_size: rows (``"rows"``) or columns (``"vocab"``) per chunk on the kernel path; default: 512 rows
            (1024 for an fp32 head), or a chunk of logits about the size of ``hidden_s``.
        strategy: how the kernel path cuts the logits into chunks (``"auto"``, ``"vocab"`` or ``"rows"``).
        Others: as in `forward_kl` (``vocab_size`` slices both heads to the shared vocabulary).
    """
    where = "fused_linear_kd"
    tau = _check_temperature(temperature, where)
    mix: float | None = None
    if kind == "taid":
        mix = _check_unit(taid_t, "taid_t", where, closed_right=True)
        k_kind, c_t, c_s = "forward_kl", 0.0, 0.0
    else:
        k_kind, c_t, c_s = _resolve_kind(kind, beta, alpha, where)
    if head_weight_s.dim() != 2 or hidden_s.shape[-1] != head_weight_s.shape[1]:
        raise InputError(
            f"{where}: head_weight_s {tuple(head_weight_s.shape)} must be [V, D] with D = hidden_s's last "
            f"dimension {hidden_s.shape[-1]}"
        )
    lead = hidden_s.shape[:-1]
    h_s = hidden_s.reshape(-1, hidden_s.shape[-1])
    n_rows = h_s.shape[0]
    t_logits: torch.Tensor | None = None
    h_t: torch.Tensor | None = None
    w_t: torch.Tensor | None = None
    if isinstance(teacher, torch.Tensor):
        if teacher.shape[:-1] != lead:
            raise InputError(f"{where}: teacher logits {tuple(teacher.shape)} must be [..., V] over the rows of "
                             f"hidden_s {tuple(hidden_s.shape)}")
        t_logits = teacher.detach().reshape(n_rows, teacher.shape[-1])
        v_t = t_logits.shape[-1]
    else:
        if len(teacher) != 2:
            raise InputError(f"{where}: teacher must be logits or a pair (hidden_t, head_weight_t)")
        hid_t, w_t = teacher[0].detach(), teacher[1].detach()
        if hid_t.shape[:-1] != lead or w_t.dim() != 2 or w_t.shape[1] != hid_t.shape[-1]:
            raise InputError(f"{where}: teacher hidden {tuple(hid_t.shape)} / head {tuple(w_t.shape)} do not match "
                             f"the student's rows {tuple(lead)}")
        h_t = hid_t.reshape(n_rows, hid_t.shape[-1])
        v_t = w_t.shape[0]
    vocab_size = _shared_vocab(head_weight_s.shape[0], v_t, vocab_size, where)
    lab: torch.Tensor | None = None
    if labels is not None:
        if labels.shape != lead:
            raise InputError(f"{where}: labels {tuple(labels.shape)} must have hidden_s's shape without its last "
                             f"dimension, {tuple(lead)}")
        lab = labels.reshape(-1)
    vm = _check_vocab_mask(vocab_mask, vocab_size, where)
    tensors = [h_s, head_weight_s] + [x for x in (t_logits, h_t, w_t) if x is not None]
    if strategy not in ("auto", "vocab", "rows"):
        raise InputError(f"{where}: strategy must be 'auto', 'vocab' or 'rows', got {strategy!r}")
    if chunk_size is not None and chunk_size <= 0:
        raise InputError(f"{where}: chunk_size must be a positive integer, got {chunk_size}")
    if _want_kernel(use_kernel, where, *tensors):
        from compress.kernels.kd_loss import FusedLinearKD, default_chunk_cols, default_chunk_rows

        how = "rows" if strategy == "auto" else strategy
        if chunk_size is not None:
            chunk = chunk_size
        elif how == "vocab":
            chunk = default_chunk_cols(h_s.shape[-1], vocab_size)
        else:
            chunk = default_chunk_rows(n_rows, head_weight_s.element_size())
        if t_logits is not None and t_logits.stride(-1) != 1:
            t_logits = t_logits.contiguous()
        options = dict(kind=KERNEL_KINDS[k_kind], temperature=tau, c_teacher=c_t, c_student=c_s, mix=mix,
                       ignore_index=ignore_index)
        return FusedLinearKD.apply(
            h_s, head_weight_s, t_logits, h_t, w_t,
            lab.contiguous().to(torch.int64) if lab is not None else None,
            vm.to(h_s.device, torch.int8).contiguous() if vm is not None else None,
            _kernel_valid_count(lab, n_rows, ignore_index), vocab_size, how, chunk, options,
        )
    s_logits = h_s @ head_weight_s[:vocab_size].to(h_s.dtype).t()
    if t_logits is None:
        assert h_t is not None and w_t is not None
        t_logits = h_t @ w_t[:vocab_size].to(h_t.dtype).t()
    return _logit_loss("forward_kl" if kind == "taid" else kind, s_logits, t_logits[:, :vocab_size],
                       temperature=tau, labels=lab, ignore_index=ignore_index, vocab_size=None, vocab_mask=vm,
                       use_kernel=False, beta=beta, alpha=alpha, mix=mix, where=where)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, mean over rows whose label != ``ignore_index`` (0 if none)."""
    if labels.shape != logits.shape[:-1]:
        raise InputError(f"cross_entropy: labels {tuple(labels.shape)} must have the logits' shape without the "
                         f"last dimension, {tuple(logits.shape[:-1])}")
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1)
    n_valid = (lab != ignore_index).sum().clamp_min(1)
    total = F.cross_entropy(flat, lab, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
    return total / n_valid


# ----------------------------------------------------------------------------------------------------------
# hidden states
# ----------------------------------------------------------------------------------------------------------
def _token_mask(mask: torch.Tensor | None, shape: torch.Size, device: torch.device, where: str) -> torch.Tensor:
    """Bool ``[B, T]`` (or the leading dims of a hidden tensor) of valid tokens."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if mask.shape != shape:
        raise InputError(f"{where}: attention_mask {tuple(mask.shape)} must have shape {tuple(shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (same shape); 0 when none."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


class HiddenProjector(nn.Module):
    """Maps student hidden states to the teacher's width: a Linear when the widths differ (or when
    ``always_linear``), the identity otherwise (DESIGN.md, layer mapping)."""

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = True, always_linear: bool = False):
        super().__init__()
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.proj: nn.Module = (
            nn.Linear(student_dim, teacher_dim, bias=bias)
            if always_linear or student_dim != teacher_dim
            else nn.Identity()
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def _prepare_pair(
    hs: torch.Tensor, ht: torch.Tensor, proj: nn.Module | None, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if proj is not None:
        hs = proj(hs)
    if hs.shape != ht.shape:
        hint = (f"; pass proj=HiddenProjector({hs.shape[-1]}, {ht.shape[-1]})"
                if hs.shape[:-1] == ht.shape[:-1] else "")
        raise InputError(f"{where}: student {tuple(hs.shape)} and teacher {tuple(ht.shape)} shapes differ{hint}")
    return hs.float(), ht.float()


def _token_mse(hs: torch.Tensor, ht: torch.Tensor, proj: nn.Module | None, attention_mask: torch.Tensor | None,
               where: str) -> torch.Tensor:
    """Squared error averaged over the features, then over the valid tokens."""
    s, t = _prepare_pair(hs, ht, proj, where)
    per_token = (s - t).pow(2).mean(-1)
    return _masked_mean(per_token, _token_mask(attention_mask, per_token.shape, per_token.device, where))


def hidden_mse(
    hs: torch.Tensor,
    ht: torch.Tensor,
    proj: nn.Module | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between hidden states ``[..., D]`` (student projected by ``proj`` first), averaged
    over features and valid tokens (``attention_mask`` over the leading dims)."""
    return _token_mse(hs, ht, proj, attention_mask, "hidden_mse")


def hidden_cosine(
    hs: torch.Tensor,
    ht: torch.Tensor,
    proj: nn.Module | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``1 - cosine(h_S, h_T)`` per token, averaged over valid tokens."""
    s, t = _prepare_pair(hs, ht, proj, "hidden_cosine")
    per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps)
    return _masked_mean(per_token, _token_mask(attention_mask, per_token.shape, per_token.device, "hidden_cosine"))


class TaskAwareFilter(nn.Module):
    """TED-style task-aware filter for one (student layer, teacher layer) pair (Liang et al., ICML 2023).

    A small learnable Linear on each side maps the hidden states into a shared ``filter_dim`` space that
    keeps what matters for the task; the loss is ``MSE(f_S(h_S), f_T(h_T))`` on valid tokens. TED trains in
    two stages: (1) the teacher filters, each with a task head on top, on the task loss (the caller's
    training loop), then `freeze_teacher` ; (2) the student and its filters on this loss (plus the task /
    logit losses). ``filter_dim`` defaults to the teacher's width.
    """

    def __init__(self, student_dim: int, teacher_dim: int, filter_dim: int | None = None, *, bias: bool = True):
        super().__init__()
        fd = filter_dim or teacher_dim
        self.student_filter = nn.Linear(student_dim, fd, bias=bias)
        self.teacher_filter = nn.Linear(teacher_dim, fd, bias=bias)

    def freeze_teacher(self) -> None:
        """End of stage 1: the teacher filter stops learning."""
        for p in self.teacher_filter.parameters():
            p.requires_grad_(False)

    def forward(self, hs: torch.Tensor, ht: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return hidden_mse(self.student_filter(hs), self.teacher_filter(ht), attention_mask=attention_mask)


# ----------------------------------------------------------------------------------------------------------
# attention (KD for QAT) and MiniLMv2 relations
# ----------------------------------------------------------------------------------------------------------
def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of ``p (log p - log q)`` on ``keep`` (both log-probs may hold -inf)."""
    lp = torch.where(keep, log_p, 0.0)
    lq = torch.where(keep, log_q, 0.0)
    p = torch.where(keep, lp.exp(), 0.0)
    return (p * (lp - lq)).sum(-1)


def attention_kl(
    attn_s: torch.Tensor,
    attn_t: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    eps: float = 1e-12,
) -> torch.Tensor:
    """``KL(A_T || A_S)`` over attention probabilities ``[B, H, T, T]`` (rows are queries), summed over valid
    keys and averaged over heads and valid queries. When the head counts differ both are first averaged over
    heads. Probabilities are clamped at ``eps`` inside the log."""
    where = "attention_kl"
    if attn_s.dim() != 4 or attn_t.dim() != 4:
        raise InputError(f"{where}: attention probabilities must be [B, H, T, T], got {tuple(attn_s.shape)} and "
                         f"{tuple(attn_t.shape)}")
    if attn_s.shape[1] != attn_t.shape[1]:
        attn_s = attn_s.mean(1, keepdim=True)
        attn_t = attn_t.mean(1, keepdim=True)
    if attn_s.shape != attn_t.shape:
        raise InputError(f"{where}: student {tuple(attn_s.shape)} and teacher {tuple(attn_t.shape)} attention differ")
    b, _, t, _ = attn_s.shape
    tokens = _token_mask(attention_mask, torch.Size((b, t)), attn_s.device, where)
    log_t = attn_t.float().clamp_min(eps).log()
    log_s = attn_s.float().clamp_min(eps).log()
    keep = tokens[:, None, None, :].expand_as(log_t)
    rows = _kl_rows(log_t, log_s, keep)  # [B, H, T]
    return _masked_mean(rows, tokens[:, None, :].expand_as(rows))


def attention_output_mse(
    o_s: torch.Tensor,
    o_t: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    proj: nn.Module | None = None,
) -> torch.Tensor:
    """MSE between the outputs of the attention sub-layers ``[B, T, D]`` on valid tokens (KD for QAT)."""
    return _token_mse(o_s, o_t, proj, attention_mask, "attention_output_mse")


def _as_concat(x: torch.Tensor, where: str) -> torch.Tensor:
    """``[B, T, H]`` as is; ``[B, heads, T, d]`` concatenated over heads to ``[B, T, heads*d]``."""
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)
    raise InputError(f"{where}: Q/K/V must be [B, T, hidden] or [B, heads, T, d], got {tuple(x.shape)}")


def _relation_log_probs(x: torch.Tensor, num_heads: int, key_ok: torch.Tensor, where: str) -> torch.Tensor:
    b, t, h = x.shape
    if h % num_heads:
        raise InputError(f"{where}: hidden size {h} is not divisible by num_relation_heads={num_heads}; pick a "
                         "divisor of both the student's and the teacher's widths")
    d = h // num_heads
    xr = x.float().reshape(b, t, num_heads, d).transpose(1, 2)  # [B, A, T, d]
    scores = xr @ xr.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def minilm_relation_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    v_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    num_relation_heads: int = 12,
) -> torch.Tensor:
    """MiniLMv2 self-attention relation distillation: for X in Q, K, V (heads concatenated, ``[B, T, H]``;
    ``[B, heads, T, d]`` is accepted too) split into ``num_relation_heads`` relation heads of width
    ``d_r = H / A_r``, ``R = softmax(X X^T / sqrt(d_r))`` over valid keys; the loss is the sum over QQ, KK,
    VV of ``KL(R_T || R_S)``, summed over keys and averaged over relation heads and valid queries. Student
    and teacher widths and head counts may differ (only ``A_r`` must divide both widths)."""
    where = "minilm_relation_kl"
    if num_relation_heads <= 0:
        raise InputError(f"{where}: num_relation_heads must be positive, got {num_relation_heads}")
    pairs = [(_as_concat(s, where), _as_concat(t, where)) for s, t in ((q_s, q_t), (k_s, k_t), (v_s, v_t))]
    b, t = pairs[0][0].shape[:2]
    for s, te in pairs:
        if s.shape[:2] != (b, t) or te.shape[:2] != (b, t):
            raise InputError(f"{where}: every Q/K/V must share [B, T] = {(b, t)}, got {tuple(s.shape)} and "
                             f"{tuple(te.shape)}")
    tokens = _token_mask(attention_mask, torch.Size((b, t)), pairs[0][0].device, where)
    keep = tokens[:, None, None, :].expand(b, num_relation_heads, t, t)
    query_ok = tokens[:, None, :].expand(b, num_relation_heads, t)
    total = torch.zeros((), dtype=torch.float32, device=pairs[0][0].device)
    for s, te in pairs:
        log_rs = _relation_log_probs(s, num_relation_heads, tokens, where)
        log_rt = _relation_log_probs(te, num_relation_heads, tokens, where)
        total = total + _masked_mean(_kl_rows(log_rt, log_rs, keep), query_ok)
    return total


# ---------------------------------------------------------------------------------------- sentence embeddings
def embedding_mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between student and teacher sentence embeddings [batch, dim], mean over the batch
    (the sentence-transformers distillation recipe, summed over dimensions so that its scale does not shrink
    with the width: 2 - 2 cos for unit vectors)."""
    return (s.float() - t.float()).pow(2).sum(-1).mean()


def embedding_cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - cosine between student and teacher sentence embeddings, mean over the batch."""
    return 1 - torch.nn.functional.cosine_similarity(s.float(), t.float(), dim=-1).mean()


def in_batch_contrastive(s: torch.Tensor, t: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE with the teacher's embedding of the same sentence as the positive and the teacher's embeddings
    of the other sentences of the batch as negatives (both directions averaged): the student keeps the
    teacher's neighbourhoods, not only its vectors."""
    _check_temperature(temperature, "in_batch_contrastive")
    sn = torch.nn.functional.normalize(s.float(), dim=-1)
    tn = torch.nn.functional.normalize(t.float(), dim=-1)
    logits = sn @ tn.T / temperature
    target = torch.arange(len(sn), device=sn.device)
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, target) + ce(logits.T, target))


__all__ = [
    "HiddenProjector", "TAID", "TaskAwareFilter",
    "attention_kl", "attention_output_mse", "cross_entropy", "embedding_cosine", "embedding_mse",
    "in_batch_contrastive", "forward_kl", "fused_linear_kd", "hidden_cosine",
    "hidden_mse", "jsd", "minilm_relation_kl", "reference_divergence_rows", "reverse_kl",
    "skew_kl", "skew_reverse_kl", "taid",
]
