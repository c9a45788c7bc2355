"""The distill pass optimises what its config says. Each test runs the real pass (real tiny transformers
models, real data files) for one step on one batch holding the whole training set, so the first value of
`loss_curve` is the objective of the initial student on that batch; the test recomputes it without the pass,
from the Hugging Face forward (hidden states, Q/K/V through hooks) and the float64 references of
tests/references.py. Dropout is off, so train-mode forwards are deterministic.

Then TAID's t as the pass reports it (the paper's rule, replayed on the loss curve), the OPTIMA reward (the
relative decrease of the held-out reference loss: its sign and its value), and the 8-bit teacher."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from compress.artifact import Artifact
from compress.cli import main
from compress.distill import losses as L
from references import hand_rows, relation_kl_float64
from tests.conftest import minilm_path, save_tiny_bert, sentiment_rows, write_jsonl

TAU = 2.0
N_TRAIN, N_EVAL = 24, 12


@pytest.fixture(scope="module")
def wiring_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("wiring-data")
    write_jsonl(d / "train.jsonl", sentiment_rows(N_TRAIN, seed=1))
    write_jsonl(d / "eval.jsonl", sentiment_rows(N_EVAL, seed=2))
    # texts of 2 to 6 words: right padding in every batch, so that the causal-LM shift matters
    write_jsonl(d / "text.jsonl", [{"text": " ".join(r["text"].split()[: 2 + i % 5])}
                                   for i, r in enumerate(sentiment_rows(N_TRAIN, seed=3))])
    return d


@pytest.fixture(scope="module")
def bert4(tmp_path_factory) -> Path:
    """A dropout-free 4-layer tiny BERT with the MiniLM tokenizer; large initial weights (initializer_range
    0.5, the task head too), so that its logits differ from row to row and from its students' by O(1)."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert4-nodrop"), 4, seed=11, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, initializer_range=0.5)


@pytest.fixture(scope="module")
def gpt2_nodrop(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(12)
    folder = tmp_path_factory.mktemp("gpt2-nodrop")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                               initializer_range=0.5)
                    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_distill(tmp_path: Path, model_dir: Path, data: Path, distill: dict, task: str = "sequence-classification"
                ) -> tuple[dict, list[dict], torch.nn.Module, dict[str, torch.Tensor]]:
    """Run [distill] alone; returns its metrics, its events, the teacher as the pass loaded it, and the whole
    training set as one batch (inputs, and labels for classification)."""
    from transformers import AutoTokenizer

    from compress.models.loading import load_model

    split = {"path": str(data / ("text.jsonl" if task == "causal-lm" else "train.jsonl"))}
    if task == "causal-lm":
        split["label"] = None
    cfg = {
        "name": "wiring", "output": str(tmp_path / "out"),
        "model": {"path": str(model_dir), "task": task, "max_length": 16},
        "data": {"train": split, "eval": {**split, "path": str(data / ("text.jsonl" if task == "causal-lm" else "eval.jsonl"))}},
        "passes": [{"type": "distill", "steps": 1, "batch_size": N_TRAIN, "lr": 1e-3, "temperature": TAU, "seed": 5,
                    **distill}],
        "target": {"threads": 1},
    }
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = main(["run", str(path), "-q"])
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0, rep.get("error")
    cache = tmp_path / "out" / ".cache"
    art = Artifact.load(cache / rep["passes"][0]["cache_key"], cache)
    teacher = load_model(str(art.teacher_dir), task).eval()
    events = next(h for h in art.history if h["label"] == "distill")["events"]
    tok = AutoTokenizer.from_pretrained(art.teacher_dir)
    rows = [json.loads(line) for line in Path(split["path"]).read_text().splitlines()]
    batch = dict(tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"))
    if task == "causal-lm":  # GPT-2 would add token-type embeddings for the WordPiece tokenizer's segment ids
        batch.pop("token_type_ids", None)
    else:
        batch["labels"] = torch.tensor([teacher.config.label2id[r["label"]] for r in rows])
    return rep["passes"][0]["metrics"], events, teacher, batch


def initial_student(teacher: torch.nn.Module, layers: int) -> torch.nn.Module:
    from compress.search.inherit import student_from_teacher

    return student_from_teacher(teacher, layers)[0].train()


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def logit_reference(student: torch.Tensor, teacher: torch.Tensor, kind: str, **kw: float) -> float:
    """tau^2 * mean over rows of the float64 divergence (tests/references.py)."""
    return float(hand_rows(student, teacher, kind, TAU, **kw).mean()) * TAU**2


KINDS = {"forward_kl": {}, "reverse_kl": {}, "jsd": {"beta": 0.5}, "skew_kl": {"alpha": 0.1},
         "skew_reverse_kl": {"alpha": 0.1}, "taid": {"t": 0.4}}


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "skew_reverse_kl", "taid"])
def test_the_chosen_logit_loss_is_the_one_optimised(tmp_path, bert4, wiring_data, kind):
    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "logit_loss": kind, "weights": {"logit": 1.0, "hidden": 0.0}})
    student = initial_student(teacher, 2)
    with torch.no_grad():
        s, t = student(**inputs_of(batch)).logits, teacher(**inputs_of(batch)).logits
    values = {k: logit_reference(s, t, k, **kw) for k, kw in KINDS.items()}
    got = metrics["loss_curve"][0]
    assert got == pytest.approx(values[kind], rel=1e-5)
    others = [k for k in KINDS if abs(values[k] - values[kind]) > 1e-3 * values[kind]]
    assert len(others) >= 4, values  # the other losses give other values: the match above identifies `kind`


def test_hard_label_ce_is_added_with_its_weight(tmp_path, bert4, wiring_data):
    import torch.nn.functional as F

    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "weights": {"logit": 1.0, "ce": 0.5, "hidden": 0.0}})
    student = initial_student(teacher, 2)
    with torch.no_grad():
        s, t = student(**inputs_of(batch)).logits, teacher(**inputs_of(batch)).logits
    ce = float(F.cross_entropy(s.double(), batch["labels"]))
    assert metrics["loss_curve"][0] == pytest.approx(logit_reference(s, t, "forward_kl") + 0.5 * ce, rel=1e-5)


def test_causal_lm_logit_loss_scores_next_token_positions(tmp_path, gpt2_nodrop, wiring_data):
    """Position i predicts token i+1: the positions scored are those whose *next* token is real."""
    metrics, _, teacher, batch = run_distill(tmp_path, gpt2_nodrop, wiring_data, {
        "student_layers": 1, "weights": {"logit": 1.0, "hidden": 0.0}}, task="causal-lm")
    assert (batch["attention_mask"] == 0).any(), "padding makes the shift matter"
    student = initial_student(teacher, 1)
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    scored = batch["attention_mask"][:, 1:].bool()
    expect = logit_reference(s[:, :-1][scored], t[:, :-1][scored], "forward_kl")
    assert metrics["loss_curve"][0] == pytest.approx(expect, rel=1e-5)
    unshifted = batch["attention_mask"][:, :-1].bool()
    assert abs(logit_reference(s[:, :-1][unshifted], t[:, :-1][unshifted], "forward_kl") - expect) > 1e-4 * expect


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [h.double() for h in model(**inputs_of(batch), output_hidden_states=True).hidden_states]


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask.bool()].mean())


def cosine_loss(hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> float:
    cos = (hs * ht).sum(-1) / (hs.norm(dim=-1) * ht.norm(dim=-1))
    return masked_token_mean(1 - cos, mask)


def mse_loss(hs: torch.Tensor, ht: torch.Tensor, mask: torch.Tensor) -> float:
    return masked_token_mean(((hs - ht) ** 2).mean(-1), mask)


def test_cosine_hidden_loss_over_an_explicit_map(tmp_path, bert4, wiring_data):
    pairs = [[1, 1], [2, 3]]
    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "hidden_loss": "cosine", "mapping": {"strategy": "explicit", "pairs": pairs},
        "weights": {"logit": 0.0, "hidden": 1.0}})
    assert metrics["layer_map"] == pairs
    hs, ht = hidden_states(initial_student(teacher, 2), batch), hidden_states(teacher, batch)
    mask = batch["attention_mask"]
    expect = np.mean([cosine_loss(hs[s], ht[t], mask) for s, t in pairs])
    assert metrics["loss_curve"][0] == pytest.approx(expect, rel=1e-5)
    # neither the default map nor the MSE gives that value
    assert abs(np.mean([cosine_loss(hs[s], ht[t], mask) for s, t in [[1, 2], [2, 4]]]) - expect) > 1e-3 * expect
    assert abs(np.mean([mse_loss(hs[s], ht[t], mask) for s, t in pairs]) - expect) > 1e-3 * expect


def test_dynamic_map_picks_the_closest_student_layer_and_is_used(tmp_path, bert4, wiring_data):
    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "mapping": {"strategy": "dynamic", "teacher_layers": [1, 3]},
        "weights": {"logit": 0.0, "hidden": 1.0}})
    pairs = [tuple(p) for p in metrics["layer_map"]]
    assert sorted(t for _, t in pairs) == [1, 3]  # the configured teacher layers
    # the reference batch: the held-out split, read in its (seeded) order; the MSE is a mean over rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = [json.loads(line) for line in (wiring_data / "eval.jsonl").read_text().splitlines()]
    ref = dict(tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"))
    student = initial_student(teacher, 2)
    hs, ht = hidden_states(student, ref), hidden_states(teacher, ref)
    for s, t in pairs:
        errors = [mse_loss(hs[j], ht[t], ref["attention_mask"]) for j in (1, 2)]
        assert s == 1 + int(np.argmin(errors)), (s, t, errors)
    hs, ht = hidden_states(student, batch), hidden_states(teacher, batch)
    expect = np.mean([mse_loss(hs[s], ht[t], batch["attention_mask"]) for s, t in pairs])
    assert metrics["loss_curve"][0] == pytest.approx(expect, rel=1e-5)


def last_layer_qkv(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    attn = model.bert.encoder.layer[-1].attention.self
    out: dict[str, torch.Tensor] = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach()))
             for n in ("query", "key", "value")]
    with torch.no_grad():
        model(**inputs_of(batch))
    for h in hooks:
        h.remove()
    return [out["query"], out["key"], out["value"]]


def test_relation_loss_uses_the_configured_relation_heads(tmp_path, bert4, wiring_data):
    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "relation_heads": 2, "weights": {"logit": 0.0, "hidden": 0.0, "relation": 1.0}})
    student = initial_student(teacher, 2)
    qkv_s, qkv_t = last_layer_qkv(student, batch), last_layer_qkv(teacher, batch)
    mask = batch["attention_mask"]
    expect = relation_kl_float64(qkv_s, qkv_t, mask, 2)
    assert metrics["loss_curve"][0] == pytest.approx(expect, rel=1e-4)
    assert abs(relation_kl_float64(qkv_s, qkv_t, mask, 4) - expect) > 1e-3 * expect  # the default, 4 heads


def test_taid_t_follows_the_paper_rule(tmp_path, bert4, wiring_data):
    """t starts at 0.4, grows every step by the adaptive rule (replayed here on the reported loss curve) and
    never below the linear ramp to 1.0 at the last step of the pass."""
    steps = 4
    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "steps": steps, "logit_loss": "taid", "weights": {"logit": 1.0, "hidden": 0.0}})
    ts = metrics["taid_t"]
    replay = L.TAID(total_steps=steps)
    assert ts == pytest.approx([replay.step(loss) for loss in metrics["loss_curve"]], abs=1e-12)
    assert 0.4 < ts[0] < ts[1] < ts[2] < ts[3] == pytest.approx(1.0)
    # the first step's loss is TAID's at t = t_start
    student = initial_student(teacher, 2)
    with torch.no_grad():
        s, t = student(**inputs_of(batch)).logits, teacher(**inputs_of(batch)).logits
    assert metrics["loss_curve"][0] == pytest.approx(logit_reference(s, t, "taid", t=0.4), rel=1e-5)


def test_optima_reward_is_the_relative_decrease_of_the_reference_loss(tmp_path, bert4, wiring_data):
    metrics, events, teacher, _ = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "steps": 4, "lr": 5e-3, "weights": {"logit": 1.0, "hidden": 1.0},
        "schedule": {"kind": "optima", "modules": 2, "interval": 1, "window": 3}})
    rounds = [e for e in events if e["event"] == "schedule_round"]
    assert len(rounds) == 4
    # the reference loss at the start: the logit loss of the initial student (eval mode) on the held-out rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    rows = [json.loads(line) for line in (wiring_data / "eval.jsonl").read_text().splitlines()]
    ref = dict(tok([r["text"] for r in rows], padding=True, truncation=True, max_length=16, return_tensors="pt"))
    student = initial_student(teacher, 2).eval()
    with torch.no_grad():
        start = logit_reference(student(**ref).logits, teacher(**ref).logits, "forward_kl")
    assert metrics["reference_loss_start"] == pytest.approx(start, rel=1e-5)
    losses = [metrics["reference_loss_start"]] + [r["reference_loss"] for r in rounds]
    for prev, new, r in zip(losses, losses[1:], rounds):
        assert r["reward"] == pytest.approx((prev - new) / prev, rel=1e-9, abs=1e-12)  # a drop is a positive reward
    assert losses[-1] < losses[0], "training on the logit loss lowers it on held-out rows"
    assert sum(r["reward"] for r in rounds) > 0


def test_8bit_teacher_is_quantized(tmp_path, bert4, wiring_data):
    from compress.distill.teacher import prepare_teacher

    metrics, _, teacher, batch = run_distill(tmp_path, bert4, wiring_data, {
        "student_layers": 2, "teacher_quantization": "8bit", "weights": {"logit": 1.0, "hidden": 0.0}})
    student = initial_student(teacher, 2)
    q_teacher = prepare_teacher(copy.deepcopy(teacher), "8bit")
    with torch.no_grad():
        s = student(**inputs_of(batch)).logits
        quantized = logit_reference(s, q_teacher(**inputs_of(batch)).logits, "forward_kl")
        full = logit_reference(s, teacher(**inputs_of(batch)).logits, "forward_kl")
    assert abs(quantized - full) > 1e-4 * full, "int8 rounding moves the teacher's logits"
    assert metrics["loss_curve"][0] == pytest.approx(quantized, rel=1e-6)
