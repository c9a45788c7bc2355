"""The distill pass in the pipeline: a 2-layer student inherited from a 4-layer teacher, every loss family,
the OPTIMA schedule with its report plot, feature extraction and causal LM, and DDP with --nproc 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from tests.conftest import minilm_path, save_tiny_bert, sentiment_rows, write_jsonl


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), 4, seed=1)


def _run(tmp_path: Path, cfg: dict, *extra: str) -> tuple[int, dict]:
    cfg.setdefault("target", {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3})
    cfg.setdefault("output", str(tmp_path / "out"))
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = main(["run", str(path), "-q", *extra])
    return code, json.loads((tmp_path / "out" / "report.json").read_text())


def _cls_config(model_dir: Path, data: Path, distill: dict) -> dict:
    return {
        "name": "kd",
        "model": {"path": str(model_dir), "task": "sequence-classification", "max_length": 16},
        "data": {"train": {"path": str(data / "train.jsonl")}, "eval": {"path": str(data / "eval.jsonl")}},
        "passes": [{"type": "finetune", "steps": 6, "batch_size": 16, "lr": 1e-3},
                   {"type": "distill", **distill}, {"type": "export"}, {"type": "evaluate"}],
    }


def _distill_alone(tmp_path: Path, model_dir: Path, data: Path, distill: dict) -> dict:
    """Run the distill pass alone on the classification data; its metrics."""
    cfg = _cls_config(model_dir, data, distill)
    cfg["passes"] = [cfg["passes"][1]]
    code, rep = _run(tmp_path, cfg)
    assert code == 0, rep["error"]
    return rep["passes"][0]["metrics"]


def test_distill_all_losses_optima(tmp_path, bert4_dir, data_dir):
    distill = {"student_layers": 2, "steps": 8, "batch_size": 16, "lr": 1e-3, "checkpoint_every": 3,
               "weights": {"logit": 1.0, "ce": 0.5, "hidden": 1.0, "attention": 0.5, "attention_output": 0.5,
                           "relation": 0.5},
               "schedule": {"kind": "optima", "modules": 2, "interval": 2, "window": 3}}
    code, rep = _run(tmp_path, _cls_config(bert4_dir, data_dir, distill))
    assert code == 0, rep["error"]
    m = rep["passes"][1]["metrics"]
    assert m["student_layers"] == 2 and m["inherited_layers"] == [2, 4]
    assert m["layer_map"] == [[1, 2], [2, 4]]
    assert m["student_params"] < m["teacher_params"]
    assert len(m["loss_curve"]) == 8 and all(v == v for v in m["loss_curve"])  # no NaN
    rounds = [e for e in rep_events(tmp_path) if e["event"] == "schedule_round"]
    assert len(rounds) == 4 and all(r["arms"][0] in (0, 1) for r in rounds)
    assert (tmp_path / "out" / "schedule-distill.png").is_file()
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    # the evaluated ONNX student is the distilled one: 2 layers, so fewer parameters than the teacher
    ev = rep["evaluation"]
    assert ev["variants"]["fp32"]["params"] == m["student_params"] < ev["teacher"]["params"]


def rep_events(tmp_path: Path) -> list[dict]:
    cache = tmp_path / "out" / ".cache"
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    art = json.loads((cache / rep["passes"][1]["cache_key"] / "artifact.json").read_text())
    return next(h for h in art["history"] if h["label"] == "distill")["events"]


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid"])
def test_distill_logit_losses(tmp_path, tiny_bert_dir, data_dir, loss):
    distill = {"student_layers": 1, "steps": 3, "batch_size": 16, "logit_loss": loss,
               "weights": {"logit": 1.0, "hidden": 0.0}}
    cfg = _cls_config(tiny_bert_dir, data_dir, distill)
    cfg["passes"] = cfg["passes"][:2]
    code, rep = _run(tmp_path, cfg)
    assert code == 0, rep["error"]
    curve = rep["passes"][1]["metrics"]["loss_curve"]
    assert len(curve) == 3 and all(0 <= v < 10 for v in curve)


def test_taid_adapts_from_the_logit_term_not_the_total(tmp_path, tiny_bert_dir, data_dir):
    """With hidden and CE terms on, TAID's t replays exactly from the logit term's curve (the paper's
    distillation loss); the hook hands TAID the logit term, not the total loss."""
    from compress.distill.losses import TAID

    distill = {"student_layers": 1, "steps": 5, "batch_size": 16, "lr": 1e-3, "logit_loss": "taid",
               "weights": {"logit": 1.0, "hidden": 1.0, "ce": 0.5}}
    m = _distill_alone(tmp_path, tiny_bert_dir, data_dir, distill)
    assert sorted(m["term_curves"]) == ["ce", "hidden", "logit"]
    logit = m["term_curves"]["logit"]
    total = [v + m["term_curves"]["hidden"][i] + 0.5 * m["term_curves"]["ce"][i] for i, v in enumerate(logit)]
    assert total == pytest.approx(m["loss_curve"], rel=1e-6)
    from_logit = TAID(total_steps=5)
    assert m["taid_t"] == [from_logit.step(v) for v in logit]
    assert m["taid_t"][-1] == pytest.approx(1.0) and m["taid_t"][0] > 0.4
    # over 5 steps the linear floor sets t whatever the loss; TAID's own state shows which loss it read
    from compress.distill.objective import DistillObjective, ObjectiveConfig
    from compress.distill.schedule import ScheduleConfig, make_scheduler
    from compress.distill.teacher import prepare_teacher
    from compress.passes.distill import _DistillHook
    from compress.search.inherit import student_from_teacher
    from compress.train.trainer import StepOutput
    from transformers import AutoModelForSequenceClassification

    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    student = student_from_teacher(teacher, 1)[0]
    objective = DistillObjective(student, prepare_teacher(teacher), ObjectiveConfig(logit_loss="taid"),
                                 task="sequence-classification")
    hook = _DistillHook(objective, make_scheduler(ScheduleConfig(kind="uniform", modules=1), 1), None, optima=False)
    for step, (logit_term, loss) in enumerate([(0.8, 5.0), (0.4, 4.9)], start=1):
        hook.on_step_end(step, StepOutput(loss=torch.tensor(loss),
                                          terms={"logit": logit_term, "hidden": loss - logit_term}))
    replay = TAID()
    assert hook.taid_t == [replay.step(0.8), replay.step(0.4)]
    assert objective.taid.state_dict() == replay.state_dict()
    # the relative decrease of the logit term (0.8 -> 0.4: 0.5), not of the total (5.0 -> 4.9: 0.02)
    assert objective.taid.prev_loss == 0.4 and objective.taid.m == pytest.approx(0.01 * 0.5, rel=1e-6)


def test_distill_feature_extraction_and_causal_lm(tmp_path, bert4_dir, tiny_gpt2_dir):
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(32)])
    unlabeled = {"path": str(tmp_path / "text.jsonl"), "label": None}
    code, rep = _run(tmp_path / "fe" if (tmp_path / "fe").mkdir() is None else tmp_path, {
        "name": "fe", "output": str(tmp_path / "fe" / "out"),
        "model": {"path": str(bert4_dir), "task": "feature-extraction", "max_length": 16},
        "data": {"train": unlabeled, "eval": unlabeled},
        "passes": [{"type": "distill", "student_layers": 2, "steps": 4, "batch_size": 8, "lr": 1e-3,
                    "weights": {"embedding": 1.0, "hidden": 1.0, "relation": 0.5}}],
    })
    assert code == 0, rep["error"]
    assert rep["passes"][0]["metrics"]["student_layers"] == 2
    (tmp_path / "lm").mkdir()
    code, rep = _run(tmp_path / "lm", {
        "name": "lm",
        "model": {"path": str(tiny_gpt2_dir), "task": "causal-lm", "max_length": 16},
        "data": {"train": unlabeled, "eval": unlabeled},
        "passes": [{"type": "distill", "student_layers": 1, "steps": 4, "batch_size": 8, "lr": 1e-3,
                    "logit_loss": "jsd", "weights": {"logit": 1.0, "ce": 0.5, "hidden": 1.0, "attention": 0.5}},
                   {"type": "export"}, {"type": "evaluate", "max_examples": 8}],
    })
    assert code == 0, rep["error"]
    # a 1-layer student of a random LM, after 4 steps, still predicts close to uniformly over the 30522 tokens
    assert 0.5 * 30522 < rep["evaluation"]["variants"]["fp32"]["perplexity"] < 2 * 30522


def test_distill_ddp_two_processes_matches_one(tmp_path, data_dir):
    """Same global batch in 1 and 2 processes gives the same training (dropout off: per-rank RNG streams differ)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(2)
    tiny_bert_dir = tmp_path / "nodrop"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         classifier_dropout=0.0)).save_pretrained(tiny_bert_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tiny_bert_dir)
    distill = {"student_layers": 1, "steps": 3, "batch_size": 8, "lr": 1e-3, "weights": {"logit": 1.0, "hidden": 1.0}}
    results = {}
    for nproc in (1, 2):
        cfg = _cls_config(tiny_bert_dir, data_dir, dict(distill))
        cfg["passes"] = [cfg["passes"][1]]
        cfg["output"] = str(tmp_path / f"out{nproc}")
        path = tmp_path / f"m{nproc}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        assert main(["run", str(path), "-q", "--nproc", str(nproc)]) == 0
        rep = json.loads((tmp_path / f"out{nproc}" / "report.json").read_text())
        results[nproc] = rep["passes"][0]["metrics"]
    assert results[2]["nproc"] == 2
    # exact up to float summation order; Adam turns the rounding noise of zero-gradient parameters (BERT's key
    # bias) into steps of size lr, so later steps agree to ~1% (tests/test_trainer.py checks 1e-7 on a bias-free model)
    assert results[1]["loss_curve"][:2] == pytest.approx(results[2]["loss_curve"][:2], rel=1e-4, abs=1e-6)
    assert results[1]["loss_curve"] == pytest.approx(results[2]["loss_curve"], rel=3e-2)
    from transformers import AutoModelForSequenceClassification

    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out1" / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out2" / "model").state_dict()
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    assert max(diffs.values()) < 3 * 1e-3 + 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:4]  # <= lr per Adam step


def test_distill_teacher_cache_ted_and_8bit_teacher(tmp_path, tiny_bert_dir, data_dir):
    distill = {"student_layers": 1, "epochs": 2, "batch_size": 32, "lr": 1e-3, "teacher_cache": True,
               "hidden_loss": "ted", "teacher_quantization": "8bit",
               "weights": {"logit": 1.0, "hidden": 1.0, "attention": 0.5}}
    m = _distill_alone(tmp_path, tiny_bert_dir, data_dir, distill)
    assert m["steps"] == 6  # 96 rows / 32 = 3 batches an epoch
    assert m["teacher_cache_misses"] == 3 and m["teacher_cache_hits"] == 3
    assert all(v == v and v < 50 for v in m["loss_curve"])


def test_explicit_seed_is_honoured(tmp_path, tiny_bert_dir, data_dir):
    curves = {}
    for name, extra in (("default", {}), ("seed7", {"seed": 7}), ("seed7-again", {"seed": 7})):
        distill = {"student_layers": 1, "steps": 3, "batch_size": 16, "lr": 1e-3, **extra}
        (tmp_path / name).mkdir()
        curves[name] = _distill_alone(tmp_path / name, tiny_bert_dir, data_dir, distill)["loss_curve"]
    assert curves["seed7"] == curves["seed7-again"]
    assert curves["seed7"] != curves["default"]


def test_fused_lm_head_matches_logits_path(tmp_path, tiny_gpt2_dir):
    """Causal LM: the logit loss through the LM heads (no student logits built on the kernel path) trains the
    same as the plain logits path."""
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(32)])
    unlabeled = {"path": str(tmp_path / "text.jsonl"), "label": None}
    curves = {}
    for fused in (False, True):
        (tmp_path / str(fused)).mkdir()
        code, rep = _run(tmp_path / str(fused), {
            "name": "lm", "model": {"path": str(tiny_gpt2_dir), "task": "causal-lm", "max_length": 16},
            "data": {"train": unlabeled, "eval": unlabeled},
            "passes": [{"type": "distill", "student_layers": 1, "steps": 4, "batch_size": 8, "lr": 1e-3,
                        "seed": 3, "logit_loss": "jsd", "fused_lm_head": fused,
                        "weights": {"logit": 1.0, "hidden": 1.0}}],
        })
        assert code == 0, rep["error"]
        curves[fused] = rep["passes"][0]["metrics"]["loss_curve"]
        m = rep["passes"][0]["metrics"]
        assert m.get("fused_lm_head_steps", 0) == (4 if fused else 0)
        assert m.get("fused_lm_head_kernel_steps", 0) == 0  # no GPU and no interpreter: the reference path
        assert (m["train_device"], m["autocast"], m["process_group"]) == ("cpu", None, None)
    assert curves[True] == pytest.approx(curves[False], rel=1e-4)


def test_fused_lm_head_config_errors(tmp_path, tiny_bert_dir, data_dir, capsys):
    cfg = _cls_config(tiny_bert_dir, data_dir, {"fused_lm_head": True, "steps": 1})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    assert "fused_lm_head: only causal-lm" in capsys.readouterr().err


def test_differently_padded_vocabularies(tmp_path, tiny_gpt2_dir, capsys):
    """Teacher vocab padded to 30528, student's 30522 (its own padding): the logit loss runs on the shared
    30522 real tokens, both on the logits path and through the LM heads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.passes.base import Pass
    from compress.registry import register, unregister

    teacher_dir = tmp_path / "teacher"
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    teacher.resize_token_embeddings(30528)
    teacher.save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(teacher_dir)

    class ShrinkVocab(Pass):
        type = "test-shrink-vocab"

        def run(self, artifact, ctx):
            model = ctx.load_student(artifact)
            model.resize_token_embeddings(30522)
            return artifact.replace(model_dir=ctx.save_student(model, ctx.load_preprocessor(artifact)))

    register(ShrinkVocab)
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(16)])
    unlabeled = {"path": str(tmp_path / "text.jsonl"), "label": None}
    try:
        cases = ((False, {}, 0, 1), (True, {}, 0, 1), (False, {"vocab_size": 30525}, 2, 1),
                 (False, {"vocab_size": 30525}, 2, 2))  # bad input inside torchrun children is still exit 2
        for fused, extra, expect, nproc in cases:
            run_dir = tmp_path / f"run-{fused}-{bool(extra)}-{nproc}"
            run_dir.mkdir()
            code, rep = _run(run_dir, {
                "name": "pad", "model": {"path": str(teacher_dir), "task": "causal-lm", "max_length": 16},
                "data": {"train": unlabeled, "eval": unlabeled},
                "passes": [{"type": "test-shrink-vocab"},
                           {"type": "distill", "steps": 2, "batch_size": 8, "fused_lm_head": fused,
                            "weights": {"logit": 1.0, "hidden": 0.0}, **extra}],
            }, "--nproc", str(nproc))
            assert code == expect, rep["error"]
            if expect == 0:
                assert all(0 <= v < 20 for v in rep["passes"][1]["metrics"]["loss_curve"])
            else:
                assert "vocab_size=30525 must be in 1..30522" in capsys.readouterr().err
    finally:
        unregister("test-shrink-vocab")
