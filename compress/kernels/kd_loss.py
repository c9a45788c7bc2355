"""Fused distillation losses on logits: loss and gradient in one launch (DESIGN.md, Algorithms, Logit losses).

One Triton program handles one row (one token): it sweeps the vocabulary in chunks of ``BLOCK`` columns,

* sweep 1: online log-sum-exp in fp32 of the student and the teacher logits (and, for reverse KL, the
  online expectation ``<q, x_s - x_t>`` that centres its gradient);
* sweep 2: the loss of the row; for forward/reverse KL it also writes the gradient;
* sweep 3 (JSD, skew KL, skew reverse KL only): the gradient, which needs a row-wide sum from sweep 2.

The gradient wrt the student logits is written during the forward pass, already scaled by
``tau^2 / n_valid`` (the mean over valid rows and the tau^2 convention); the autograd Function only
multiplies it by ``grad_output`` at backward (skipped when that is exactly 1). Inputs may be fp32, fp16 or
bf16: every value is upcast to fp32 before any arithmetic. ``-inf`` logits (padded or masked vocabulary)
contribute 0 to the loss and get a 0 gradient. Rows whose label equals ``ignore_index`` get loss 0 and
gradient 0. Notation: ``x = logits / tau``, ``a = log q`` (student), ``b = log p`` (teacher),
``m = c_t p + c_s q`` the mixture of the JSD/skew losses, ``log m = logaddexp(log c_t + b, log c_s + a)``.

Gradients wrt x (divide by tau for the raw logits), per row, before scaling:
  forward KL      q - p
  reverse KL      q (d - <q, d>),  d = a - b
  JSD(beta)       (1 - beta) q (d - <q, d>),  d = a - log m
  skew KL         -p w + q <p, w>,  w = (1 - alpha) q / m
  skew reverse KL q (g - <q, g>),  g = a - log m - alpha q / m

This module imports triton; import it only through `compress.distill.losses` (which checks that triton is
usable) or after setting ``TRITON_INTERPRET=1`` on a machine without a GPU.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from compress.kernels import KERNEL_KINDS, interpreter_enabled

FORWARD_KL: int = KERNEL_KINDS["forward_kl"]
REVERSE_KL: int = KERNEL_KINDS["reverse_kl"]
JSD: int = KERNEL_KINDS["jsd"]
SKEW_KL: int = KERNEL_KINDS["skew_kl"]
SKEW_REVERSE_KL: int = KERNEL_KINDS["skew_reverse_kl"]

#: Largest vocabulary chunk one sweep step loads (GPU); the interpreter takes the whole row at once.
MAX_BLOCK_GPU = 4096
MAX_BLOCK_INTERPRETER = 1 << 17


@triton.jit
def _logaddexp(u, v):
    """log(exp(u) + exp(v)) elementwise, -inf when both are -inf (no NaN)."""
    mx = tl.maximum(u, v)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return safe + tl.log(tl.exp(u - safe) + tl.exp(v - safe))


@triton.jit
def _load_block(S, T, VMASK, offs, n_cols, inv_tau, mix, HAS_MIX: tl.constexpr, HAS_VMASK: tl.constexpr):
    """Load one chunk of a row of student and teacher logits, upcast to fp32, divided by tau, masked."""
    inside = offs < n_cols
    xs = tl.load(S + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_tau
    xt = tl.load(T + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_tau
    if HAS_VMASK:
        keep = tl.load(VMASK + offs, mask=inside, other=0) != 0
        xs = tl.where(keep, xs, float("-inf"))
        xt = tl.where(keep, xt, float("-inf"))
    if HAS_MIX:
        # TAID: the target's logits are (1 - t) stopgrad(student) + t teacher; an entry masked in either is
        # masked in the target.
        either = (xs == float("-inf")) | (xt == float("-inf"))
        xt = tl.where(either, float("-inf"), (1.0 - mix) * xs + mix * xt)
    return xs, xt


@triton.jit
def _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t,
                    HAS_MIX: tl.constexpr, HAS_VMASK: tl.constexpr):
    """One chunk as log-probabilities ``a = log q`` (student), ``b = log p`` (teacher) and as ``q``, ``p``
    (once sweep 1 has the row's log-sum-exps); what a sweep does not use, the compiler drops."""
    xs, xt = _load_block(S, T, VMASK, offs, n_cols, inv_tau, mix, HAS_MIX, HAS_VMASK)
    a = xs - lse_s
    b = xt - lse_t
    return a, b, tl.exp(a), tl.exp(b)


@triton.jit
def _kd_loss_kernel(
    S, stride_s, T, stride_t, G, stride_g, LABELS, VMASK, LOSS, NVALID,
    n_cols, inv_tau, scale, c_teacher, log_c_teacher, c_student, log_c_student, mix, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MIX: tl.constexpr, HAS_VMASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    G += row * stride_g
    cols = tl.arange(0, BLOCK)

    if HAS_LABELS:
        label = tl.load(LABELS + row)
        if label == ignore_index:
            tl.store(LOSS + row, 0.0)
            if WRITE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    zero = tl.zeros([BLOCK], dtype=tl.float32)
                    tl.store(G + offs, zero.to(G.dtype.element_ty), mask=offs < n_cols)
            return

    row_scale = scale / tl.load(NVALID).to(tl.float32)  # tau^2 / number of valid rows
    grad_scale = row_scale * inv_tau                    # d/dlogits = d/dx / tau

    # ---- sweep 1: online log-sum-exp of both rows (+ <q, x_s - x_t> for reverse KL) -------------------
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        xs, xt = _load_block(S, T, VMASK, start + cols, n_cols, inv_tau, mix, HAS_MIX, HAS_VMASK)
        new_s = tl.maximum(m_s, tl.max(xs, 0))
        safe_s = tl.where(new_s == float("-inf"), 0.0, new_s)
        corr_s = tl.exp(m_s - safe_s)
        es = tl.exp(xs - safe_s)
        z_s = z_s * corr_s + tl.sum(es, 0)
        if KIND == 1:
            acc = acc * corr_s + tl.sum(tl.where(es > 0, es * (xs - xt), 0.0), 0)
        m_s = new_s
        new_t = tl.maximum(m_t, tl.max(xt, 0))
        safe_t = tl.where(new_t == float("-inf"), 0.0, new_t)
        z_t = z_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(xt - safe_t), 0)
        m_t = new_t
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)

    loss = 0.0
    if KIND == 0:
        # ---- forward KL: sweep 2 writes loss and gradient ----------------------------------------------
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX, HAS_VMASK)
            loss += tl.sum(tl.where(p > 0, p * (b - a), 0.0), 0)
            if WRITE_GRAD:
                g = (q - p) * grad_scale
                tl.store(G + offs, g.to(G.dtype.element_ty), mask=offs < n_cols)
    elif KIND == 1:
        # ---- reverse KL: <q, d> is known from sweep 1, sweep 2 writes loss and gradient ---------------
        center = acc / z_s - lse_s + lse_t
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            a, b, q, _ = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX, HAS_VMASK)
            loss += tl.sum(tl.where(q > 0, q * (a - b), 0.0), 0)
            if WRITE_GRAD:
                g = tl.where(q > 0, q * (a - b - center), 0.0) * grad_scale
                tl.store(G + offs, g.to(G.dtype.element_ty), mask=offs < n_cols)
    else:
        # ---- JSD / skew KL / skew reverse KL: sweep 2 sums, sweep 3 writes the gradient ---------------
        sum_p = 0.0  # sum p (b - log m)
        sum_q = 0.0  # sum q (a - log m)
        extra = 0.0  # skew KL: sum p w;  skew reverse KL: alpha sum q^2 / m
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX, HAS_VMASK)
            lm = _logaddexp(log_c_teacher + b, log_c_student + a)
            sum_p += tl.sum(tl.where(p > 0, p * (b - lm), 0.0), 0)
            sum_q += tl.sum(tl.where(q > 0, q * (a - lm), 0.0), 0)
            if KIND == 3:
                extra += tl.sum(tl.where((p > 0) & (q > 0), tl.exp(log_c_student + a + b - lm), 0.0), 0)
            if KIND == 4:
                extra += tl.sum(tl.where(q > 0, tl.exp(log_c_student + 2.0 * a - lm), 0.0), 0)
        if KIND == 2:
            loss = c_teacher * sum_p + c_student * sum_q
        elif KIND == 3:
            loss = sum_p
        else:
            loss = sum_q
        if WRITE_GRAD:
            center = sum_q - extra  # JSD: <q, d> (extra is 0);  skew reverse KL: <q, g>
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX,
                                             HAS_VMASK)
                lm = _logaddexp(log_c_teacher + b, log_c_student + a)
                if KIND == 2:
                    g = c_student * tl.where(q > 0, q * (a - lm - center), 0.0)
                elif KIND == 3:
                    pw = tl.where((p > 0) & (q > 0), tl.exp(log_c_student + a + b - lm), 0.0)
                    g = q * extra - pw
                else:
                    r = tl.exp(log_c_student + a - lm)
                    g = tl.where(q > 0, q * (a - lm - r - center), 0.0)
                tl.store(G + offs, (g * grad_scale).to(G.dtype.element_ty), mask=offs < n_cols)
    tl.store(LOSS + row, loss * row_scale)


def default_num_warps(block: int) -> int:
    """Warps per row program: 8 columns per thread (one 16-byte load of bf16 per row and step), 4 to 32
    warps. Chosen from ptxas' report (`compress.kernels.aot`, ``benchmarks/kd_loss.py --static``): at the
    GPU block of 4096 every loss kind compiles without spills for at least 32 resident warps per SM on
    sm_90, where 8 warps held the reverse KL and JSD kinds to 16 (95-106 registers)."""
    return max(4, min(32, block // 256))


def _pick_block(n_cols: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        return block_size
    cap = MAX_BLOCK_INTERPRETER if interpreter_enabled() else MAX_BLOCK_GPU
    return min(triton.next_power_of_2(max(n_cols, 16)), cap)


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: int,
    n_valid: torch.Tensor,
    temperature: float = 1.0,
    c_teacher: float = 0.5,
    c_student: float = 0.5,
    mix: float | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    vocab_mask: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    block_size: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Launch the kernel on 2-D logits ``[N, V]`` (last dim contiguous). Returns the per-row losses (fp32,
    already scaled by ``tau^2 / n_valid``: their sum is the loss) and, when ``grad`` is given, writes the
    scaled gradient wrt ``student`` into it (``grad`` may be ``student`` itself: the kernel reads each
    chunk before it writes it). ``n_valid`` is a one-element tensor on the same device."""
    n_rows, n_cols = student.shape
    if student.stride(-1) != 1 or teacher.stride(-1) != 1:
        raise ValueError("the last dimension of the logits must be contiguous")
    block = _pick_block(n_cols, block_size)
    if num_warps is None:
        num_warps = default_num_warps(block)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if n_rows == 0:
        return loss
    write_grad = grad is not None
    g = grad if write_grad else student  # a dummy pointer when no gradient is written
    lab = labels if labels is not None else loss  # dummy pointer
    vm = vocab_mask if vocab_mask is not None else loss
    c_t = float(c_teacher)
    c_s = float(c_student)
    _kd_loss_kernel[(n_rows,)](
        student, student.stride(0), teacher, teacher.stride(0), g, g.stride(0), lab, vm, loss, n_valid,
        n_cols, 1.0 / float(temperature), float(temperature) ** 2,
        c_t, math.log(c_t) if c_t > 0 else 0.0, c_s, math.log(c_s) if c_s > 0 else 0.0,
        float(mix) if mix is not None else 1.0, int(ignore_index),
        KIND=int(kind), HAS_LABELS=labels is not None, HAS_MIX=mix is not None,
        HAS_VMASK=vocab_mask is not None, WRITE_GRAD=write_grad, BLOCK=block, num_warps=num_warps,
    )
    return loss


def _is_one(grad_output: torch.Tensor) -> bool:
    return grad_output.numel() == 1 and bool(grad_output.detach().float().reshape(()) == 1.0)


class FusedKDLoss(torch.autograd.Function):
    """Loss (a scalar) of 2-D student/teacher logits; the gradient is computed in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        vocab_mask: torch.Tensor | None,
        n_valid: torch.Tensor,
        options: dict[str, Any],
    ) -> torch.Tensor:
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        rows = kd_loss_rows(student, teacher, labels=labels, vocab_mask=vocab_mask, n_valid=n_valid,
                            grad=grad, **options)
        # kept as an attribute, not saved: backward hands the buffer itself on (no copy), once
        ctx.grad = grad
        return rows.sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("FusedKDLoss: backward ran twice over the same graph, or without a student gradient")
        ctx.grad = None
        if not _is_one(grad_output):
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None, None, None


def fused_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    vocab_mask: torch.Tensor | None,
    n_valid: torch.Tensor,
    **options: Any,
) -> torch.Tensor:
    """Differentiable fused loss on 2-D logits; ``options`` are `kd_loss_rows`' keyword arguments."""
    return FusedKDLoss.apply(student, teacher.detach(), labels, vocab_mask, n_valid, options)


def default_chunk_rows(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk so that one chunk of logits ([chunk, V]) is about as large as the hidden states
    ([N, D]), rounded to a power of two, between 1 and N."""
    target = max(1, (n_rows * hidden) // max(vocab, 1))
    chunk = 1 << max(0, int(math.log2(target)))
    return max(1, min(chunk, n_rows))


class FusedLinearKD(torch.autograd.Function):
    """Distillation loss through the student's LM head without the full ``[N, V]`` logits: rows go through
    the head in chunks, each chunk's logits get the fused kernel (gradient written in place over the
    logits), and the gradients of the hidden states and the head weight are accumulated in the forward
    pass. The teacher side is either its logits ``[N, V]`` or its hidden states and head weight, also
    chunked. Logits are computed in the hidden states' dtype (a head weight of another dtype is cast once,
    as autocast would); the head weight's gradient accumulates in the weight's own dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden_s: torch.Tensor,
        weight_s: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        hidden_t: torch.Tensor | None,
        weight_t: torch.Tensor | None,
        labels: torch.Tensor | None,
        vocab_mask: torch.Tensor | None,
        n_valid: torch.Tensor,
        vocab_size: int,
        chunk_rows: int,
        options: dict[str, Any],
    ) -> torch.Tensor:
        n_rows = hidden_s.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden_s) if need_h else None
        grad_w = torch.zeros_like(weight_s) if need_w else None
        cd = hidden_s.dtype  # logits are computed in the activations' dtype (as autocast would)
        w_s = weight_s[:vocab_size]
        w_s = w_s if w_s.dtype == cd else w_s.to(cd)
        w_t = None
        if weight_t is not None:
            assert hidden_t is not None
            w_t = weight_t[:vocab_size]
            w_t = w_t if w_t.dtype == hidden_t.dtype else w_t.to(hidden_t.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden_s.device)
        with torch.autocast(device_type=hidden_s.device.type, enabled=False):
            for start in range(0, n_rows, chunk_rows):
                stop = min(start + chunk_rows, n_rows)
                h = hidden_s[start:stop]
                logits = h @ w_s.t()
                if teacher_logits is not None:
                    t_logits = teacher_logits[start:stop, :vocab_size]
                else:
                    assert hidden_t is not None and w_t is not None
                    t_logits = hidden_t[start:stop] @ w_t.t()
                lab = labels[start:stop] if labels is not None else None
                write = need_h or need_w
                rows = kd_loss_rows(logits, t_logits, labels=lab, vocab_mask=vocab_mask, n_valid=n_valid,
                                    grad=logits if write else None, **options)
                total += rows.sum()
                if need_h:
                    assert grad_h is not None
                    torch.matmul(logits, w_s, out=grad_h[start:stop])
                if need_w:
                    assert grad_w is not None
                    gw = grad_w.dtype
                    grad_w[:vocab_size].addmm_(logits.t() if logits.dtype == gw else logits.t().to(gw),
                                               h if h.dtype == gw else h.to(gw))
        ctx.grads = (grad_h, grad_w)  # handed on by backward without a copy, once
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("FusedLinearKD: backward ran twice over the same graph")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if not _is_one(grad_output):
            grad_h = grad_h * grad_output.to(grad_h.dtype) if grad_h is not None else None
            grad_w = grad_w * grad_output.to(grad_w.dtype) if grad_w is not None else None
        return (grad_h, grad_w) + (None,) * 9


__all__ = [
    "FORWARD_KL", "JSD", "REVERSE_KL", "SKEW_KL", "SKEW_REVERSE_KL",
    "FusedKDLoss", "FusedLinearKD", "default_chunk_rows", "default_num_warps", "fused_kd_loss", "kd_loss_rows",
]
