"""The PyTorch reference of the distillation losses (compress.distill.losses), against float64 hand
computations and the closed-form gradients of DESIGN.md. Kernel tests live in test_kernels.py."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import losses as L
from compress.errors import InputError
from compress.kernels import interpreter_enabled, triton_installed
from references import LOGIT_FNS, hand_rows, relation_kl_float64

def hand_loss(s: torch.Tensor, teacher: torch.Tensor, name: str, tau: float, labels: torch.Tensor | None,
              **kw: float) -> torch.Tensor:
    rows = hand_rows(s.reshape(-1, s.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), name, tau, **kw)
    valid = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    return rows[valid].sum() / max(int(valid.sum()), 1) * tau**2


def logits(*shape: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_reference_matches_float64_hand_computation(name: str, tau: float) -> None:
    fn, kw = LOGIT_FNS[name]
    s = logits(3, 5, 37, seed=1)
    t = logits(3, 5, 37, seed=2)
    labels = torch.arange(15).reshape(3, 5)
    labels[0, 2] = labels[2, 4] = -100
    x = s.clone().requires_grad_()
    loss = fn(x, t, temperature=tau, labels=labels, use_kernel=False, **kw)
    loss.backward()
    x64 = s.double().requires_grad_()
    ref = hand_loss(x64, t, name, tau, labels, **kw)
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


def test_jsd_endpoints_are_forward_and_reverse_kl() -> None:
    s, t = logits(4, 50, seed=3), logits(4, 50, seed=4)
    assert torch.equal(L.jsd(s, t, beta=0.0, temperature=2.0), L.forward_kl(s, t, temperature=2.0))
    assert torch.equal(L.jsd(s, t, beta=1.0, temperature=2.0), L.reverse_kl(s, t, temperature=2.0))
    # the symmetric JSD is bounded by log 2 per row, KL is not
    mid = L.jsd(s, t, beta=0.5)
    assert 0.0 < mid.item() < math.log(2)
    assert L.forward_kl(s, t).item() > math.log(2)
    # skew losses at alpha = 0 are the plain KLs
    assert torch.equal(L.skew_kl(s, t, alpha=0.0), L.forward_kl(s, t))
    assert torch.equal(L.skew_reverse_kl(s, t, alpha=0.0), L.reverse_kl(s, t))


def test_identical_distributions_give_zero() -> None:
    s = logits(6, 40, seed=5)
    for name, (fn, kw) in LOGIT_FNS.items():
        assert fn(s, s.clone(), **kw).abs().item() < 1e-6, name


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_masked_vocab_is_finite_with_zero_grad(name: str) -> None:
    fn, kw = LOGIT_FNS[name]
    s, t = logits(2, 4, 30, seed=6), logits(2, 4, 30, seed=7)
    masked = [0, 7, 8, 29]
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., masked] = float("-inf")
    t_inf[..., masked] = float("-inf")
    x = s_inf.clone().requires_grad_()
    loss = fn(x, t_inf, temperature=1.5, use_kernel=False, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[..., masked]) == 0
    assert torch.count_nonzero(x.grad) > 0
    # dropping the masked columns changes nothing
    keep = [i for i in range(30) if i not in masked]
    assert loss.item() == pytest.approx(fn(s[..., keep], t[..., keep], temperature=1.5, **kw).item(), rel=1e-5)
    # vocab_mask does the same without writing -inf
    vm = torch.ones(30, dtype=torch.bool)
    vm[masked] = False
    y = s.clone().requires_grad_()
    by_mask = fn(y, t, temperature=1.5, vocab_mask=vm, use_kernel=False, **kw)
    by_mask.backward()
    assert by_mask.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(y.grad, x.grad)


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_ignore_index_rows_are_excluded(name: str) -> None:
    fn, kw = LOGIT_FNS[name]
    s, t = logits(10, 25, seed=8), logits(10, 25, seed=9)
    labels = torch.tensor([1, -100, 3, 4, -100, 6, 7, 8, -100, 2])
    keep = labels != -100
    s_bad = s.clone()
    s_bad[~keep] = float("nan")  # whatever an ignored row holds must not leak
    x = s_bad.clone().requires_grad_()
    loss = fn(x, t, labels=labels, use_kernel=False, **kw)
    loss.backward()
    sub = fn(s[keep], t[keep], **kw)
    assert loss.item() == pytest.approx(sub.item(), rel=1e-6)
    assert torch.count_nonzero(x.grad[~keep]) == 0 and torch.isfinite(x.grad).all()
    # every row ignored: 0, not NaN
    all_ignored = fn(s, t, labels=torch.full((10,), -100), **kw)
    assert all_ignored.item() == 0.0
    # a custom ignore_index
    other = fn(s, t, labels=torch.where(keep, labels, 99), ignore_index=99, **kw)
    assert other.item() == pytest.approx(sub.item(), rel=1e-6)


def closed_form_grad(s: torch.Tensor, t: torch.Tensor, name: str, tau: float, **kw: float) -> torch.Tensor:
    """DESIGN.md's gradient wrt the student logits of tau^2 * mean(divergence)."""
    n = s.shape[0]
    a = torch.log_softmax(s.double() / tau, -1)
    b = torch.log_softmax(t.double() / tau, -1)
    q, p = a.exp(), b.exp()

    def centred(d: torch.Tensor) -> torch.Tensor:
        return q * (d - (q * d).sum(-1, keepdim=True))

    if name == "forward_kl":
        g = q - p
    elif name == "reverse_kl":
        g = centred(a - b)
    elif name == "jsd":
        beta = kw["beta"]
        g = (1 - beta) * centred(a - (beta * p + (1 - beta) * q).log())
    elif name == "skew_kl":
        alpha = kw["alpha"]
        w = (1 - alpha) * q / (alpha * p + (1 - alpha) * q)
        g = -p * w + q * (p * w).sum(-1, keepdim=True)
    elif name == "skew_reverse_kl":
        alpha = kw["alpha"]
        m = (1 - alpha) * p + alpha * q
        g = centred(a - m.log() - alpha * q / m)
    else:
        raise AssertionError(name)
    return g / tau * tau**2 / n


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"])
def test_gradient_matches_design_formula(name: str) -> None:
    fn, kw = LOGIT_FNS[name]
    s, t = logits(7, 33, seed=10), logits(7, 33, seed=11)
    x = s.clone().requires_grad_()
    fn(x, t, temperature=2.0, **kw).backward()
    torch.testing.assert_close(x.grad.double(), closed_form_grad(s, t, name, 2.0, **kw), rtol=1e-4, atol=1e-7)


def test_taid_gradient_treats_target_as_constant() -> None:
    s, t = logits(5, 21, seed=12), logits(5, 21, seed=13)
    x = s.clone().requires_grad_()
    L.taid(x, t, t=0.3, temperature=1.3).backward()
    target = 0.7 * s + 0.3 * t
    torch.testing.assert_close(x.grad.double(), closed_form_grad(s, target, "forward_kl", 1.3), rtol=1e-4, atol=1e-7)
    assert L.taid(s, t, t=1.0).item() == pytest.approx(L.forward_kl(s, t).item(), rel=1e-6)
    assert L.taid(s, t, t=0.0).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_receives_no_gradient_and_bf16_is_upcast() -> None:
    s, t = logits(4, 19, seed=14), logits(4, 19, seed=15)
    tt = t.clone().requires_grad_()
    x = s.to(torch.bfloat16).requires_grad_()
    loss = L.reverse_kl(x, tt)
    loss.backward()
    assert tt.grad is None and x.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref = L.reverse_kl(s.to(torch.bfloat16).float(), t)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def test_different_vocab_padding_is_sliced() -> None:
    s = logits(2, 3, 1000, seed=16)
    t = logits(2, 3, 1024, seed=17)
    t[..., 1000:] = 50.0  # padded columns the teacher's head would have produced: must not matter
    ref = L.forward_kl(s, t[..., :1000].clone())
    assert L.forward_kl(s, t, vocab_size=1000).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(InputError, match="vocab_size"):
        L.forward_kl(s, t)
    with pytest.raises(InputError, match="vocab_size"):
        L.forward_kl(s, t, vocab_size=1024)


def test_bad_arguments_raise_input_error() -> None:
    s, t = logits(2, 9, seed=18), logits(2, 9, seed=19)
    with pytest.raises(InputError, match="temperature"):
        L.forward_kl(s, t, temperature=0.0)
    with pytest.raises(InputError, match="beta"):
        L.jsd(s, t, beta=1.5)
    with pytest.raises(InputError, match="alpha"):
        L.skew_kl(s, t, alpha=1.0)
    with pytest.raises(InputError, match="labels"):
        L.forward_kl(s, t, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match="agree"):
        L.forward_kl(s, t[:1])


@pytest.mark.skipif(not triton_installed() or interpreter_enabled(), reason="needs triton without the interpreter")
def test_forcing_the_kernel_on_cpu_is_a_clear_error() -> None:
    s, t = logits(2, 9, seed=20), logits(2, 9, seed=21)
    with pytest.raises(InputError, match="CUDA"):
        L.forward_kl(s, t, use_kernel=True)
    # the default dispatch on CPU is the reference, no error
    assert torch.isfinite(L.forward_kl(s, t))


def test_fused_linear_kd_reference_equals_materialised_logits() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 4, 16)
    w = torch.randn(60, 16)
    ht, wt = torch.randn(2, 4, 24), torch.randn(64, 24)
    labels = torch.tensor([[1, 2, -100, 3], [4, -100, 5, 6]])
    for kind, kw in [("forward_kl", {}), ("jsd", {"beta": 0.7}), ("skew_reverse_kl", {"alpha": 0.3})]:
        hh = h.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        fused = L.fused_linear_kd(hh, ww, (ht, wt), kind=kind, temperature=2.0, labels=labels, vocab_size=60,
                                  use_kernel=False, **kw)
        fused.backward()
        fn, _ = LOGIT_FNS[kind]
        h2 = h.clone().requires_grad_()
        w2 = w.clone().requires_grad_()
        plain = fn(h2 @ w2.t(), ht @ wt.t(), temperature=2.0, labels=labels, vocab_size=60, **kw)
        plain.backward()
        assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
        torch.testing.assert_close(hh.grad, h2.grad)
        torch.testing.assert_close(ww.grad, w2.grad)
    with pytest.raises(InputError, match="vocab_size"):
        L.fused_linear_kd(h, w, (ht, wt))


def test_taid_schedule_moves_t_up_faster_when_loss_falls() -> None:
    falling, rising = L.TAID(step_size=0.05), L.TAID(step_size=0.05)
    assert falling.t == rising.t == 0.4
    for i in range(20):
        falling.step(1.0 / (1 + i))
        rising.step(1.0 + i)
    assert 0.4 < rising.t < falling.t <= 1.0
    ts = []
    sched = L.TAID(t_start=0.2, t_end=0.9, step_size=0.5, total_steps=10)
    for _ in range(30):
        ts.append(sched.step(torch.tensor(2.0)))
    assert all(b >= a for a, b in zip(ts, ts[1:]))  # monotone
    assert ts[-1] == pytest.approx(0.9)  # capped at t_end
    linear = L.TAID(t_start=0.0, t_end=1.0, total_steps=4, adaptive=False)
    assert [linear.step(1.0) for _ in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert sched.step(float("nan")) == ts[-1]
    assert sched.update(1.0) == pytest.approx(0.9)  # alias of step
    restored = L.TAID()
    restored.load_state_dict(falling.state_dict())
    assert restored.t == falling.t and restored.m == falling.m
    # the loss is the target-interpolated forward KL at the current t
    s, t = logits(3, 11, seed=22), logits(3, 11, seed=23)
    assert falling(s, t).item() == pytest.approx(L.taid(s, t, t=falling.t).item(), rel=1e-6)
    with pytest.raises(InputError, match="t_start"):
        L.TAID(t_start=0.8, t_end=0.5)


def test_cross_entropy_ignores_rows() -> None:
    x = logits(3, 4, 10, seed=24)
    y = torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(0))
    y[1, 1] = -100
    ref = F.cross_entropy(x.reshape(-1, 10), y.reshape(-1), ignore_index=-100)
    assert L.cross_entropy(x, y).item() == pytest.approx(ref.item(), rel=1e-6)
    assert L.cross_entropy(x, torch.full((3, 4), -100)).item() == 0.0


def test_hidden_losses_and_projector() -> None:
    torch.manual_seed(1)
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    proj = L.HiddenProjector(8, 12)
    assert isinstance(proj.proj, torch.nn.Linear)
    assert isinstance(L.HiddenProjector(12, 12).proj, torch.nn.Identity)
    loss = L.hidden_mse(hs, ht, proj, attention_mask=mask)
    sel = mask.bool()
    expect = ((proj(hs) - ht) ** 2).mean(-1)[sel].mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
    with pytest.raises(InputError, match="HiddenProjector"):
        L.hidden_mse(hs, ht)
    same = torch.randn(2, 5, 12)
    assert L.hidden_cosine(same, 3.0 * same).item() == pytest.approx(0.0, abs=1e-6)
    assert L.hidden_cosine(same, -same).item() == pytest.approx(2.0, abs=1e-6)
    # padded tokens do not count
    other = same.clone()
    other[0, 3:] = 100.0
    assert L.hidden_mse(same, other, attention_mask=mask).item() == pytest.approx(0.0, abs=1e-9)
    assert L.attention_output_mse(same, other, mask).item() == pytest.approx(0.0, abs=1e-9)


def test_task_aware_filter_trains_student_side_after_freeze() -> None:
    torch.manual_seed(2)
    ted = L.TaskAwareFilter(8, 12, filter_dim=6)
    ted.freeze_teacher()
    loss = ted(torch.randn(2, 3, 8), torch.randn(2, 3, 12))
    loss.backward()
    assert ted.student_filter.weight.grad is not None and ted.teacher_filter.weight.grad is None
    assert loss.item() > 0


def test_attention_kl() -> None:
    torch.manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    bias = (1 - mask[:, None, None, :].float()) * -1e9

    def probs(h: int) -> torch.Tensor:
        return torch.softmax(torch.randn(2, h, 4, 4) + bias, -1)

    a_t, a_s = probs(4), probs(4)
    assert L.attention_kl(a_t, a_t.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    got = L.attention_kl(a_s, a_t, mask)
    rows = (a_t * (a_t.clamp_min(1e-12).log() - a_s.clamp_min(1e-12).log())).sum(-1)  # [B, H, T]
    expect = rows.permute(0, 2, 1)[mask.bool()].mean()
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    # different head counts: averaged over heads first
    a_s2 = probs(2)
    got2 = L.attention_kl(a_s2, a_t, mask)
    averaged = L.attention_kl(a_s2.mean(1, keepdim=True), a_t.mean(1, keepdim=True), mask)
    assert got2.item() == pytest.approx(averaged.item())
    assert got2.item() > 0


def _bert_qkv(hidden: int, heads: int, seed: int, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Q, K, V ([B, T, hidden]) of the last layer of a tiny random BertModel, captured with hooks."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                 intermediate_size=2 * hidden, max_position_embeddings=32)).eval()
    attn = model.encoder.layer[-1].attention.self
    out: dict[str, torch.Tensor] = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
             for n in ("query", "key", "value")]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return [out["query"], out["key"], out["value"]]


def test_minilm_relation_kl_on_real_bert_qkv() -> None:
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    student = _bert_qkv(32, 4, seed=5, ids=ids, mask=mask)
    teacher = _bert_qkv(48, 6, seed=6, ids=ids, mask=mask)
    assert L.minilm_relation_kl(*teacher, *teacher, attention_mask=mask, num_relation_heads=4).item() == \
        pytest.approx(0.0, abs=1e-6)
    s = [x.clone().requires_grad_() for x in student]
    loss = L.minilm_relation_kl(*s, *teacher, attention_mask=mask, num_relation_heads=4)  # 4 vs 6 heads
    assert loss.item() > 0
    loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s)
    assert all(torch.count_nonzero(x.grad[1, 5:]) == 0 for x in s)  # padded tokens get no gradient
    # padded positions do not change the loss
    poked = [x.clone() for x in student]
    for x in poked:
        x[1, 5:] = 7.0
    again = L.minilm_relation_kl(*poked, *teacher, attention_mask=mask, num_relation_heads=4)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)
    # [B, heads, T, d] input is the same as the concatenation
    q4 = [x.reshape(2, 7, 4, 8).transpose(1, 2) for x in student]
    same = L.minilm_relation_kl(*q4, *teacher, attention_mask=mask, num_relation_heads=4)
    assert same.item() == pytest.approx(loss.item(), rel=1e-6)
    with pytest.raises(InputError, match="divisible"):
        L.minilm_relation_kl(*student, *teacher, attention_mask=mask, num_relation_heads=5)


def test_minilm_relation_kl_matches_float64_formula() -> None:
    """Direction KL(R_T || R_S) and the 1/sqrt(d_r) scaling included: both change the value here."""
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    # scaled up: the random layers' Q/K/V are small, their relations near uniform and the loss ~1e-3
    student = [6.0 * x for x in _bert_qkv(32, 4, seed=5, ids=ids, mask=mask)]
    teacher = [8.0 * x for x in _bert_qkv(48, 6, seed=6, ids=ids, mask=mask)]
    for heads in (2, 4):
        got = L.minilm_relation_kl(*student, *teacher, attention_mask=mask, num_relation_heads=heads).item()
        assert got == pytest.approx(relation_kl_float64(student, teacher, mask, heads), rel=1e-5)
    # the reverse direction and the unscaled scores are far from it: the check above can tell them apart
    ref = relation_kl_float64(student, teacher, mask, 4)
    assert abs(relation_kl_float64(teacher, student, mask, 4) - ref) > 0.05 * ref
    scaled = [x * math.sqrt(8) ** 0.5 for x in student], [x * math.sqrt(12) ** 0.5 for x in teacher]
    assert abs(relation_kl_float64(*scaled, mask, 4) - ref) > 0.05 * ref  # scores without 1/sqrt(d_r)


def test_hidden_cosine_with_a_mask_matches_a_float64_reference() -> None:
    torch.manual_seed(7)
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]])
    proj = L.HiddenProjector(8, 12)
    s, t = proj(hs).detach().double(), ht.double()
    cos = [float((s[b, i] @ t[b, i]) / (s[b, i].norm() * t[b, i].norm()))
           for b in range(2) for i in range(5) if mask[b, i]]
    expect = sum(1 - c for c in cos) / len(cos)
    assert L.hidden_cosine(hs, ht, proj, attention_mask=mask).item() == pytest.approx(expect, rel=1e-6)
    # padded tokens hold anything: the loss does not move
    poked = ht.clone()
    poked[0, 3:] = -ht[0, 3:] * 50
    assert L.hidden_cosine(hs, poked, proj, attention_mask=mask).item() == pytest.approx(expect, rel=1e-6)
    unmasked = sum(1 - float((s[b, i] @ t[b, i]) / (s[b, i].norm() * t[b, i].norm()))
                   for b in range(2) for i in range(5)) / 10
    assert L.hidden_cosine(hs, ht, proj).item() == pytest.approx(unmasked, rel=1e-6)
    assert abs(unmasked - expect) > 1e-3
    one = torch.zeros(2, 5, dtype=torch.long)
    one[1, 2] = 1  # a single valid token: its own loss, not a fraction of it
    single = 1 - float((s[1, 2] @ t[1, 2]) / (s[1, 2].norm() * t[1, 2].norm()))
    assert L.hidden_cosine(hs, ht, proj, attention_mask=one).item() == pytest.approx(single, rel=1e-6)


def test_attention_output_mse_on_non_trivial_inputs() -> None:
    torch.manual_seed(8)
    o_s, o_t = torch.randn(2, 4, 6) * 3, torch.randn(2, 4, 10)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    proj = L.HiddenProjector(6, 10)
    s, t = proj(o_s).detach().double(), o_t.double()
    per_token = [float(((s[b, i] - t[b, i]) ** 2).sum()) / 10 for b in range(2) for i in range(4) if mask[b, i]]
    expect = sum(per_token) / len(per_token)
    x = o_s.clone().requires_grad_()
    got = L.attention_output_mse(x, o_t, mask, proj=proj)
    assert got.item() == pytest.approx(expect, rel=1e-6)
    got.backward()
    assert torch.count_nonzero(x.grad[0, 2:]) == 0 and torch.count_nonzero(x.grad[1, :3]) > 0

