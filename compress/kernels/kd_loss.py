"""Fused distillation losses on logits: loss and gradient in one launch (DESIGN.md, Algorithms, Logit losses).

One Triton program handles one row (one token): it sweeps the vocabulary in chunks of ``BLOCK`` columns,

* sweep 1: online log-sum-exp in fp32 of the student and the teacher logits (and, for reverse KL, the
  online expectation ``<q, x_s - x_t>`` that centres its gradient);
* sweep 2: the loss of the row; for forward/reverse KL it also writes the gradient;
* sweep 3 (JSD, skew KL, skew reverse KL only): the gradient, which needs a row-wide sum from sweep 2.

Through the LM head (`FusedLinearKD`) a row's logits may exist one column chunk at a time: there a second
kernel, `_kd_cols_kernel`, runs the same sweeps as phases over the chunks, keeping each row's running
statistics in a small state tensor (the ``"vocab"`` strategy); the ``"rows"`` strategy uses the row kernel
on chunks of rows. Both share the per-chunk math (`_online_lse`, `_kl_block`, `_mixture_sums`,
`_grad_block`).

The gradient wrt the student logits is written during the forward pass, already scaled by
``tau^2 / n_valid`` (the mean over valid rows and the tau^2 convention); the autograd Function only
multiplies it by ``grad_output`` at backward, on the device (`scale_by_grad_output`: nothing is done when
it is exactly 1, and no host sync decides that). Inputs may be fp32, fp16 or
bf16: every value is upcast to fp32 before any arithmetic. ``-inf`` logits (padded or masked vocabulary)
contribute 0 to the loss and get a 0 gradient. Rows whose label equals ``ignore_index`` get loss 0 and
gradient 0. Notation: ``x = logits / tau``, ``a = log q`` (student), ``b = log p`` (teacher),
``m = c_t p + c_s q`` the mixture of the JSD/skew losses (computed from p and q, one log per element).

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
import warnings
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
def _online_lse(m, z, x):
    """Fold a chunk ``x`` into a running max ``m`` and sum ``z`` of ``exp(x - m)``. Returns the new max and
    sum, the factor that rescaled the old sum and ``exp(x - new max)`` (0 where x is -inf)."""
    new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(new == float("-inf"), 0.0, new)
    corr = tl.exp(m - safe)
    e = tl.exp(x - safe)
    return new, z * corr + tl.sum(e, 0), corr, e


@triton.jit
def _kl_block(a, b, q, p, KIND: tl.constexpr):
    """One chunk's share of forward KL ``sum p (b - a)`` (KIND 0) or reverse KL ``sum q (a - b)`` (KIND 1)."""
    if KIND == 0:
        out = tl.sum(tl.where(p > 0, p * (b - a), 0.0), 0)
    else:
        out = tl.sum(tl.where(q > 0, q * (a - b), 0.0), 0)
    return out


@triton.jit
def _log(x, FAST_LOG: tl.constexpr):
    """Natural log. FAST_LOG (on a GPU): the SFU's ``lg2.approx`` (absolute error ~2^-22 in log2 units) in
    one instruction, where ``tl.log`` compiles to libdevice's ``logf``, a ~20-instruction polynomial that
    made the mixture kinds compute-bound; the interpreter has no inline PTX and takes ``tl.log``."""
    if FAST_LOG:
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1) * 0.6931471805599453
    else:
        y = tl.log(x)
    return y


@triton.jit
def _mixture(q, p, c_teacher, c_student, FAST_LOG: tl.constexpr):
    """The mixture ``m = c_t p + c_s q`` (floored at the smallest normal fp32, so that ``log m`` stays finite
    where both underflow: every term it enters is multiplied by p or q, which are then ~0) and ``log m``.
    Linear in p and q, which the sweeps hold anyway: one log per element instead of a log-sum-exp."""
    m = tl.maximum(c_teacher * p + c_student * q, 1.1754943508222875e-38)
    return m, _log(m, FAST_LOG)


@triton.jit
def _mixture_sums(a, b, q, p, c_teacher, c_student, KIND: tl.constexpr, FAST_LOG: tl.constexpr):
    """One chunk's share of the row sums of the mixture losses (KIND 2-4): ``sum p (b - log m)``,
    ``sum q (a - log m)`` and the kind's extra sum (skew KL: ``sum p w``, ``w = c_s q / m``; skew reverse
    KL: ``alpha sum q^2 / m``; JSD: 0)."""
    m, lm = _mixture(q, p, c_teacher, c_student, FAST_LOG)
    sum_p = tl.sum(tl.where(p > 0, p * (b - lm), 0.0), 0)
    sum_q = tl.sum(tl.where(q > 0, q * (a - lm), 0.0), 0)
    if KIND == 3:
        extra = tl.sum(c_student * q * p * tl.fdiv(1.0, m), 0)  # finite everywhere: m >= the floor
    elif KIND == 4:
        extra = tl.sum(c_student * q * q * tl.fdiv(1.0, m), 0)
    else:
        extra = sum_p * 0.0
    return sum_p, sum_q, extra


@triton.jit
def _mixture_loss(sum_p, sum_q, c_teacher, c_student, KIND: tl.constexpr):
    """A row's mixture loss from its sums: JSD ``c_t KL(p||m) + c_s KL(q||m)``, skew KL ``KL(p||m)``, skew
    reverse KL ``KL(q||m)``."""
    if KIND == 2:
        out = c_teacher * sum_p + c_student * sum_q
    elif KIND == 3:
        out = sum_p
    else:
        out = sum_q
    return out


@triton.jit
def _grad_block(a, b, q, p, center, extra, c_teacher, c_student, KIND: tl.constexpr, FAST_LOG: tl.constexpr):
    """One chunk of the gradient wrt ``x`` (module docstring), unscaled. ``center`` is ``<q, d>`` (reverse KL,
    JSD) or ``<q, g>`` (skew reverse KL); ``extra`` is skew KL's ``<p, w>``."""
    if KIND == 0:
        g = q - p
    elif KIND == 1:
        g = tl.where(q > 0, q * (a - b - center), 0.0)
    else:
        m, lm = _mixture(q, p, c_teacher, c_student, FAST_LOG)
        if KIND == 2:
            g = c_student * tl.where(q > 0, q * (a - lm - center), 0.0)
        elif KIND == 3:
            g = q * (extra - c_student * p * tl.fdiv(1.0, m))
        else:
            g = tl.where(q > 0, q * (a - lm - c_student * q * tl.fdiv(1.0, m) - center), 0.0)
    return g


@triton.jit
def _valid_count(NVALID, n_valid_const):
    """The number of valid rows: a constant from the host (no labels) or read from device memory."""
    if n_valid_const > 0:
        nv = n_valid_const
    else:
        nv = tl.load(NVALID).to(tl.float32)
    return nv


@triton.jit
def _zero_row(G, n_cols, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        tl.store(G + offs, tl.zeros([BLOCK], dtype=tl.float32).to(G.dtype.element_ty), mask=offs < n_cols)


@triton.jit
def _kd_loss_kernel(
    S, stride_s, T, stride_t, G, stride_g, LABELS, VMASK, LOSS, NVALID, n_valid_const,
    n_cols, inv_tau, scale, c_teacher, c_student, mix, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MIX: tl.constexpr, HAS_VMASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr,
):
    """One program per row over the whole vocabulary (the logits path)."""
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
                _zero_row(G, n_cols, BLOCK)
            return

    row_scale = scale / _valid_count(NVALID, n_valid_const)  # tau^2 / number of valid rows
    grad_scale = row_scale * inv_tau                         # d/dlogits = d/dx / tau

    # ---- sweep 1: online log-sum-exp of both rows (+ <q, x_s - x_t> for reverse KL) -------------------
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        xs, xt = _load_block(S, T, VMASK, start + cols, n_cols, inv_tau, mix, HAS_MIX, HAS_VMASK)
        m_s, z_s, corr_s, es = _online_lse(m_s, z_s, xs)
        if KIND == 1:
            acc = acc * corr_s + tl.sum(tl.where(es > 0, es * (xs - xt), 0.0), 0)
        m_t, z_t, _, _ = _online_lse(m_t, z_t, xt)
    lse_s = m_s + tl.log(z_s)
    lse_t = m_t + tl.log(z_t)

    loss = 0.0
    if KIND <= 1:
        # ---- forward / reverse KL: sweep 2 writes loss and gradient (reverse KL's <q, d> from sweep 1) ---
        center = acc / z_s - lse_s + lse_t
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX, HAS_VMASK)
            loss += _kl_block(a, b, q, p, KIND)
            if WRITE_GRAD:
                g = _grad_block(a, b, q, p, center, 0.0, c_teacher, c_student, KIND, FAST_LOG)
                tl.store(G + offs, (g * grad_scale).to(G.dtype.element_ty), mask=offs < n_cols)
    else:
        # ---- JSD / skew KL / skew reverse KL: sweep 2 sums, sweep 3 writes the gradient ---------------
        sum_p = 0.0
        sum_q = 0.0
        extra = 0.0
        for start in range(0, n_cols, BLOCK):
            a, b, q, p = _load_log_probs(S, T, VMASK, start + cols, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX,
                                         HAS_VMASK)
            dp, dq, de = _mixture_sums(a, b, q, p, c_teacher, c_student, KIND, FAST_LOG)
            sum_p += dp
            sum_q += dq
            extra += de
        loss = _mixture_loss(sum_p, sum_q, c_teacher, c_student, KIND)
        if WRITE_GRAD:
            center = sum_q - extra  # JSD: <q, d> (extra is 0);  skew reverse KL: <q, g>
            for start in range(0, n_cols, BLOCK):
                offs = start + cols
                a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX,
                                             HAS_VMASK)
                g = _grad_block(a, b, q, p, center, extra, c_teacher, c_student, KIND, FAST_LOG)
                tl.store(G + offs, (g * grad_scale).to(G.dtype.element_ty), mask=offs < n_cols)
    tl.store(LOSS + row, loss * row_scale)


#: Phases of `_kd_cols_kernel`, each one launch over every column chunk in turn.
PHASE_STATS, PHASE_SUMS, PHASE_GRAD = 0, 1, 2
#: Per-row state of `_kd_cols_kernel` (fp32): max and sum of the student, max and sum of the teacher, reverse
#: KL's running <exp(x_s - m_s), x_s - x_t>, then the mixture sums sum_p, sum_q and extra.
STATE_WIDTH = 8


@triton.jit
def _kd_cols_kernel(
    S, stride_s, T, stride_t, G, stride_g, LABELS, VMASK, LOSS, NVALID, n_valid_const,
    n_cols, inv_tau, scale, c_teacher, c_student, mix, ignore_index, STATE,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MIX: tl.constexpr, HAS_VMASK: tl.constexpr,
    WRITE_GRAD: tl.constexpr, PHASE: tl.constexpr, BLOCK: tl.constexpr, FAST_LOG: tl.constexpr,
):
    """One program per row over one chunk of the vocabulary (the LM-head path, where a row's logits exist
    one column chunk at a time). The row's sweeps become phases, each run over every chunk before the next:
    PHASE_STATS folds the chunk into the row's online log-sum-exps (and reverse KL's running sum),
    PHASE_SUMS (mixture kinds) adds the chunk's mixture sums, PHASE_GRAD writes the chunk's gradient and
    adds its share of the loss (KL kinds) or writes the row's loss (mixture kinds). The state lives in
    ``STATE[row, :STATE_WIDTH]``; ``LOSS`` must start at 0."""
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    G += row * stride_g
    ST = STATE + row * 8
    cols = tl.arange(0, BLOCK)

    if HAS_LABELS:
        label = tl.load(LABELS + row)
        if label == ignore_index:
            if PHASE == 2:
                if WRITE_GRAD:
                    _zero_row(G, n_cols, BLOCK)
            return

    if PHASE == 0:
        m_s = tl.load(ST + 0)
        z_s = tl.load(ST + 1)
        m_t = tl.load(ST + 2)
        z_t = tl.load(ST + 3)
        acc = tl.load(ST + 4)
        for start in range(0, n_cols, BLOCK):
            xs, xt = _load_block(S, T, VMASK, start + cols, n_cols, inv_tau, mix, HAS_MIX, HAS_VMASK)
            m_s, z_s, corr_s, es = _online_lse(m_s, z_s, xs)
            if KIND == 1:
                acc = acc * corr_s + tl.sum(tl.where(es > 0, es * (xs - xt), 0.0), 0)
            m_t, z_t, _, _ = _online_lse(m_t, z_t, xt)
        tl.store(ST + 0, m_s)
        tl.store(ST + 1, z_s)
        tl.store(ST + 2, m_t)
        tl.store(ST + 3, z_t)
        tl.store(ST + 4, acc)
    else:
        z_s = tl.load(ST + 1)
        lse_s = tl.load(ST + 0) + tl.log(z_s)
        lse_t = tl.load(ST + 2) + tl.log(tl.load(ST + 3))
        if PHASE == 1:
            sum_p = tl.load(ST + 5)
            sum_q = tl.load(ST + 6)
            extra = tl.load(ST + 7)
            for start in range(0, n_cols, BLOCK):
                a, b, q, p = _load_log_probs(S, T, VMASK, start + cols, n_cols, inv_tau, mix, lse_s, lse_t,
                                             HAS_MIX, HAS_VMASK)
                dp, dq, de = _mixture_sums(a, b, q, p, c_teacher, c_student, KIND, FAST_LOG)
                sum_p += dp
                sum_q += dq
                extra += de
            tl.store(ST + 5, sum_p)
            tl.store(ST + 6, sum_q)
            tl.store(ST + 7, extra)
        else:
            row_scale = scale / _valid_count(NVALID, n_valid_const)
            grad_scale = row_scale * inv_tau
            if KIND <= 1:
                center = tl.load(ST + 4) / z_s - lse_s + lse_t
                extra = 0.0
                loss = 0.0
                for start in range(0, n_cols, BLOCK):
                    offs = start + cols
                    a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t, HAS_MIX,
                                                 HAS_VMASK)
                    loss += _kl_block(a, b, q, p, KIND)
                    if WRITE_GRAD:
                        g = _grad_block(a, b, q, p, center, extra, c_teacher, c_student, KIND, FAST_LOG)
                        tl.store(G + offs, (g * grad_scale).to(G.dtype.element_ty), mask=offs < n_cols)
                tl.store(LOSS + row, tl.load(LOSS + row) + loss * row_scale)
            else:
                sum_q = tl.load(ST + 6)
                extra = tl.load(ST + 7)
                if WRITE_GRAD:
                    center = sum_q - extra
                    for start in range(0, n_cols, BLOCK):
                        offs = start + cols
                        a, b, q, p = _load_log_probs(S, T, VMASK, offs, n_cols, inv_tau, mix, lse_s, lse_t,
                                                     HAS_MIX, HAS_VMASK)
                        g = _grad_block(a, b, q, p, center, extra, c_teacher, c_student, KIND, FAST_LOG)
                        tl.store(G + offs, (g * grad_scale).to(G.dtype.element_ty), mask=offs < n_cols)
                tl.store(LOSS + row, _mixture_loss(tl.load(ST + 5), sum_q, c_teacher, c_student, KIND) * row_scale)


#: Programs of `scale_by_grad_output` at most (each strides over the tensor).
SCALE_PROGRAMS = 2048


@triton.jit
def _scale_unless_one_kernel(X, n, GO, BLOCK: tl.constexpr):
    """``X *= grad_output`` in place, read on the device: when it is exactly 1 (a plain ``loss.backward()``)
    every program returns at once, so backward needs no host sync to decide and no pass over X."""
    go = tl.load(GO).to(tl.float32)
    if go != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < n
            x = tl.load(X + offs, mask=inside).to(tl.float32)
            tl.store(X + offs, (x * go).to(X.dtype.element_ty), mask=inside)


def default_num_warps(block: int) -> int:
    """Warps per row program: 16 columns per thread (two 16-byte loads of bf16 per row and step), 4 to 8 warps.

    Chosen from the launch sweep on an H200 (``benchmarks/kd_loss.py --tune``, bf16, 4096 rows, forward +
    backward, 2026-11-30), time of the old default (16 warps at a block of 4096) over this one's, i.e. > 1 is
    faster:

    ==========  ======  =====  =====  =====================================================
    loss        V=32k   128k   256k   (block 4096, 8 warps; every other of 12 launches tried
                                       in 2048-16384 x 8-32 warps was slower or within 5%)
    ==========  ======  =====  =====  =====================================================
    forward KL  1.30x   1.24x  1.23x
    reverse KL  1.36x   1.41x  1.40x
    JSD         1.00x   1.03x  1.02x  (compute-bound: no launch moves it by more than 5%)
    ==========  ======  =====  =====  =====================================================

    The compiler's view (``--static``) had preferred 16 warps: at 8, reverse KL and JSD hold 95-106 registers,
    16 resident warps per SM. The sweep says fewer, fatter threads win anyway (more bytes in flight per
    thread); no kind spills at 8 warps (`tests/test_kernels.py` holds that)."""
    return max(4, min(8, block // 512))


def _pick_block(n_cols: int, block_size: int | None) -> int:
    if block_size is not None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        return block_size
    cap = MAX_BLOCK_INTERPRETER if interpreter_enabled() else MAX_BLOCK_GPU
    return min(triton.next_power_of_2(max(n_cols, 16)), cap)


def _scalar_args(temperature: float, c_teacher: float, c_student: float, mix: float | None,
                 ignore_index: int) -> tuple[Any, ...]:
    """The kernels' shared scalar arguments, from ``inv_tau`` to ``ignore_index``."""
    return (1.0 / float(temperature), float(temperature) ** 2, float(c_teacher), float(c_student),
            float(mix) if mix is not None else 1.0, int(ignore_index))


def _valid_args(n_valid: torch.Tensor | float, dummy: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(pointer, constant) for the kernels' valid-row count: a host number needs no device tensor."""
    if isinstance(n_valid, torch.Tensor):
        return n_valid, 0.0
    return dummy, float(max(n_valid, 1))


def _launch(kernel: Any, student: torch.Tensor, teacher: torch.Tensor, loss: torch.Tensor, *extra: Any,
            kind: int, n_valid: torch.Tensor | float, temperature: float, c_teacher: float, c_student: float,
            mix: float | None, labels: torch.Tensor | None, ignore_index: int, vocab_mask: torch.Tensor | None,
            grad: torch.Tensor | None, block_size: int | None, num_warps: int | None, **constexprs: Any) -> None:
    """One program per row of ``student``/``teacher`` ([N, V], last dim contiguous) for either kernel: dummy
    pointers for the absent optional inputs, the launch (`default_num_warps`), the shared arguments."""
    n_rows, n_cols = student.shape
    if student.stride(-1) != 1 or teacher.stride(-1) != 1:
        raise ValueError("the last dimension of the logits must be contiguous")
    if n_rows == 0:
        return
    block = _pick_block(n_cols, block_size)
    g = grad if grad is not None else student  # a dummy pointer when no gradient is written
    lab = labels if labels is not None else loss
    vm = vocab_mask if vocab_mask is not None else loss
    nv_ptr, nv_const = _valid_args(n_valid, loss)
    kernel[(n_rows,)](
        student, student.stride(0), teacher, teacher.stride(0), g, g.stride(0), lab, vm, loss, nv_ptr, nv_const,
        n_cols, *_scalar_args(temperature, c_teacher, c_student, mix, ignore_index), *extra,
        KIND=int(kind), HAS_LABELS=labels is not None, HAS_MIX=mix is not None,
        HAS_VMASK=vocab_mask is not None, WRITE_GRAD=grad is not None, BLOCK=block,
        FAST_LOG=not interpreter_enabled(), num_warps=num_warps or default_num_warps(block), **constexprs,
    )


def kd_loss_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: int,
    n_valid: torch.Tensor | float,
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
    """Launch the row kernel on 2-D logits ``[N, V]`` (last dim contiguous). Returns the per-row losses (fp32,
    already scaled by ``tau^2 / n_valid``: their sum is the loss) and, when ``grad`` is given, writes the
    scaled gradient wrt ``student`` into it (``grad`` may be ``student`` itself: the kernel reads each
    chunk before it writes it). ``n_valid`` is the number of valid rows: a host number, or a one-element
    tensor on the same device when it is only known there (rows dropped by labels)."""
    loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
    _launch(_kd_loss_kernel, student, teacher, loss, kind=kind, n_valid=n_valid, temperature=temperature,
            c_teacher=c_teacher, c_student=c_student, mix=mix, labels=labels, ignore_index=ignore_index,
            vocab_mask=vocab_mask, grad=grad, block_size=block_size, num_warps=num_warps)
    return loss


def new_cols_state(n_rows: int, device: torch.device) -> torch.Tensor:
    """The per-row state `_kd_cols_kernel` starts from: maxima -inf, sums 0."""
    state = torch.zeros(n_rows, STATE_WIDTH, dtype=torch.float32, device=device)
    state[:, 0] = float("-inf")
    state[:, 2] = float("-inf")
    return state


def kd_loss_cols(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    phase: int,
    state: torch.Tensor,
    loss: torch.Tensor,
    kind: int,
    n_valid: torch.Tensor | float,
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
) -> None:
    """One phase of the column-chunk kernel on one chunk ``[N, Vc]`` of both logits (rows may be strided,
    columns contiguous). Run `PHASE_STATS` over every chunk, then `PHASE_SUMS` (mixture kinds only), then
    `PHASE_GRAD`; ``state`` comes from `new_cols_state`, ``loss`` ([N] fp32) from zeros and ends holding
    the per-row losses (scaled as in `kd_loss_rows`). ``vocab_mask`` is the chunk's own slice; ``grad`` is
    written in `PHASE_GRAD` only."""
    _launch(_kd_cols_kernel, student, teacher, loss, state, kind=kind, n_valid=n_valid, temperature=temperature,
            c_teacher=c_teacher, c_student=c_student, mix=mix, labels=labels, ignore_index=ignore_index,
            vocab_mask=vocab_mask, grad=grad if phase == PHASE_GRAD else None, block_size=block_size,
            num_warps=num_warps, PHASE=int(phase))


def scale_by_grad_output(x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``x *= grad_output`` in place (contiguous ``x``, one-element ``grad_output``) without a host sync;
    nothing is read or written when ``grad_output`` is exactly 1."""
    n = x.numel()
    if n == 0:
        return x
    block = MAX_BLOCK_INTERPRETER if interpreter_enabled() else 4096
    go = grad_output.reshape(1)
    if go.device != x.device:
        go = go.to(x.device)
    # a bounded grid that strides over x: when grad_output is 1 the launch is a few thousand empty programs,
    # not one per block of x (128k for a [4096, 128k] gradient: 78 us measured on an H200)
    programs = min(triton.cdiv(n, block), SCALE_PROGRAMS)
    _scale_unless_one_kernel[(programs,)](x, n, go, BLOCK=block, num_warps=4)
    return x


class FusedKDLoss(torch.autograd.Function):
    """Loss (a scalar) of 2-D student/teacher logits; the gradient is computed in the forward pass."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: torch.Tensor,
        teacher: torch.Tensor,
        labels: torch.Tensor | None,
        vocab_mask: torch.Tensor | None,
        n_valid: torch.Tensor | float,
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
        return scale_by_grad_output(grad, grad_output), None, None, None, None, None


def fused_kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    labels: torch.Tensor | None,
    vocab_mask: torch.Tensor | None,
    n_valid: torch.Tensor | float,
    **options: Any,
) -> torch.Tensor:
    """Differentiable fused loss on 2-D logits; ``options`` are `kd_loss_rows`' keyword arguments."""
    return FusedKDLoss.apply(student, teacher.detach(), labels, vocab_mask, n_valid, options)


# ----------------------------------------------------------------------------------------------------------
# Through the LM head: the logits exist one chunk at a time
# ----------------------------------------------------------------------------------------------------------
#: How `FusedLinearKD` cuts the ``[N, V]`` logits: ``"rows"``, row chunks over the whole vocabulary (each
#: logit computed once; every chunk adds into the whole ``[V, D]`` head gradient, a read and a write of it), or
#: ``"vocab"``, column chunks of every row (the logits of a chunk are computed twice, for the row statistics
#: and for the gradient, but each chunk's rows of the head gradient are written once: the least memory).
#: Measured on an H200 (hidden 4096, V=128k, 4096 tokens, bf16, forward + backward; benchmarks/README.md):
#: forward KL rows/512 31.7 ms at 1407 MiB (before chunk buffers were freed early), vocab/2048 41.5 ms at
#: 1112 MiB, eager 57.8 ms, Liger 75.3 ms. ``"auto"`` takes ``"rows"``.
STRATEGIES = ("rows", "vocab")

#: FLOP per byte above which a bf16 GEMM on an H100/H200 is compute-bound (dense bf16 ~990 TFLOP/s over
#: 3.35-4.8 TB/s: 206-295). The ``"rows"`` head-gradient GEMM ``grad_W += G^T h`` does ``2 V D C`` FLOP for
#: ``2 V D`` elements of ``grad_W`` read and written: ``C / elem_size`` FLOP per byte.
GEMM_RIDGE = 256


def default_chunk_rows(n_rows: int, grad_elem_size: int = 2) -> int:
    """``"rows"``: rows per chunk for a compute-bound head-gradient GEMM (`GEMM_RIDGE`): 512 for a bf16/fp16
    head, 1024 for an fp32 one, at most N. The sweep agrees: 128 rows 56.9 ms, 256 36.3 ms, 512 31.7 ms.
    Memory: two chunks of logits (student and teacher), ``4 C V`` bytes in bf16."""
    return max(1, min(n_rows, GEMM_RIDGE * grad_elem_size))


def default_chunk_cols(hidden: int, vocab: int) -> int:
    """``"vocab"``: columns per chunk, so that one chunk of logits ([N, chunk]) is about as large as the
    hidden states ([N, D]): the hidden size rounded to a power of two, at least 256, at most V (the sweep
    found 2048-16384 within 6% of each other at hidden 4096)."""
    return max(1, min(vocab, max(256, triton.next_power_of_2(max(hidden, 1)))))


#: Whether ``torch.addmm(..., out_dtype=torch.float32)`` (bf16/fp16 operands, fp32 result) is used on CUDA.
_OUT_DTYPE_GEMM = True


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a @ b`` with ``out`` in its own dtype (fp32 accumulation inside the GEMM). On CUDA bf16/fp16
    operands go to cuBLAS as they are, with an fp32 ``out`` written by the GEMM itself (no fp32 copy of the
    operands); elsewhere the operands are cast to ``out``'s dtype."""
    global _OUT_DTYPE_GEMM
    if a.dtype == out.dtype and b.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if _OUT_DTYPE_GEMM and out.is_cuda and out.dtype == torch.float32 and a.dtype == b.dtype:
        try:
            torch.addmm(out, a, b, beta=1.0 if accumulate else 0.0, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, TypeError) as err:  # a torch without addmm(out_dtype=): cast, and say so once
            _OUT_DTYPE_GEMM = False
            warnings.warn(f"fused_linear_kd: this torch has no mixed-dtype addmm ({err}); the chunks are cast to "
                          "fp32 for the GEMMs into fp32 gradients (slower, more memory)", stacklevel=2)
    if accumulate:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))
    else:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)


class FusedLinearKD(torch.autograd.Function):
    """Distillation loss through the student's LM head without the full ``[N, V]`` logits: the logits are
    computed one chunk at a time (`STRATEGIES`), each chunk's loss gradient is written by the fused kernel in
    place over the chunk's logits, and one GEMM per chunk and gradient accumulates the gradients of the
    hidden states and the head weight, all in the forward pass. The teacher side is either its logits
    ``[N, V]`` or its hidden states and head weight, chunked the same way. Logits are computed in the hidden
    states' dtype (a head weight of another dtype is cast chunk by chunk, as autocast would); the head
    weight's gradient is written in the weight's own dtype, the hidden states' gradient accumulates in fp32
    (``"vocab"``) before it is cast to theirs."""

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
        n_valid: torch.Tensor | float,
        vocab_size: int,
        strategy: str,
        chunk: int,
        options: dict[str, Any],
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        run = _linear_by_vocab if strategy == "vocab" else _linear_by_rows
        with torch.autocast(device_type=hidden_s.device.type, enabled=False):
            total, grad_h, grad_w = run(hidden_s, weight_s, teacher_logits, hidden_t, weight_t, labels, vocab_mask,
                                        n_valid, vocab_size, chunk, need_h, need_w, options)
        ctx.grads = (grad_h, grad_w)  # handed on by backward without a copy, once
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("FusedLinearKD: backward ran twice over the same graph")
        grads = tuple(None if g is None else scale_by_grad_output(g, grad_output) for g in ctx.grads)
        ctx.grads = None
        return grads + (None,) * 10


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _linear_by_rows(hidden_s, weight_s, teacher_logits, hidden_t, weight_t, labels, vocab_mask, n_valid,  # type: ignore[no-untyped-def]
                    vocab_size, chunk_rows, need_h, need_w, options):
    """``"rows"``: each chunk of rows goes through both heads over the whole vocabulary; the kernel writes the
    chunk's logit gradient in place, then ``grad_h[chunk] = G W`` and ``grad_W += G^T h``."""
    n_rows = hidden_s.shape[0]
    cd = hidden_s.dtype
    grad_h = torch.empty_like(hidden_s) if need_h else None
    grad_w = torch.zeros_like(weight_s) if need_w else None
    w_s = _as(weight_s[:vocab_size], cd)
    w_t = _as(weight_t[:vocab_size], hidden_t.dtype) if weight_t is not None else None
    total = torch.zeros((), dtype=torch.float32, device=hidden_s.device)
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        h = hidden_s[start:stop]
        logits = h @ w_s.t()
        t_logits = teacher_logits[start:stop, :vocab_size] if teacher_logits is not None else hidden_t[start:stop] @ w_t.t()
        lab = labels[start:stop] if labels is not None else None
        write = need_h or need_w
        rows = kd_loss_rows(logits, t_logits, labels=lab, vocab_mask=vocab_mask, n_valid=n_valid,
                            grad=logits if write else None, **options)
        del t_logits  # before the next chunk's logits are allocated: one chunk of each side at a time
        total += rows.sum()
        if need_h:
            _mm_into(grad_h[start:stop], logits, w_s, accumulate=False)
        if need_w:
            _mm_into(grad_w[:vocab_size], logits.t(), h, accumulate=True)
        del logits
    return total, grad_h, grad_w


def _linear_by_vocab(hidden_s, weight_s, teacher_logits, hidden_t, weight_t, labels, vocab_mask, n_valid,  # type: ignore[no-untyped-def]
                     vocab_size, chunk_cols, need_h, need_w, options):
    """``"vocab"``: the kernel's sweeps become phases over column chunks of all rows (`_kd_cols_kernel`). Each
    phase recomputes the chunk's logits of both heads; the last one writes the chunk's logit gradient in
    place, then ``grad_W[chunk] = G^T h`` (written once) and ``grad_h += G W[chunk]`` (fp32)."""
    n_rows = hidden_s.shape[0]
    cd = hidden_s.dtype
    dev = hidden_s.device
    kind = options["kind"]
    state = new_cols_state(n_rows, dev)
    loss = torch.zeros(n_rows, dtype=torch.float32, device=dev)
    grad_w = None
    if need_w:
        grad_w = torch.empty_like(weight_s)
        grad_w[vocab_size:].zero_()
    acc_h = torch.zeros(hidden_s.shape, dtype=torch.float32, device=dev) if need_h else None
    phases = [PHASE_STATS] + ([PHASE_SUMS] if kind >= JSD else []) + [PHASE_GRAD]
    for phase in phases:
        last = phase == PHASE_GRAD
        for c0 in range(0, vocab_size, chunk_cols):
            c1 = min(c0 + chunk_cols, vocab_size)
            w_c = _as(weight_s[c0:c1], cd)
            logits = hidden_s @ w_c.t()
            if teacher_logits is not None:
                t_logits = teacher_logits[:, c0:c1]
            else:
                t_logits = hidden_t @ _as(weight_t[c0:c1], hidden_t.dtype).t()
            vm = vocab_mask[c0:c1] if vocab_mask is not None else None
            write = last and (need_h or need_w)
            kd_loss_cols(logits, t_logits, phase=phase, state=state, loss=loss, labels=labels, vocab_mask=vm,
                         n_valid=n_valid, grad=logits if write else None, **options)
            del t_logits  # one chunk of each side at a time
            if write and need_w:
                _mm_into(grad_w[c0:c1], logits.t(), hidden_s, accumulate=False)
            if write and need_h:
                _mm_into(acc_h, logits, w_c, accumulate=True)
            del logits, w_c
    grad_h = _as(acc_h, hidden_s.dtype) if acc_h is not None else None
    return loss.sum(), grad_h, grad_w


__all__ = [
    "FORWARD_KL", "JSD", "PHASE_GRAD", "PHASE_STATS", "PHASE_SUMS", "REVERSE_KL", "SKEW_KL", "SKEW_REVERSE_KL",
    "STATE_WIDTH", "STRATEGIES", "FusedKDLoss", "FusedLinearKD", "default_chunk_cols", "default_chunk_rows",
    "default_num_warps", "fused_kd_loss", "kd_loss_cols", "kd_loss_rows", "new_cols_state", "scale_by_grad_output",
]
