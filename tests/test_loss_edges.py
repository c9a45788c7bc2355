"""Edges of the distillation losses that the mutation run (docs/testing.md, Mutation testing) showed untested:
one-sided -inf entries in TAID's target, the LM-head loss `fused_linear_kd` on its PyTorch path against float64
(loss and both gradients), argument boundaries, defaults, the wrappers' pass-through of every argument, and the
hidden / attention / relation losses at the cases that tell a wrong formula apart. All in-process and fast."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import losses as L
from compress.errors import InputError
from compress.kernels import interpreter_enabled
from references import LOGIT_FNS, hand_rows, relation_kl_float64, taid_rows_masked, taid_t_sequence


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# -- TAID: entries -inf on one side only ------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_taid_masks_entries_minus_inf_on_either_side(t: float) -> None:
    """An entry -inf for the student only, or for the teacher only, is masked in the target at every t,
    including the ends t = 0 and t = 1 where one side's weight is 0 (0 * -inf must not leak a NaN)."""
    tau = 1.4
    s, te = logits(3, 12, seed=40), logits(3, 12, seed=41)
    s[:, [2, 7]] = float("-inf")  # student only
    te[:, [4, 9]] = float("-inf")  # teacher only
    te[1, 11] = float("-inf")
    x = s.clone().requires_grad_()
    loss = L.taid(x, te, t=t, temperature=tau)
    loss.backward()
    ref = taid_rows_masked(s, te, t, tau).mean() * tau**2
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    # gradient: tau (q - p_t) / n per row, with p_t 0 on the masked entries and q 0 where the student is -inf
    q = torch.softmax(s.double() / tau, -1)
    both = torch.isfinite(s) & torch.isfinite(te)
    target = torch.where(both, (1 - t) * s.double() / tau + t * te.double().nan_to_num(neginf=0.0) / tau,
                         torch.tensor(float("-inf"), dtype=torch.float64))
    p = torch.softmax(target, -1)
    torch.testing.assert_close(x.grad.double(), tau * (q - p) / 3, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(x.grad[:, [2, 7]]) == 0


def test_reference_rows_default_temperature_is_one() -> None:
    s, te = logits(4, 9, seed=42), logits(4, 9, seed=43)
    rows = L.reference_divergence_rows(s, te, kind="forward_kl")
    torch.testing.assert_close(rows.double(), hand_rows(s, te, "forward_kl", 1.0), rtol=1e-5, atol=1e-7)
    with pytest.raises(InputError, match="unknown logit loss kind"):
        L.reference_divergence_rows(s, te, kind="kl")


# -- the wrappers pass every argument through --------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_wrappers_pass_every_argument(name: str) -> None:
    """labels with a custom ignore_index, a padded teacher vocabulary (vocab_size) and a vocab_mask, at
    tau != 1, against float64 on the kept rows and columns; errors name the function; use_kernel reaches
    the dispatch (forcing the kernel on CPU without the interpreter is an error, not a silent fallback)."""
    fn, kw = LOGIT_FNS[name]
    s, te = logits(6, 20, seed=44), logits(6, 26, seed=45)
    te[:, 20:] = 30.0  # pad columns: must be sliced off
    labels = torch.tensor([3, 7, 7, 1, 7, 0])  # 7 is the ignored label here
    vm = torch.ones(20, dtype=torch.bool)
    vm[[5, 13]] = False
    x = s.clone().requires_grad_()
    loss = fn(x, te, temperature=1.7, labels=labels, ignore_index=7, vocab_size=20, vocab_mask=vm, **kw)
    loss.backward()
    rows, cols = labels != 7, vm.nonzero().squeeze(1)
    x64 = s[rows][:, cols].double().requires_grad_()
    ref = hand_rows(x64, te[rows][:, cols].double(), name, 1.7, **kw).mean() * 1.7**2
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(x.grad[rows][:, cols].double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert torch.count_nonzero(x.grad[~rows]) == 0 and torch.count_nonzero(x.grad[:, [5, 13]]) == 0
    where = "taid" if name == "taid" else name
    with pytest.raises(InputError, match=rf"^{where}: temperature"):
        fn(s, te[:, :20], temperature=-1.0, **kw)
    with pytest.raises(InputError, match=rf"^{where}: student vocabulary"):
        fn(s, te, **kw)
    with pytest.raises(InputError, match=rf"^{where}: vocab_mask"):
        fn(s, te[:, :20], vocab_mask=vm[:10], **kw)
    if not interpreter_enabled():
        with pytest.raises(InputError, match=rf"^{where}: use_kernel=True"):
            fn(s, te[:, :20], use_kernel=True, **kw)


def test_taid_object_passes_every_argument() -> None:
    s, te = logits(5, 14, seed=46), logits(5, 16, seed=47)
    labels = torch.tensor([0, 9, 2, 3, 9])
    vm = torch.ones(14, dtype=torch.bool)
    vm[3] = False
    obj = L.TAID(t_start=0.3)
    args = dict(temperature=1.3, labels=labels, ignore_index=9, vocab_size=14, vocab_mask=vm)
    assert obj(s, te, **args).item() == pytest.approx(L.taid(s, te, t=0.3, **args).item(), rel=1e-6)
    keep = labels != 9
    cols = vm.nonzero().squeeze(1)
    ref = hand_rows(s[keep][:, cols], te[keep][:, cols], "taid", 1.3, t=0.3).mean() * 1.3**2
    assert obj(s, te, **args).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(InputError, match="^taid: temperature"):
        obj(s, te[:, :14], temperature=0.0)
    if not interpreter_enabled():
        with pytest.raises(InputError, match="use_kernel=True"):
            obj(s, te[:, :14], use_kernel=True)


def test_default_coefficients() -> None:
    """beta 0.5, alpha 0.1, t 0.4, temperature 1 when not given."""
    s, te = logits(4, 11, seed=48), logits(4, 11, seed=49)
    cases = [(L.jsd, "jsd", {"beta": 0.5}), (L.skew_kl, "skew_kl", {"alpha": 0.1}),
             (L.skew_reverse_kl, "skew_reverse_kl", {"alpha": 0.1}), (L.taid, "taid", {"t": 0.4}),
             (L.forward_kl, "forward_kl", {}), (L.reverse_kl, "reverse_kl", {})]
    for fn, name, kw in cases:
        ref = hand_rows(s, te, name, 1.0, **kw).mean()
        assert fn(s, te).item() == pytest.approx(ref.item(), rel=1e-5), name


# -- boundaries of the arguments --------------------------------------------------------------------------
def test_argument_boundaries() -> None:
    s, te = logits(3, 8, seed=50), logits(3, 8, seed=51)
    # vocab_size: 1 is a valid (one-column) vocabulary, 0 is not
    assert L.forward_kl(s, te, vocab_size=1).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(InputError, match="vocab_size=0"):
        L.forward_kl(s, te, vocab_size=0)
    # either side not floating point
    with pytest.raises(InputError, match="floating point"):
        L.forward_kl(s.long(), te)
    with pytest.raises(InputError, match="floating point"):
        L.forward_kl(s, te.long())
    # a single row given as a 1-D vector is a batch of one
    assert L.reverse_kl(s[0], te[0]).item() == pytest.approx(L.reverse_kl(s[:1], te[:1]).item(), rel=1e-6)
    # vocab_mask: 1-D only, at least V long; any integer 0/1 tensor works like a bool one
    with pytest.raises(InputError, match="vocab_mask"):
        L.forward_kl(s, te, vocab_mask=torch.ones(8, 1, dtype=torch.bool))
    with pytest.raises(InputError, match="vocab_mask"):
        L.forward_kl(s, te, vocab_mask=torch.ones(7, dtype=torch.bool))
    vm = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1])
    assert L.forward_kl(s, te, vocab_mask=vm).item() == pytest.approx(
        L.forward_kl(s, te, vocab_mask=vm.bool()).item(), rel=1e-6)
    # coefficients: jsd's beta in [0, 1], the skew losses' alpha in [0, 1), taid's t in [0, 1]
    with pytest.raises(InputError, match=r"^skew_reverse_kl: alpha must lie in \[0, 1\)"):
        L.skew_reverse_kl(s, te, alpha=1.0)
    with pytest.raises(InputError, match=r"^skew_kl: alpha must lie in \[0, 1\)"):
        L.skew_kl(s, te, alpha=1.0)
    with pytest.raises(InputError, match=r"^jsd: beta must lie in \[0, 1\]"):
        L.jsd(s, te, beta=-0.1)
    with pytest.raises(InputError, match=r"^taid: t must lie in \[0, 1\]"):
        L.taid(s, te, t=1.01)
    # one valid row: its own divergence, not half of it
    one = torch.tensor([-100, 4, -100])
    assert L.jsd(s, te, labels=one).item() == pytest.approx(hand_rows(s[1:2], te[1:2], "jsd", 1.0, beta=0.5).item(),
                                                            rel=1e-5)


def test_dispatch_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default dispatch takes the kernel only for CUDA tensors, even where the kernel could run on CPU
    (the interpreter); use_kernel=True takes it when usable and says what is missing otherwise."""
    x = torch.zeros(2, 3)
    monkeypatch.setattr(L, "kernel_usable", lambda *t: True)
    monkeypatch.setattr(L, "triton_installed", lambda: True)
    assert L._want_kernel(None, "w", x, x) is False
    assert L._want_kernel(True, "w", x, x) is True
    assert L._want_kernel(False, "w", x, x) is False
    monkeypatch.setattr(L, "triton_installed", lambda: False)
    with pytest.raises(InputError, match=r"^w: use_kernel=True needs triton"):
        L._want_kernel(True, "w", x)
    monkeypatch.setattr(L, "triton_installed", lambda: True)
    monkeypatch.setattr(L, "kernel_usable", lambda *t: False)
    with pytest.raises(InputError, match=r"^w: use_kernel=True needs CUDA tensors"):
        L._want_kernel(True, "w", x)


def test_kernel_valid_count() -> None:
    """The kernels' divisor: the row count without labels, else the valid labels (at least 1) as a
    one-element float32 tensor."""
    assert L._kernel_valid_count(None, 7, -100) == 7.0
    got = L._kernel_valid_count(torch.tensor([1, -100, 3, 5]), 4, -100)
    assert isinstance(got, torch.Tensor) and got.shape == (1,) and got.dtype == torch.float32 and got.item() == 3.0
    assert L._kernel_valid_count(torch.tensor([-100, -100]), 2, -100).item() == 1.0
    assert L._kernel_valid_count(torch.tensor([0, 5, 5]), 3, 5).item() == 1.0


# -- TAID's schedule, step by step --------------------------------------------------------------------------
def test_taid_t_follows_the_update_rule_exactly() -> None:
    losses = [4.0, 3.0, 3.5, 2.0, 1.0, 1.2, 0.5, 0.4, 0.39, 0.3]
    kw = dict(t_start=0.2, t_end=0.9, momentum=0.5, step_size=0.3, total_steps=6)
    obj = L.TAID(**kw)
    got = [obj.step(torch.tensor(v)) for v in losses]
    assert got == pytest.approx(taid_t_sequence(losses, **kw), rel=1e-12)
    assert got[-1] == 0.9 and got[0] > 0.2
    # without total_steps there is no floor above t_start; rising losses slow t down
    free = dict(t_start=0.4, t_end=1.0, momentum=0.9, step_size=0.05, total_steps=None)
    rising = [1.0 + 0.5 * i for i in range(8)]
    obj2 = L.TAID(**free)
    assert [obj2.step(v) for v in rising] == pytest.approx(taid_t_sequence(rising, **free), rel=1e-12)
    # the linear ramp itself, inside and past total_steps
    ramp = L.TAID(t_start=0.2, t_end=0.6, total_steps=4)
    assert [ramp.linear_t(n) for n in (0, 1, 4, 9)] == pytest.approx([0.2, 0.3, 0.6, 0.6])
    assert L.TAID(t_start=0.3).linear_t(100) == 0.3


def test_taid_resumes_from_its_state() -> None:
    losses = [2.0, 1.5, 1.6, 1.0, 0.8, 0.9]
    full = L.TAID(step_size=0.2, momentum=0.6, total_steps=20)
    ts = [full.step(v) for v in losses]
    part = L.TAID(step_size=0.2, momentum=0.6, total_steps=20)
    for v in losses[:3]:
        part.step(v)
    resumed = L.TAID(step_size=0.2, momentum=0.6, total_steps=20)
    resumed.load_state_dict(part.state_dict())
    assert resumed.steps == 3 and resumed.prev_loss == 1.6
    assert [resumed.step(v) for v in losses[3:]] == pytest.approx(ts[3:], rel=1e-12)
    fresh = L.TAID(step_size=0.2)
    fresh.load_state_dict(L.TAID(step_size=0.2).state_dict())  # prev_loss None round-trips
    assert fresh.prev_loss is None and fresh.step(1.0) == L.TAID(step_size=0.2).step(1.0)


def test_taid_default_step_size() -> None:
    """The paper's 5e-4: from t = 0.4 the first step (no previous loss, momentum 0) moves t by
    5e-4 * sigmoid(0) * 0.6."""
    assert L.TAID().step(1.0) == pytest.approx(0.4 + 5e-4 * 0.5 * 0.6, rel=1e-12)


def test_taid_constructor_boundaries() -> None:
    L.TAID(t_start=0.5, t_end=0.5)  # a constant t
    L.TAID(t_start=0.0, t_end=1.0, momentum=0.0, step_size=0.0, total_steps=1)
    for bad, field in [(dict(t_end=1.5), "need 0 <= t_start"), (dict(momentum=1.0), "momentum"), (dict(momentum=1.5), "momentum"),
                       (dict(step_size=-0.1), "step_size"), (dict(total_steps=0), "total_steps")]:
        with pytest.raises(InputError, match=f"^TAID: {field}"):
            L.TAID(**bad)


# -- fused_linear_kd on its PyTorch path ------------------------------------------------------------------
def _fused_reference(h: torch.Tensor, w: torch.Tensor, t_logits: torch.Tensor, name: str, tau: float,
                     labels: torch.Tensor | None, ignore: int, vocab: int, masked: list[int],
                     **kw: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The LM-head loss in float64: logits = h W[:vocab]^T, the rows whose label is not ignored, the columns
    not masked; returns the loss and its gradients wrt h and W (autograd in float64)."""
    h64 = h.detach().double().reshape(-1, h.shape[-1]).requires_grad_()
    w64 = w.detach().double().requires_grad_()
    s = h64 @ w64[:vocab].t()
    tl = t_logits.double().reshape(-1, t_logits.shape[-1])[:, :vocab]
    rows = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore
    cols = [c for c in range(vocab) if c not in masked]
    loss = hand_rows(s[rows][:, cols], tl[rows][:, cols], name, tau, **kw).mean() * tau**2
    loss.backward()
    return loss.item(), h64.grad.reshape(h.shape), w64.grad


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"])
@pytest.mark.parametrize("teacher_as", ["logits", "pair"])
def test_fused_linear_kd_reference_path_against_float64(name: str, teacher_as: str) -> None:
    """[2, 5, D] hidden states (the leading dims are kept), a student head padded past the shared vocabulary
    and a teacher padded further, ignored rows under a custom ignore_index, masked columns, tau != 1: the loss
    and the gradients wrt the hidden states and the head weight equal float64 (the pad rows of the head get
    0)."""
    g = torch.Generator().manual_seed(60)
    vocab, d_s, d_t = 30, 8, 12
    h = torch.randn(2, 5, d_s, generator=g)
    w = torch.randn(vocab + 3, d_s, generator=g) * 0.7
    ht, wt = torch.randn(2, 5, d_t, generator=g), torch.randn(vocab + 6, d_t, generator=g) * 0.7
    t_logits = ht @ wt.t()
    teacher = t_logits if teacher_as == "logits" else (ht, wt)
    labels = torch.tensor([[1, 2, 0, 3, 0], [4, 5, 6, 0, 7]])  # 0 = ignored here
    masked = [2, 17, 29]
    vm = torch.ones(vocab + 3, dtype=torch.bool)
    vm[masked] = False
    kw = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.25}, "skew_reverse_kl": {"alpha": 0.15},
          "taid": {"t": 0.6}}.get(name, {})
    args = {"beta": 0.3} if name == "jsd" else {"alpha": kw["alpha"]} if "alpha" in kw else \
        {"taid_t": 0.6} if name == "taid" else {}
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = L.fused_linear_kd(hh, ww, teacher, kind=name, temperature=1.6, labels=labels, ignore_index=0,
                             vocab_size=vocab, vocab_mask=vm, use_kernel=False, **args)
    loss.backward()
    ref, gh, gw = _fused_reference(h, w, t_logits, name, 1.6, labels, 0, vocab, masked, **kw)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    torch.testing.assert_close(hh.grad.double(), gh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ww.grad[:vocab].double(), gw[:vocab], rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(ww.grad[vocab:]) == 0 and torch.count_nonzero(hh.grad[labels == 0]) == 0


def test_fused_linear_kd_defaults_and_dtypes() -> None:
    """Defaults: forward KL at tau 1 over every row (and beta 0.5, alpha 0.1, taid_t 0.4 for their kinds);
    bf16 hidden states with an fp32 head (and the reverse) run on the PyTorch path."""
    g = torch.Generator().manual_seed(61)
    h, w = torch.randn(7, 6, generator=g), torch.randn(10, 6, generator=g)
    t_logits = torch.randn(7, 10, generator=g) * 2
    for kind, name, kw in [("forward_kl", "forward_kl", {}), ("jsd", "jsd", {"beta": 0.5}),
                           ("skew_kl", "skew_kl", {"alpha": 0.1}), ("skew_reverse_kl", "skew_reverse_kl", {"alpha": 0.1}),
                           ("taid", "taid", {"t": 0.4})]:
        got = L.fused_linear_kd(h, w, t_logits, kind=kind) if kind != "forward_kl" else L.fused_linear_kd(h, w, t_logits)
        ref, _, _ = _fused_reference(h, w, t_logits, name, 1.0, None, -100, 10, [], **kw)
        assert got.item() == pytest.approx(ref, rel=1e-5), kind
    hb = h.to(torch.bfloat16).requires_grad_()
    wf = w.clone().requires_grad_()
    mixed = L.fused_linear_kd(hb, wf, t_logits, kind="reverse_kl", use_kernel=False)
    mixed.backward()
    ref, _, _ = _fused_reference(hb.float(), w.to(torch.bfloat16).float(), t_logits, "reverse_kl", 1.0, None, -100, 10, [])
    assert mixed.item() == pytest.approx(ref, rel=2e-2)
    assert hb.grad.dtype == torch.bfloat16 and wf.grad.dtype == torch.float32
    teacher_mixed = L.fused_linear_kd(h, w, (h.to(torch.bfloat16), w.float()), use_kernel=False)
    assert teacher_mixed.item() == pytest.approx(0.0, abs=1e-2)  # the same head on bf16-rounded states


def test_fused_linear_kd_rejects_bad_shapes_and_options() -> None:
    h, w = torch.randn(2, 3, 4), torch.randn(9, 4)
    t_logits = torch.randn(2, 3, 9)
    ht, wt = torch.randn(2, 3, 5), torch.randn(9, 5)
    cases = [
        (dict(head_weight_s=w[:, :, None]), "head_weight_s"),  # 3-D head whose dim 1 matches D
        (dict(head_weight_s=torch.randn(9, 5)), "head_weight_s"),
        (dict(teacher=torch.randn(2, 4, 9)), "teacher logits"),
        (dict(teacher=(ht, wt, wt)), "teacher must be logits or a pair"),
        (dict(teacher=(torch.randn(2, 4, 5), wt)), "teacher hidden"),  # rows differ, head fine
        (dict(teacher=(ht, wt[:, :, None])), "teacher hidden"),  # 3-D head whose dim 1 matches
        (dict(teacher=(ht, torch.randn(9, 6))), "teacher hidden"),
        (dict(labels=torch.zeros(6, dtype=torch.long)), "labels"),
        (dict(strategy="cols"), "strategy"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(taid_t=1.5, kind="taid"), "taid_t must lie"),
        (dict(kind="kl"), "unknown logit loss kind"),
        (dict(temperature=0.0), "temperature"),
        (dict(vocab_size=10), "vocab_size=10"),
        (dict(teacher=torch.randn(2, 3, 11)), "student vocabulary 9 != teacher vocabulary 11"),
        (dict(vocab_mask=torch.ones(5, dtype=torch.bool)), "vocab_mask"),
    ]
    if not interpreter_enabled():
        cases.append((dict(use_kernel=True), "use_kernel=True"))
    for change, match in cases:
        args = dict(hidden_s=h, head_weight_s=w, teacher=t_logits) | change
        hid, head, teach = args.pop("hidden_s"), args.pop("head_weight_s"), args.pop("teacher")
        with pytest.raises(InputError, match=f"^fused_linear_kd: {match}"):
            L.fused_linear_kd(hid, head, teach, **args)
    for strategy in ("auto", "vocab", "rows"):  # every valid strategy and the smallest chunk are accepted
        assert torch.isfinite(L.fused_linear_kd(h, w, t_logits, strategy=strategy, chunk_size=1))
    # taid_t = 1 is allowed: the target is the teacher, the loss forward KL
    assert L.fused_linear_kd(h, w, t_logits, kind="taid", taid_t=1.0).item() == pytest.approx(
        L.fused_linear_kd(h, w, t_logits).item(), rel=1e-6)


# -- cross-entropy -------------------------------------------------------------------------------------------
def test_cross_entropy_options() -> None:
    x = logits(2, 3, 12, seed=62)
    y = torch.tensor([[1, 4, -1], [-1, 9, 2]])
    pad = torch.cat([x, torch.full((2, 3, 4), 50.0)], -1)  # pad columns that would dominate
    ref = F.cross_entropy(x.reshape(-1, 12), y.reshape(-1), ignore_index=-1, label_smoothing=0.2)
    got = L.cross_entropy(pad, y, ignore_index=-1, vocab_size=12, label_smoothing=0.2)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    one = torch.full((2, 3), -100)
    one[1, 1] = 3
    assert L.cross_entropy(x, one).item() == pytest.approx(F.cross_entropy(x[1, 1:2], one[1, 1:2]).item(), rel=1e-6)


# -- hidden states, attention, relations ---------------------------------------------------------------------
def test_projector_and_filter_construction() -> None:
    proj = L.HiddenProjector(8, 12)
    assert proj.student_dim == 8 and proj.teacher_dim == 12 and proj.proj.bias is not None
    assert L.HiddenProjector(8, 12, bias=False).proj.bias is None
    assert isinstance(L.HiddenProjector(12, 12, always_linear=True).proj, torch.nn.Linear)
    ted = L.TaskAwareFilter(8, 12, filter_dim=6)
    assert ted.student_filter.out_features == 6 and ted.teacher_filter.out_features == 6
    assert ted.student_filter.bias is not None and ted.teacher_filter.bias is not None
    no_bias = L.TaskAwareFilter(8, 12, bias=False)
    assert no_bias.student_filter.out_features == 12
    assert no_bias.student_filter.bias is None and no_bias.teacher_filter.bias is None
    hs, ht = torch.randn(2, 4, 8), torch.randn(2, 4, 12)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    with torch.no_grad():
        expect = ((ted.student_filter(hs) - ted.teacher_filter(ht)) ** 2).mean(-1)[mask.bool()].mean()
        assert ted(hs, ht, attention_mask=mask).item() == pytest.approx(expect.item(), rel=1e-6)


def test_hidden_cosine_default_eps_on_small_states() -> None:
    """States of norm ~1e-3: the default eps (1e-8) leaves the cosine alone."""
    torch.manual_seed(63)
    hs, ht = torch.randn(2, 3, 5) * 1e-3, torch.randn(2, 3, 5) * 1e-3
    s, t = hs.double(), ht.double()
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    assert L.hidden_cosine(hs, ht).item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)


def test_attention_kl_with_heads_not_equal_to_length_and_no_mask() -> None:
    """H = 2 heads over T = 5 tokens (H != T): per-head KL against float64; no mask = every token valid."""
    g = torch.Generator().manual_seed(64)
    a_s = torch.softmax(torch.randn(2, 2, 5, 5, generator=g) * 2, -1)
    a_t = torch.softmax(torch.randn(2, 2, 5, 5, generator=g) * 2, -1)
    s, t = a_s.double(), a_t.double()
    expect = (t * (t.log() - s.log())).sum(-1).mean()
    assert L.attention_kl(a_s, a_t).item() == pytest.approx(expect.item(), rel=1e-5)
    assert L.attention_kl(a_s, a_t, torch.ones(2, 5, dtype=torch.long)).item() == pytest.approx(expect.item(), rel=1e-6)
    with pytest.raises(InputError, match=r"^attention_kl: attention probabilities must be \[B, H, T, T\]"):
        L.attention_kl(a_s[:, 0], a_t)
    with pytest.raises(InputError, match=r"^attention_kl: attention probabilities must be \[B, H, T, T\]"):
        L.attention_kl(a_s, a_t[:, 0])


def test_minilm_relation_kl_heads_and_shapes() -> None:
    g = torch.Generator().manual_seed(65)
    qkv_s = [torch.randn(2, 4, 24, generator=g) * 3 for _ in range(3)]
    qkv_t = [torch.randn(2, 4, 36, generator=g) * 3 for _ in range(3)]
    ones = torch.ones(2, 4, dtype=torch.long)
    # default: 12 relation heads; no mask = every token valid
    assert L.minilm_relation_kl(*qkv_s, *qkv_t).item() == pytest.approx(
        relation_kl_float64(qkv_s, qkv_t, ones, 12), rel=1e-4)
    small_s, small_t = [x / 12 for x in qkv_s], [x / 12 for x in qkv_t]  # one wide head: keep it off one-hot
    one_head = relation_kl_float64(small_s, small_t, ones, 1)
    assert one_head > 1e-3
    assert L.minilm_relation_kl(*small_s, *small_t, num_relation_heads=1).item() == pytest.approx(one_head, rel=1e-5)
    with pytest.raises(InputError, match="^minilm_relation_kl: num_relation_heads must be positive"):
        L.minilm_relation_kl(*qkv_s, *qkv_t, num_relation_heads=0)
    short = [qkv_s[0], qkv_s[1][:, :3], qkv_s[2]]  # one student tensor with a different T
    with pytest.raises(InputError, match=r"^minilm_relation_kl: every Q/K/V must share \[B, T\]"):
        L.minilm_relation_kl(*short, *qkv_t)
    with pytest.raises(InputError, match=r"^minilm_relation_kl: every Q/K/V must share \[B, T\]"):
        L.minilm_relation_kl(*qkv_s, qkv_t[0], qkv_t[1][:, :3], qkv_t[2])


def test_errors_name_the_loss_and_hint_the_projector() -> None:
    """Every hidden / attention / relation error starts with the loss's name; a width mismatch alone suggests
    the projector with both widths, a mismatch of the leading dimensions does not."""
    hs, ht = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    for fn, name in ((L.hidden_mse, "hidden_mse"), (L.hidden_cosine, "hidden_cosine"),
                     (lambda a, b, **k: L.attention_output_mse(a, b, **k), "attention_output_mse")):
        with pytest.raises(InputError, match=rf"^{name}: student \(2, 3, 8\) and teacher \(2, 3, 12\) shapes differ; "
                                             r"pass proj=HiddenProjector\(8, 12\)$"):
            fn(hs, ht)
        with pytest.raises(InputError, match=rf"^{name}: student \(2, 3, 12\) and teacher \(2, 4, 12\) shapes differ$"):
            fn(ht, torch.randn(2, 4, 12))
        with pytest.raises(InputError, match=rf"^{name}: attention_mask \(2, 4\) must have shape \(2, 3\)"):
            fn(ht, ht, attention_mask=torch.ones(2, 4))
    a = torch.softmax(torch.randn(2, 2, 3, 3), -1)
    with pytest.raises(InputError, match=r"^attention_kl: attention_mask"):
        L.attention_kl(a, a, torch.ones(2, 4))
    with pytest.raises(InputError, match=r"^attention_kl: student \(2, 2, 3, 3\) and teacher \(2, 2, 4, 4\)"):
        L.attention_kl(a, torch.softmax(torch.randn(2, 2, 4, 4), -1))
    qkv = [torch.randn(2, 3, 8) for _ in range(3)]
    with pytest.raises(InputError, match=r"^minilm_relation_kl: attention_mask"):
        L.minilm_relation_kl(*qkv, *qkv, attention_mask=torch.ones(2, 4), num_relation_heads=2)
    with pytest.raises(InputError, match=r"^minilm_relation_kl: Q/K/V must be .* got \(2, 3\)$"):
        L.minilm_relation_kl(qkv[0][..., 0], *qkv[1:], *qkv, num_relation_heads=2)
    with pytest.raises(InputError, match=r"^minilm_relation_kl: Q/K/V must be"):
        L.minilm_relation_kl(*qkv, qkv[0][..., 0], *qkv[1:], num_relation_heads=2)
    wide = [torch.randn(2, 3, 9) for _ in range(3)]
    with pytest.raises(InputError, match=r"^minilm_relation_kl: hidden size 9 is not divisible"):
        L.minilm_relation_kl(*wide, *qkv, num_relation_heads=2)
    with pytest.raises(InputError, match=r"^minilm_relation_kl: hidden size 9 is not divisible"):
        L.minilm_relation_kl(*qkv, *wide, num_relation_heads=2)
