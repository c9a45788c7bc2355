"""The fused Triton kernels (compress.kernels) against the float64 reference, run on CPU under Triton's
interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, and it must not leak into the other
tests; so this file works in two modes. In the normal pytest run it defines a single test that re-runs this
same file in a fresh ``python -m pytest`` subprocess with ``TRITON_INTERPRET=1`` and ``COMPRESS_KERNEL_CHILD=1``
in its environment; in that child the real kernel tests below are defined and run.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_CHILD = "COMPRESS_KERNEL_CHILD"
_ROOT = Path(__file__).resolve().parents[1]


if os.environ.get(_CHILD) != "1":

    @pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
    def test_triton_kernels_under_interpreter() -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD: "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::RuntimeWarning",
               "--rootdir", str(_ROOT), str(Path(__file__).resolve())]
        proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=900)
        report = proc.stdout[-10000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, report
        passed = re.search(r"(\d+) passed", proc.stdout)
        assert passed and int(passed.group(1)) >= 20, report
        assert "skipped" not in proc.stdout and "failed" not in proc.stdout, report

    _AOT_SCRIPT = """
import json, sys
try:
    import triton.backends.nvidia  # noqa: F401
except Exception as exc:
    print("no nvidia backend:", exc)
    sys.exit(3)
from compress.kernels.aot import kernel_usage  # an import error here is a failure, not a skip
from compress.kernels import KERNEL_KINDS
from compress.kernels.kd_loss import MAX_BLOCK_GPU, default_num_warps

block = MAX_BLOCK_GPU
for kind in KERNEL_KINDS:
    for phase in (None, 0, 1, 2):  # the row kernel, then each phase of the column-chunk kernel
        if phase == 1 and KERNEL_KINDS[kind] < 2:
            continue
        u = kernel_usage(kind, block=block, num_warps=default_num_warps(block), dtype="bf16", labels=True,
                         vocab_mask=True, mix=kind == "forward_kl", phase=phase)
        print(json.dumps({"kind": kind, "phase": phase, "registers": u.registers, "spills": u.spills,
                          "warps_per_sm": u.warps_per_sm}))
"""

    @pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
    def test_kernels_compile_for_sm90_without_spills() -> None:
        """The interpreter does not catch what only the compiler rejects, nor what makes a kernel slow:
        compile every kind of both kernels at the GPU defaults (block, warps) ahead of time for an H100/H200
        (sm_90), down to a cubin with triton's ptxas, which needs no GPU; no register may spill, and the
        register use must leave room for at least 16 resident warps per SM (the measured-fastest launch,
        8 warps at 4096, holds 16 to 32; see `default_num_warps`)."""
        import json

        from compress.kernels import KERNEL_KINDS

        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _CHILD)}
        env["PYTHONWARNINGS"] = "ignore"
        proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=_ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode == 3:
            pytest.skip(proc.stdout.strip())
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        assert sorted({r["kind"] for r in rows}) == sorted(KERNEL_KINDS) and len(rows) == 3 * 5 + 3, proc.stdout
        for r in rows:
            assert r["spills"] == 0, r
            assert r["warps_per_sm"] >= 16, r

else:
    from compress.distill import losses as L
    from compress.kernels import KERNEL_KINDS, interpreter_enabled, kernel_usable

    # cpu: under the interpreter (the default); cuda: the same tests compiled for a GPU (benchmarks/gpu_check.sh)
    DEVICE = os.environ.get("COMPRESS_KERNEL_DEVICE", "cpu")
    assert DEVICE == "cuda" or interpreter_enabled(), "the child run needs TRITON_INTERPRET=1"
    torch.set_default_device(DEVICE)
    from compress.kernels import kd_loss as K  # noqa: E402  (imports triton, after the env var)
    from references import LOGIT_FNS, hand_rows  # noqa: E402  (tests/ is on sys.path: pytest's rootdir import mode)

    V = 300  # not a power of two nor a multiple of any block
    MASKED = [0, 5, 6, 150, 299]
    FNS = {**LOGIT_FNS, "jsd_beta0": (L.jsd, {"beta": 0.0}), "jsd_beta1": (L.jsd, {"beta": 1.0})}

    def make(shape: tuple[int, ...], seed: int, dtype: torch.dtype, scale: float = 3.0) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (torch.randn(*shape, generator=g, device="cpu") * scale).to(DEVICE, dtype)

    def test_kernels_run_where_asked() -> None:
        x = torch.zeros(2, 3)
        assert kernel_usable(x) and x.device.type == DEVICE

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("name", sorted(FNS))
    def test_large_vocabulary_against_float64(name: str, dtype: torch.dtype) -> None:
        """A real LM vocabulary (2^17 + 123 columns: many GPU blocks and a ragged tail), every loss: fp32 within
        1e-5 of the float64 loss, bf16 logits as in the small test."""
        fn, kw = FNS[name]
        v = (1 << 17) + 123
        s, t = make((6, v), seed=21, dtype=dtype, scale=4.0), make((6, v), seed=22, dtype=dtype, scale=4.0)
        x = s.clone().requires_grad_()
        loss = fn(x, t, temperature=1.3, use_kernel=True, **kw)
        loss.backward()
        x64 = s.double().requires_grad_()
        ref = hand_rows(x64, t.double(), name, 1.3, **kw).mean() * 1.3**2
        ref.backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5 if dtype == torch.float32 else 2e-5, abs=1e-7)
        err = (x.grad.double() - x64.grad).norm() / x64.grad.norm()
        assert err.item() < (5e-5 if dtype == torch.float32 else 1e-2)  # sums over 131k columns in fp32

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("name", sorted(FNS))
    def test_kernel_matches_float64_reference(name: str, dtype: torch.dtype) -> None:
        fn, kw = FNS[name]
        tau = 1.7
        s = make((2, 5, V), seed=1, dtype=dtype)
        t = make((2, 5, V + 20), seed=2, dtype=dtype)  # padded teacher vocabulary
        t[..., V:] = 40.0  # its pad columns would dominate if they were not sliced off
        s[..., MASKED] = float("-inf")
        t[..., MASKED] = float("-inf")
        labels = torch.arange(10).reshape(2, 5)
        labels[0, 1] = labels[1, 3] = -100
        x = s.clone().requires_grad_()
        loss = fn(x, t, temperature=tau, labels=labels, vocab_size=V, use_kernel=True, **kw)
        (0.5 * loss).backward()  # grad_output != 1 goes through the scaling at backward

        keep = [i for i in range(V) if i not in MASKED]
        valid = (labels != -100).reshape(-1)
        x64 = s[..., keep].double().reshape(-1, len(keep))[valid].requires_grad_()
        t64 = t[..., keep].double().reshape(-1, len(keep))[valid]
        ref = hand_rows(x64, t64, name, tau, **kw).mean() * tau**2
        (0.5 * ref).backward()

        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert loss.item() == pytest.approx(ref.item(), rel=2e-5, abs=1e-6)
        grad = x.grad.float().reshape(-1, V)
        assert x.grad.dtype == dtype
        assert torch.count_nonzero(grad[:, MASKED]) == 0
        assert torch.count_nonzero(grad[~valid]) == 0
        got = grad[valid][:, keep].double()
        tol = 1e-6 if dtype == torch.float32 else 1e-2 * x64.grad.abs().max().item()
        torch.testing.assert_close(got, x64.grad, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=tol)

    @pytest.mark.parametrize("name", sorted(KERNEL_KINDS))
    def test_multi_block_online_logsumexp(name: str) -> None:
        """Blocks of 64 over 300 columns (a tail of 44), one block entirely masked, large logits."""
        n = 6
        s = make((n, V), seed=3, dtype=torch.float32, scale=8.0)
        t = make((n, V), seed=4, dtype=torch.float32, scale=8.0)
        s[:, 64:128] = float("-inf")
        t[:, 64:128] = float("-inf")
        s[:, 200] += 60.0  # a late maximum forces the online rescaling
        kind = KERNEL_KINDS[name]
        c_t, c_s = {"jsd": (0.4, 0.6), "skew_kl": (0.1, 0.9), "skew_reverse_kl": (0.9, 0.1)}.get(name, (0.0, 0.0))
        labels = torch.tensor([0, -100, 2, 3, -100, 5])
        n_valid = torch.tensor([4.0])
        outs = []
        for block in (64, 512):
            g = torch.full_like(s, float("nan"))  # every entry must be written
            rows = K.kd_loss_rows(s, t, kind=kind, n_valid=n_valid, temperature=2.0, c_teacher=c_t, c_student=c_s,
                                  labels=labels, grad=g, block_size=block)
            outs.append((rows, g))
        (r64, g64), (r512, g512) = outs
        assert torch.isfinite(g64).all() and torch.isfinite(r64).all()
        torch.testing.assert_close(r64, r512, rtol=1e-5, atol=1e-7)
        # fp32 rounding differs with the block size; |x| reaches 34, where one ulp is ~4e-6
        torch.testing.assert_close(g64, g512, rtol=1e-5, atol=4e-6)
        keep = [i for i in range(V) if not 64 <= i < 128]
        valid = labels != -100
        x64 = s[valid][:, keep].double().requires_grad_()
        kw = {"beta": c_t} if name == "jsd" else {"alpha": c_t if name == "skew_kl" else c_s}
        ref = hand_rows(x64, t[valid][:, keep], name, 2.0, **kw) * 4.0 / 4.0
        ref.sum().backward()
        torch.testing.assert_close(r64[valid].double(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g64[valid][:, keep].double(), x64.grad, rtol=1e-4, atol=2e-6)
        assert torch.count_nonzero(r64[~valid]) == 0 and torch.count_nonzero(g64[~valid]) == 0

    def test_kernel_equals_reference_fp16_and_no_grad() -> None:
        s = make((8, 123), seed=5, dtype=torch.float16, scale=2.0)
        t = make((8, 123), seed=6, dtype=torch.float16, scale=2.0)
        for fn, kw in FNS.values():
            ker = fn(s, t, temperature=0.7, use_kernel=True, **kw)  # student without grad: loss only
            ref = fn(s, t, temperature=0.7, use_kernel=False, **kw)
            assert ker.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
        x = s.clone().requires_grad_()
        y = s.clone().requires_grad_()
        L.skew_reverse_kl(x, t, use_kernel=True).backward()
        L.skew_reverse_kl(y, t, use_kernel=False).backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-2, atol=1e-4)

    def test_taid_object_dispatches_to_kernel() -> None:
        sched = L.TAID(t_start=0.5)
        s, t = make((4, 50), seed=7, dtype=torch.float32), make((4, 50), seed=8, dtype=torch.float32)
        assert sched(s, t, use_kernel=True).item() == pytest.approx(sched(s, t, use_kernel=False).item(), rel=1e-5)

    @pytest.mark.parametrize("strategy,chunk", [("rows", 4), ("vocab", 64), ("vocab", 1024)])
    @pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"])
    def test_fused_linear_kd_matches_reference(kind: str, strategy: str, chunk: int) -> None:
        """Both ways of cutting the logits against the materialised reference: row chunks of 4, column chunks
        of 64 over V = 300 (a tail of 44, the rows' statistics folded over 5 chunks) and one chunk."""
        torch.manual_seed(9)
        n, d_s, d_t = 11, 16, 24
        h = torch.randn(n, d_s)
        w = torch.randn(V + 4, d_s) * 0.4  # student head padded by 4 rows
        ht, wt = torch.randn(n, d_t), torch.randn(V, d_t) * 0.4
        w[40] += 3.0 * h.mean(0) / h.mean(0).norm()  # a late column chunk holds large logits: online rescaling
        labels = torch.arange(n)
        labels[[2, 7]] = -100
        vocab_mask = torch.ones(V, dtype=torch.bool)
        vocab_mask[[3, 70, 71, 299]] = False
        teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
        teacher = (ht, wt) if kind != "jsd" else ht @ wt.t()  # the teacher as logits once
        res = []
        for use_kernel in (True, False):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = L.fused_linear_kd(hh, ww, teacher, kind=kind, beta=0.6, alpha=0.2, taid_t=0.7, temperature=1.5,
                                     labels=labels, vocab_size=V, vocab_mask=vocab_mask, chunk_size=chunk,
                                     strategy=strategy, use_kernel=use_kernel)
            (2.0 * loss).backward()  # grad_output != 1: the device-side scaling
            res.append((loss.detach(), hh.grad, ww.grad))
        (lk, hk, wk), (lr, hr, wr) = res
        assert lk.item() == pytest.approx(lr.item(), rel=1e-5)
        torch.testing.assert_close(hk, hr, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(wk, wr, rtol=1e-4, atol=1e-6)
        assert torch.count_nonzero(wk[V:]) == 0 and torch.count_nonzero(hk[[2, 7]]) == 0
        assert torch.count_nonzero(wk[[3, 70, 71, 299]]) == 0

    @pytest.mark.parametrize("name", sorted(KERNEL_KINDS))
    def test_column_chunks_equal_the_row_kernel(name: str) -> None:
        """The column-chunk kernel's phases over uneven chunks give the row kernel's losses and gradients."""
        n = 5
        s = make((n, V), seed=11, dtype=torch.float32, scale=6.0)
        t = make((n, V), seed=12, dtype=torch.float32, scale=6.0)
        s[:, 250] += 40.0  # the maximum arrives in the last chunk
        kind = KERNEL_KINDS[name]
        c_t, c_s = {"jsd": (0.4, 0.6), "skew_kl": (0.1, 0.9), "skew_reverse_kl": (0.9, 0.1)}.get(name, (0.0, 0.0))
        labels = torch.tensor([0, -100, 2, 3, 4])
        opts = dict(kind=kind, temperature=1.3, c_teacher=c_t, c_student=c_s, labels=labels, n_valid=4.0)
        g_rows = torch.empty_like(s)
        rows = K.kd_loss_rows(s, t, grad=g_rows, **opts)
        g_cols = torch.full_like(s, float("nan"))
        state = K.new_cols_state(n, s.device)
        loss = torch.zeros(n)
        cuts = [0, 100, 128, 256, V]
        phases = [K.PHASE_STATS] + ([K.PHASE_SUMS] if kind >= K.JSD else []) + [K.PHASE_GRAD]
        for phase in phases:
            for c0, c1 in zip(cuts, cuts[1:]):
                chunk = s[:, c0:c1].contiguous()
                K.kd_loss_cols(chunk, t[:, c0:c1], phase=phase, state=state, loss=loss, grad=chunk, block_size=64,
                               **opts)
                if phase == K.PHASE_GRAD:
                    g_cols[:, c0:c1] = chunk
        torch.testing.assert_close(loss, rows, rtol=1e-5, atol=1e-7)
        # fp32 rounding differs with the chunking where q is ~1 (the large logit, |x| ~35): one ulp is ~4e-6
        torch.testing.assert_close(g_cols, g_rows, rtol=1e-4, atol=4e-6)

    def test_strided_logits_vocab_mask_and_labels_reach_the_kernel() -> None:
        """What the other kernel tests do not pass: logits whose last dimension is strided (a transposed
        tensor), a vocab_mask (rather than -inf entries) and a custom ignore_index through the logit losses,
        and strided teacher logits with int32 labels through fused_linear_kd's default strategy."""
        s = make((V, 6), seed=13, dtype=torch.float32).t()  # [6, V], last-dim stride 6
        t = make((V, 6), seed=14, dtype=torch.float32).t()
        assert s.stride(-1) != 1 and t.stride(-1) != 1
        labels = torch.tensor([1, 7, 2, 3, 7, 5])
        vm = torch.ones(V, dtype=torch.bool)
        vm[[4, 100, 250]] = False
        for name in ("forward_kl", "jsd", "taid"):
            fn, kw = LOGIT_FNS[name]
            # the mask on the CPU: on a GPU run (COMPRESS_KERNEL_DEVICE=cuda) it has to be moved to the logits
            args = dict(temperature=1.2, labels=labels, ignore_index=7, vocab_mask=vm.cpu(), **kw)
            x, y = s.clone().requires_grad_(), s.contiguous().requires_grad_()
            ker = fn(x, t, use_kernel=True, **args)
            ref = fn(y, t.contiguous(), use_kernel=False, **args)
            ker.backward()
            ref.backward()
            assert ker.item() == pytest.approx(ref.item(), rel=1e-5), name
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-6)
        s2, t2 = make((6, 2 * V), seed=15, dtype=torch.float32)[:, ::2], make((6, 2 * V), seed=16, dtype=torch.float32)[:, ::2]
        assert s2.stride(-1) == 2 and t2.stride(-1) == 2  # a stride of 2 as well as a transposed layout
        assert L.reverse_kl(s2, t2, use_kernel=True).item() == pytest.approx(
            L.reverse_kl(s2.contiguous(), t2.contiguous(), use_kernel=False).item(), rel=1e-5)
        torch.manual_seed(12)
        h, w = torch.randn(6, 16), torch.randn(V, 16) * 0.4
        res = []
        for use_kernel in (True, False):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            loss = L.fused_linear_kd(hh, ww, t, kind="reverse_kl", labels=labels.to(torch.int32), ignore_index=7,
                                     vocab_mask=vm, use_kernel=use_kernel)
            loss.backward()
            res.append((loss.item(), hh.grad, ww.grad))
        assert res[0][0] == pytest.approx(res[1][0], rel=1e-5)
        torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res[0][2], res[1][2], rtol=1e-4, atol=1e-6)
        # teacher logits with a last stride of exactly 2
        ker, ref = (L.fused_linear_kd(h, w, t2, kind="forward_kl", use_kernel=k).item() for k in (True, False))
        assert ker == pytest.approx(ref, rel=1e-5)

    def test_backward_scaling_happens_on_the_device() -> None:
        """grad_output is read by the kernel: exactly 1 leaves the buffer untouched, anything else scales it."""
        x = torch.arange(10.0)
        K.scale_by_grad_output(x, torch.tensor(1.0))
        assert torch.equal(x, torch.arange(10.0))
        K.scale_by_grad_output(x, torch.tensor(-0.5))
        assert torch.equal(x, torch.arange(10.0) * -0.5)

    def test_fused_linear_kd_bf16_and_default_chunks() -> None:
        torch.manual_seed(10)
        h = torch.randn(2, 6, 32)
        w = torch.randn(V, 32) * 0.3
        t_logits = torch.randn(2, 6, V)
        hb, wb = h.to(torch.bfloat16).requires_grad_(), w.to(torch.bfloat16).requires_grad_()
        loss = L.fused_linear_kd(hb, wb, t_logits.to(torch.bfloat16), kind="reverse_kl", use_kernel=True)
        loss.backward()
        h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
        ref = hand_rows((h64 @ w64.t()).reshape(-1, V), t_logits.to(torch.bfloat16).double().reshape(-1, V),
                        "reverse_kl", 1.0).mean()
        ref.backward()
        # the logits themselves are rounded to bf16 on the kernel path
        assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
        assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
        for got, want in ((hb.grad, h64.grad), (wb.grad, w64.grad)):
            err = (got.double() - want).norm() / want.norm()
            assert err.item() < 3e-2
        # bf16 activations with an fp32 head (mixed precision): the weight's gradient stays fp32 (on CUDA the
        # GEMMs write it from bf16 operands directly)
        h3, w3 = h.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_()
        L.fused_linear_kd(h3, w3, t_logits, kind="jsd", use_kernel=False).backward()
        for strategy, chunk in (("vocab", 64), ("rows", 5)):
            h2, w2 = h.to(torch.bfloat16).requires_grad_(), w.clone().requires_grad_()
            mixed = L.fused_linear_kd(h2, w2, t_logits, kind="jsd", chunk_size=chunk, strategy=strategy,
                                      use_kernel=True)
            mixed.backward()
            assert w2.grad.dtype == torch.float32 and h2.grad.dtype == torch.bfloat16
            assert ((w2.grad - w3.grad).norm() / w3.grad.norm()).item() < 3e-2
            assert ((h2.grad.float() - h3.grad.float()).norm() / h3.grad.float().norm()).item() < 3e-2
        assert K.default_chunk_rows(12) == 12 and K.default_chunk_rows(4096) == 512 and K.default_chunk_rows(4096, 4) == 1024
        assert K.default_chunk_cols(32, V) == 256 and K.default_chunk_cols(4096, 128_000) == 4096
