"""The one trainer (compress/train/): optimisation, extra parameter groups (gradient ascent included) and step
hooks, resume, NaN errors, teacher preparation and teacher cache (compress/distill/teacher.py) and
data-parallel training under torchrun."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.distill.teacher import TeacherCache, TeacherConfig, prepare_teacher
from compress.train.distributed import launch_distributed
from compress.train.trainer import ParamGroup, StepHook, StepOutput, TrainConfig, Trainer
from compress.errors import InputError, PassFailed

WORKER_PATH = Path(__file__).parent / "ddp_worker.py"


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["ddp_worker"] = module
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def tiny_bert_cls(seed: int, hidden: int = 32, dropout: float = 0.0, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **kw)
    return BertForSequenceClassification(cfg)


def regression_batches(n_batches: int = 2, rows: int = 8):
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(rows, 4, generator=g), "y": torch.randn(rows, 1, generator=g)} for _ in range(n_batches)]
    return lambda epoch: data


def mse_loss(model: nn.Module, batch: dict, step: int) -> StepOutput:
    loss = F.mse_loss(model(batch["x"]), batch["y"])
    return StepOutput(loss=loss, terms={"mse": float(loss.detach())})


class AfterStep(StepHook):
    """A hook that calls `fn(step, out)` after each optimizer step."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, step, out):
        self.fn(step, out)


def state(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------ optimisation


def test_loss_decreases_on_a_tiny_task():
    """A tiny real BertForSequenceClassification learns whether a sentence holds the word 3 or the word 4."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (128, 8), generator=g)
    labels = torch.arange(128) % 2
    ids[torch.arange(128), torch.randint(1, 8, (128,), generator=g)] = 3 + labels
    ids[:, 0] = 1

    def batches(epoch: int):
        order = torch.randperm(128, generator=torch.Generator().manual_seed(epoch))
        return [{"input_ids": ids[order[i:i + 16]], "labels": labels[order[i:i + 16]]} for i in range(0, 128, 16)]

    def loss_fn(m, batch, step):
        out = m(**batch)
        return StepOutput(loss=out.loss, terms={"task": float(out.loss.detach())})

    model = tiny_bert_cls(0)
    cfg = TrainConfig(epochs=5, lr=3e-3, warmup_ratio=0.1, scheduler="linear", seed=0)
    result = Trainer(model, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None).train()
    curve = result["loss_curve"]
    assert result["steps"] == 40 == len(curve)
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert first > 0.6 and last < 0.7 * first, (first, last)  # chance level is ln 2 = 0.69
    assert result["final_loss"] == curve[-1]
    assert result["resumed_from"] is None


@pytest.mark.parametrize(
    "kind, expected",
    [
        # 20 steps, warm-up ceil(0.1 * 20) = 2 steps; lr of the steps with 0-based index 0, 1, 2, 11, 19
        ("linear", [0.0, 0.5, 1.0, 0.5, 1 / 18]),
        ("cosine", [0.0, 0.5, 1.0, 0.5, 0.5 * (1 + math.cos(math.pi * 17 / 18))]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ],
)
def test_warmup_then_decay(kind: str, expected: list[float]):
    cfg = TrainConfig(steps=20, lr=0.1, warmup_ratio=0.1, scheduler=kind)
    trainer = Trainer(nn.Linear(4, 1), cfg, loss_fn=mse_loss, train_batches=regression_batches(), checkpoint_dir=None)
    assert trainer.warmup_steps == 2
    lrs = trainer.train()["lr_curve"]
    assert len(lrs) == 20
    got = [lrs[i] for i in (0, 1, 2, 11, 19)]
    assert got == pytest.approx([0.1 * e for e in expected], abs=1e-12)


def test_epochs_give_the_number_of_steps():
    # 5 batches per epoch, 2 per step: 1.5 epochs = ceil(7.5 / 2) = 4 steps, reaching into epoch 1
    seen: list[int] = []

    def batches(epoch: int):
        seen.append(epoch)
        return regression_batches(5)(epoch)

    cfg = TrainConfig(epochs=1.5, grad_accum=2, lr=1e-2)
    trainer = Trainer(nn.Linear(4, 1), cfg, loss_fn=mse_loss, train_batches=batches, checkpoint_dir=None)
    assert trainer.total_steps == 4
    assert trainer.train()["steps"] == 4
    assert trainer.epoch == 1 and trainer.batch_in_epoch == 3
    assert TrainConfig(epochs=1.5, steps=9).steps == 9  # steps wins when set


def test_grad_accumulation_matches_a_big_batch():
    """2 micro-batches of 16 with grad_accum=2 give the weights of 1 batch of 32 (bias-free encoder: see ddp_worker)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, worker.VOCAB, (96, 12), generator=g)
    mask = torch.ones_like(ids)
    teacher = prepare_teacher(worker.tiny_model(0, layers=2))
    teacher.classifier.weight.data *= 20

    def run(rows: int, accum: int):
        batches = [{"input_ids": ids[i:i + rows], "attention_mask": mask[i:i + rows]} for i in range(0, 96, rows)]
        student = worker.tiny_model(1, layers=1)
        cfg = TrainConfig(steps=3, grad_accum=accum, lr=3e-3, warmup_ratio=0.0, max_grad_norm=1.0)
        result = Trainer(student, cfg, loss_fn=worker.kd_loss(teacher), train_batches=lambda e: batches,
                         checkpoint_dir=None).train()
        return state(student), result["loss_curve"]

    big, big_curve = run(32, 1)
    small, small_curve = run(16, 2)
    assert max_diff(big, small) < 1e-5
    assert small_curve == pytest.approx(big_curve, rel=1e-5)
    assert max_diff(big, state(worker.tiny_model(1, layers=1))) > 1e-3  # and training moved the weights


def test_gradients_are_clipped():
    """After one AdamW step the first moment is (1 - beta1) * gradient: its norm shows the clipped gradient."""
    x = torch.full((4, 8), 3.0)

    def loss_fn(m, batch, step):
        return StepOutput(loss=(m(batch["x"]) * 1000).mean())

    def first_moment_norm(max_grad_norm: float | None) -> float:
        torch.manual_seed(0)
        model = nn.Linear(8, 2)
        cfg = TrainConfig(steps=1, lr=1e-3, warmup_ratio=0.0, max_grad_norm=max_grad_norm)
        trainer = Trainer(model, cfg, loss_fn=loss_fn, train_batches=lambda e: [{"x": x}], checkpoint_dir=None)
        trainer.train()
        moments = [trainer.optimizer.state[p]["exp_avg"] for p in model.parameters()]
        return float(torch.linalg.vector_norm(torch.cat([m.reshape(-1) for m in moments])))

    # the gradient: d/dW of 1000 * mean over 4 rows and 2 outputs of W x + b is 500 * x_j per entry, 500 per bias
    grad_norm = math.sqrt(2 * 8 * (500 * 3.0) ** 2 + 2 * 500**2)
    assert first_moment_norm(None) == pytest.approx(0.1 * grad_norm, rel=1e-5)
    assert first_moment_norm(0.5) == pytest.approx(0.1 * 0.5, rel=1e-4)


def test_nan_loss_names_the_step_and_the_term():
    model = nn.Linear(4, 1)
    after_step_2: dict[str, torch.Tensor] = {}

    def loss_fn(m, batch, step):
        loss = F.mse_loss(m(batch["x"]), batch["y"])
        kd = float("nan") if step == 3 else float(loss.detach())
        return StepOutput(loss=loss * kd if step == 3 else loss, terms={"kd": kd, "hidden": 0.41})

    def on_step_end(step, out):
        if step == 2:
            after_step_2.update(state(model))

    cfg = TrainConfig(steps=10, lr=1e-2)
    trainer = Trainer(model, cfg, loss_fn=loss_fn, train_batches=regression_batches(), checkpoint_dir=None,
                      hooks=[AfterStep(on_step_end)], label="distill")
    with pytest.raises(PassFailed) as err:
        trainer.train()
    assert str(err.value) == "pass 'distill' failed: loss became nan at step 3 (terms: kd=nan, hidden=0.41)"
    assert err.value.pass_name == "distill" and err.value.exit_code == 1
    assert max_diff(state(model), after_step_2) == 0.0  # the NaN step changed nothing


# ------------------------------------------------------------------------------------------------ groups, hooks


class Multiplier(nn.Module):
    """A Lagrange multiplier: the constraint term `lam * violation` is maximised over lam."""

    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.zeros(()))


def constrained(violation: float = 0.5):
    """Student w (1 weight) fits y = 2x; the constraint term lam * (violation + w^2) pushes w to 0 once lam > 0."""
    student = nn.Linear(1, 1, bias=False)
    nn.init.constant_(student.weight, 1.0)
    mult = Multiplier()
    x = torch.linspace(-1, 1, 8)[:, None]

    def loss_fn(m, batch, step):
        fit = F.mse_loss(m(batch["x"]), 2 * batch["x"])
        c = violation + m.weight.pow(2).sum()
        return StepOutput(loss=fit + mult.lam * c, terms={"fit": float(fit.detach()), "c": float(c.detach())})

    return student, mult, loss_fn, (lambda epoch: [{"x": x}])


@pytest.mark.parametrize("ascent", [True, False])
def test_an_ascent_group_maximises_the_loss_with_its_own_lr(ascent: bool):
    student, mult, loss_fn, batches = constrained()
    cfg = TrainConfig(steps=3, lr=0.01, warmup_ratio=0.0, scheduler="constant", weight_decay=0.0)
    lams, ws = [], []

    def record(step, out):
        lams.append(float(mult.lam.detach()))
        ws.append(float(student.weight.detach()))

    trainer = Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                      param_groups=[ParamGroup("lagrangian", mult, lr=0.1, ascent=ascent)], hooks=[AfterStep(record)])
    trainer.train()
    # d loss / d lam = violation + w^2 > 0: ascent raises lam by lr = 0.1 per Adam step, descent lowers it
    sign = 1.0 if ascent else -1.0
    assert lams == pytest.approx([sign * 0.1, sign * 0.2, sign * 0.3], abs=2e-3)
    # the student descends with the trainer's lr: at the first step lam = 0 and the fit pulls w from 1 towards 2
    assert ws[0] == pytest.approx(1.01, abs=1e-4)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.01, 0.1]


def test_group_settings_schedule_and_errors():
    student, mult, loss_fn, batches = constrained()
    cfg = TrainConfig(steps=4, lr=0.01, warmup_ratio=0.5, scheduler="linear")
    trainer = Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                      param_groups=[ParamGroup("lagrangian", mult, lr=0.1, schedule=False, weight_decay=0.3)])
    student_lr, group_lr = [], []
    trainer.hooks.append(AfterStep(lambda step, out: (student_lr.append(trainer.optimizer.param_groups[0]["lr"]),
                                                      group_lr.append(trainer.optimizer.param_groups[1]["lr"]))))
    trainer.train()
    assert group_lr == [0.1] * 4  # constant: no warm-up, no decay
    assert student_lr == pytest.approx([0.005, 0.01, 0.005, 0.0])  # lr of the next step
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.3

    # a group of parameters inside the student takes them out of the default groups
    student, mult, loss_fn, batches = constrained()
    trainer = Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                      extra_modules={"mult": mult}, param_groups=[ParamGroup("w", [student.weight], lr=0.5)])
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [1, 1]  # lam (no decay), then w
    assert trainer.optimizer.param_groups[1]["params"][0] is student.weight
    with pytest.raises(ValueError, match="outside the student"):
        Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                param_groups=[ParamGroup("lam", [mult.lam])])
    with pytest.raises(ValueError, match="in both 'a' and 'b'"):
        Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                param_groups=[ParamGroup("a", [student.weight]), ParamGroup("b", [student.weight])])
    with pytest.raises(ValueError, match="'student' is taken"):
        Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                param_groups=[ParamGroup("student", mult)])


def test_hooks_run_in_order_and_can_edit_gradients_and_weights():
    student, mult, loss_fn, batches = constrained()
    calls: list[tuple] = []

    class Recorder(StepHook):
        def on_step_start(self, step):
            calls.append(("start", step))

        def on_after_backward(self, step):
            # the summed, unflipped gradient of the loss: d/dlam = violation + w^2 > 0 even for an ascent group
            calls.append(("backward", step, float(mult.lam.grad) > 0))
            student.weight.grad.zero_()  # a pruning pass masks the gradient of removed units like this

        def on_step_end(self, step, out):
            calls.append(("end", step, sorted(out.terms)))
            with torch.no_grad():
                mult.lam.clamp_(max=0.15)  # ... and clamps what it trains (log_alphas, scales)

    cfg = TrainConfig(steps=2, grad_accum=2, lr=0.01, warmup_ratio=0.0, scheduler="constant", weight_decay=0.0)
    trainer = Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=None,
                      param_groups=[ParamGroup("lagrangian", mult, lr=0.1, ascent=True)], hooks=[Recorder()])
    trainer.train()
    assert calls == [("start", 1), ("backward", 1, True), ("end", 1, ["c", "fit"]),
                     ("start", 2), ("backward", 2, True), ("end", 2, ["c", "fit"])]
    assert float(student.weight.detach()) == 1.0  # its gradient was zeroed: Adam left it alone
    assert float(mult.lam.detach()) == pytest.approx(0.15)  # 0.1 then 0.2, clamped


def test_group_module_is_checkpointed_and_resumed(tmp_path: Path):
    def make():
        student, mult, loss_fn, batches = constrained()
        cfg = TrainConfig(steps=4, lr=0.01, warmup_ratio=0.0, scheduler="constant", checkpoint_every=2)
        return student, mult, Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches,
                                      checkpoint_dir=tmp_path, param_groups=[ParamGroup("lagrangian", mult, lr=0.1,
                                                                                         ascent=True)])

    student, mult, trainer = make()
    trainer.hooks.append(AfterStep(lambda step, out: (_ for _ in ()).throw(Interrupted) if step == 3 else None))
    with pytest.raises(Interrupted):
        trainer.train()
    student, mult, trainer = make()
    assert trainer.resumed_from == 2 and float(mult.lam.detach()) == pytest.approx(0.2, abs=2e-3)
    assert trainer.train()["steps"] == 4
    assert float(mult.lam.detach()) == pytest.approx(0.4, abs=2e-3)


# ------------------------------------------------------------------------------------------------ resume


class Counter:
    """Stands for a stateful helper (an OPTIMA scheduler): counts steps; checkpointed through extra_state."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, s: dict) -> None:
        self.n = s["n"]


class Interrupted(Exception):
    pass


def _resumable(ckpt: Path, interrupt_at: int | None = None):
    """Student with dropout, a projection as an extra module, a counter as extra state, and data that shuffles
    per epoch and draws from the global torch RNG while it is iterated (token dropout)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, worker.VOCAB, (16, 12), generator=g)
    teacher = prepare_teacher(worker.tiny_model(0, layers=2))
    student = worker.tiny_model(1, layers=1, dropout=0.1)
    torch.manual_seed(2)
    proj = nn.Linear(32, 32)
    counter = Counter()

    def batches(epoch: int):
        order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 16, 4):
            rows = ids[order[i:i + 4]]
            rows = torch.where(torch.rand(rows.shape) < 0.1, torch.zeros_like(rows), rows)  # global RNG
            yield {"input_ids": rows, "attention_mask": torch.ones_like(rows)}

    kd = worker.kd_loss(teacher)

    def loss_fn(m, batch, step):
        out = kd(m, batch, step)
        with torch.no_grad():
            target = teacher.embed(batch["input_ids"])
        hidden = F.mse_loss(proj(m.embed(batch["input_ids"])), target)
        return StepOutput(loss=out.loss + hidden, terms={**out.terms, "hidden": float(hidden.detach())})

    def on_step_end(step, out):
        counter.n += 1
        if step == interrupt_at:
            raise Interrupted

    # 4 batches per epoch, 2 per step: 7 steps cross three epochs
    cfg = TrainConfig(steps=7, grad_accum=2, lr=3e-3, warmup_ratio=0.2, scheduler="cosine", checkpoint_every=2, seed=4)
    trainer = Trainer(student, cfg, loss_fn=loss_fn, train_batches=batches, checkpoint_dir=ckpt,
                      extra_modules={"proj": proj}, extra_state={"counter": counter},
                      hooks=[AfterStep(on_step_end)])
    return trainer, student, proj, counter


def test_interrupted_then_resumed_run_ends_with_the_same_weights(tmp_path: Path):
    trainer, student, proj, counter = _resumable(tmp_path / "straight")
    straight = trainer.train()
    expected = state(student, proj)

    trainer, *_ = _resumable(tmp_path / "broken", interrupt_at=5)
    with pytest.raises(Interrupted):
        trainer.train()
    assert [p.name for p in (tmp_path / "broken").iterdir()] == ["step-00000004"]

    trainer, student, proj, counter = _resumable(tmp_path / "broken")
    assert trainer.resumed_from == 4 and counter.n == 4
    resumed = trainer.train()
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 7 and counter.n == 7
    got = state(student, proj)
    assert all(torch.equal(got[k], expected[k]) for k in expected), max_diff(got, expected)
    assert resumed["loss_curve"] == straight["loss_curve"] and resumed["lr_curve"] == straight["lr_curve"]
    assert resumed["term_curves"] == straight["term_curves"] and sorted(straight["term_curves"]) == ["hidden", "kd"]
    assert all(len(c) == 7 and None not in c for c in straight["term_curves"].values())
    # one complete checkpoint of the end, nothing temporary left
    assert [p.name for p in (tmp_path / "broken").iterdir()] == ["step-00000007"]

    # a trainer on a finished checkpoint does nothing more
    trainer, student, proj, counter = _resumable(tmp_path / "broken")
    again = trainer.train()
    assert again["steps"] == 7 and again["resumed_from"] == 7
    assert max_diff(state(student, proj), expected) == 0.0


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path):
    cfg = TrainConfig(steps=4, lr=1e-2, checkpoint_every=2)
    Trainer(nn.Linear(4, 1), cfg, loss_fn=mse_loss, train_batches=regression_batches(), checkpoint_dir=tmp_path).train()
    other = cfg.model_copy(update={"lr": 2e-2})
    trainer = Trainer(nn.Linear(4, 1), other, loss_fn=mse_loss, train_batches=regression_batches(),
                      checkpoint_dir=tmp_path)
    assert trainer.resumed_from is None and list(tmp_path.iterdir()) == []
    assert trainer.train()["steps"] == 4
    # checkpoint_every and log_every do not change the trajectory: the checkpoint resumes
    same = other.model_copy(update={"checkpoint_every": 3, "log_every": 1})
    trainer = Trainer(nn.Linear(4, 1), same, loss_fn=mse_loss, train_batches=regression_batches(),
                      checkpoint_dir=tmp_path)
    assert trainer.resumed_from == 4


def test_progress_callback_and_config_errors():
    calls: list[tuple[int, int, str]] = []
    cfg = TrainConfig(steps=3, lr=1e-2)
    Trainer(nn.Linear(4, 1), cfg, loss_fn=mse_loss, train_batches=regression_batches(), checkpoint_dir=None,
            progress=lambda step, total, status: calls.append((step, total, status))).train()
    assert [(s, t) for s, t, _ in calls] == [(1, 3), (2, 3), (3, 3)] and calls[0][2].startswith("loss ")
    from compress.passes.base import Progress  # the pipeline's rich progress (disabled here) also fits

    with Progress(False) as progress:
        result = Trainer(nn.Linear(4, 1), cfg, loss_fn=mse_loss, train_batches=regression_batches(),
                         checkpoint_dir=None, progress=progress, label="finetune").train()
    assert result["steps"] == 3
    with pytest.raises(ValueError):
        TrainConfig(steps=None, epochs=None)
    with pytest.raises(ValueError):
        TrainConfig(bogus=1)
    with pytest.raises(InputError, match="no batches"):
        Trainer(nn.Linear(4, 1), TrainConfig(), loss_fn=mse_loss, train_batches=lambda e: [], checkpoint_dir=None)
    with pytest.raises(InputError, match="nproc"):
        launch_distributed(0, ["x.py"])


# ------------------------------------------------------------------------------------------------ teacher


def test_prepare_teacher_freezes_and_sets_eval():
    teacher = tiny_bert_cls(0, dropout=0.1)
    assert teacher.training
    out = prepare_teacher(teacher, TeacherConfig())
    assert out is teacher
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = teacher(input_ids=ids).logits
    assert not logits.requires_grad
    assert torch.equal(logits, teacher(input_ids=ids).logits)  # eval: no dropout


@pytest.mark.parametrize("mode, hidden_tol, logits_tol", [("8bit", 0.01, 0.05), ("4bit", 0.05, 0.3)])
def test_quantized_teacher_runs_on_cpu_close_to_fp32(mode: str, hidden_tol: float, logits_tol: float):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    ids = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    reference = prepare_teacher(tiny_bert_cls(0, hidden=64))
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)

    teacher = prepare_teacher(tiny_bert_cls(0, hidden=64), TeacherConfig(teacher_quantization=mode))
    kind = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    quantized = [n for n, m in teacher.named_modules() if isinstance(m, kind)]
    assert len(quantized) == 2 * 6 + 1  # per layer Q, K, V, O, up, down; the pooler; not the classifier
    assert type(teacher.classifier) is nn.Linear
    with torch.no_grad():
        got = teacher(input_ids=ids, output_hidden_states=True)
    h, h_ref = got.hidden_states[-1], expected.hidden_states[-1]
    rel = float((h - h_ref).norm() / h_ref.norm())
    assert 0 < rel < hidden_tol, rel  # > 0: the weights really are quantised
    logits_rel = float((got.logits - expected.logits).abs().max() / expected.logits.abs().max())
    assert logits_rel < logits_tol, logits_rel


def test_teacher_cache_hits_on_the_second_epoch(tmp_path: Path):
    teacher = prepare_teacher(tiny_bert_cls(0))
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(1, 100, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(3)]
    calls = 0

    def teacher_fn(batch):
        nonlocal calls
        calls += 1
        return teacher(**batch, output_hidden_states=True)

    cache = TeacherCache(tmp_path / "cache", namespace="teacher-v1")
    first = [cache.cached(teacher_fn, b) for b in batches]
    assert (calls, cache.misses, cache.hits) == (3, 3, 0)
    second = [cache.cached(teacher_fn, b) for b in batches]
    assert (calls, cache.misses, cache.hits) == (3, 3, 3)
    for a, b in zip(first, second):
        assert type(b) is type(a)
        assert torch.equal(a.logits, b.logits)
        assert len(a.hidden_states) == len(b.hidden_states) == 3
        assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
        assert not b.logits.requires_grad
    assert not list((tmp_path / "cache").rglob(".tmp-*"))

    # persisted on disk for a new cache over the same folder; another namespace (teacher) misses
    assert TeacherCache(tmp_path / "cache", namespace="teacher-v1").cached(teacher_fn, batches[0]) is not None
    assert calls == 3
    other = TeacherCache(tmp_path / "cache", namespace="teacher-v2")
    other.cached(teacher_fn, batches[0])
    assert calls == 4 and other.misses == 1
    # a changed batch misses
    changed = {**batches[0], "input_ids": batches[0]["input_ids"].clone()}
    changed["input_ids"][0, 0] += 1
    cache.cached(teacher_fn, changed)
    assert calls == 5
    # plain structures round-trip too
    plain = {"logits": torch.arange(6.0).view(2, 3), "layers": [torch.ones(2), None], "n": 3}
    cache.put("k" * 64, plain)
    back = cache.get("k" * 64)
    assert back.keys() == plain.keys() and back["n"] == 3 and back["layers"][1] is None
    assert torch.equal(back["logits"], plain["logits"]) and torch.equal(back["layers"][0], torch.ones(2))


# ------------------------------------------------------------------------------------------------ distributed


def test_two_processes_under_torchrun_match_one_process(tmp_path: Path):
    """tests/ddp_worker.py under torchrun, 2 CPU processes (gloo), on global batches of 8, 7, 8 and 5 rows,
    ends with the weights of the same training in this process."""
    out = tmp_path / "ddp.pt"
    rc = launch_distributed(2, [str(WORKER_PATH), str(out), str(tmp_path / "ckpt")])
    assert rc == 0
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 2

    single, result = worker.run(tmp_path / "single-ckpt")
    assert max_diff(ddp["state"], single) < 1e-5
    # the extra module trained too, and the parameter no rank used kept its initial value on both sides
    initial = worker.tiny_model(1, layers=1).unused_head.weight
    assert torch.equal(ddp["state"]["unused_head.weight"], initial)
    assert torch.equal(single["unused_head.weight"], initial)
    assert not torch.allclose(ddp["state"]["proj.weight"], worker.initial_projection().weight, atol=1e-4)
    assert ddp["result"]["loss_curve"] == pytest.approx(result["loss_curve"], rel=1e-5)
    assert result["loss_curve"][-1] < result["loss_curve"][0]
    # only rank 0 wrote checkpoints: one complete final one
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-00000006"]


def test_one_process_under_torchrun_trains_in_a_group_of_one(tmp_path: Path):
    """torchrun with one process (how the nccl path is run on a single GPU) joins a process group of one and
    wraps the student in DDP; it trains as the plain process does."""
    out = tmp_path / "ddp1.pt"
    assert launch_distributed(1, [str(WORKER_PATH), str(out), str(tmp_path / "ckpt")]) == 0
    ddp = torch.load(out, weights_only=False)
    assert ddp["world_size"] == 1 and ddp["result"]["ddp"] is True
    single, result = worker.run(tmp_path / "single-ckpt")
    assert max_diff(ddp["state"], single) < 1e-5
    assert ddp["result"]["loss_curve"] == pytest.approx(result["loss_curve"], rel=1e-5)
