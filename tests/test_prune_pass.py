"""The prune pass through `compress run` on a tiny 4-layer BERT: one-shot importance pruning followed by
distillation (cached on rerun), learned masks with vocabulary trimming, the report's per-layer plot, and bad
input (exit 2, one line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.conftest import make_config, one_line_error, save_tiny_bert


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), 4, seed=1, intermediate_size=64)


def _write(tmp_path: Path, model_dir: Path, data: Path, passes: list[dict], task: str = "sequence-classification") -> Path:
    return make_config(tmp_path, model_dir, data, passes, name="prune",
                       model={"path": str(model_dir), "task": task, "max_length": 16},
                       target={"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3})


def _report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "report.json").read_text())


FINETUNE = {"type": "finetune", "steps": 4, "batch_size": 16, "lr": 1e-3}


def test_taylor_prune_then_distill_cached(tmp_path, bert4_dir, data_dir):
    from transformers import AutoModelForSequenceClassification

    from compress.models import get_adapter

    passes = [FINETUNE,
              {"type": "prune", "method": "taylor", "granularities": ["heads", "ffn", "hidden"],
               "target": {"fraction": 0.7}, "scope": "global", "calibration_examples": 32},
              {"type": "distill", "steps": 3, "batch_size": 16, "lr": 1e-3, "weights": {"logit": 1.0, "hidden": 1.0}},
              {"type": "export"}, {"type": "evaluate"}]
    cfg = _write(tmp_path, bert4_dir, data_dir, passes)
    assert main(["run", str(cfg), "-q"]) == 0, _report(tmp_path)["error"]
    rep = _report(tmp_path)
    m = rep["passes"][1]["metrics"]
    assert m["params_after"] <= m["target_params"] == int(0.7 * m["params_before"])
    assert m["params_after"] > 0.6 * m["params_before"]  # the bisection keeps as much as the target allows
    assert m["hidden_after"] < m["hidden_before"] == 32
    assert len(m["kept_per_layer"]) == 4 and all(set(k) == {"heads", "kv_heads", "ffn"} for k in m["kept_per_layer"])
    # distill trained the pruned model: the saved student has the pruned sizes, and so has the evaluated ONNX
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert get_adapter(student).hidden_size == m["hidden_after"]
    assert rep["evaluation"]["variants"]["fp32"]["params"] == m["params_after"]
    assert (tmp_path / "out" / "pruning-prune.png").is_file()
    # a rerun takes every pass from the cache
    assert main(["run", str(cfg), "-q"]) == 0
    assert {p["label"]: p["status"] for p in _report(tmp_path)["passes"]} == {
        "finetune": "cached", "prune": "cached", "distill": "cached", "export": "cached", "evaluate": "cached"}


def test_activation_method_through_the_pass(tmp_path, bert4_dir, data_dir):
    """activation scores (Minitron, from calibration batches) and whole layers by block importance, per layer, to a
    fraction target; the pruned student exports and evaluates."""
    method = "activation"
    passes = [FINETUNE,
              {"type": "prune", "method": method, "granularities": ["layers", "heads", "ffn", "hidden"],
               "target": {"fraction": 0.6}, "scope": "layer", "calibration_examples": 32},
              {"type": "export"}, {"type": "evaluate"}]
    cfg = _write(tmp_path, bert4_dir, data_dir, passes)
    assert main(["run", str(cfg), "-q"]) == 0, _report(tmp_path)["error"]
    rep = _report(tmp_path)
    m = rep["passes"][1]["metrics"]
    assert 0.5 * m["params_before"] < m["params_after"] <= m["target_params"] == int(0.6 * m["params_before"])
    assert m["hidden_after"] < m["hidden_before"]
    assert 1 <= len(m["kept_layers"]) < 4 and len(m["kept_per_layer"]) == len(m["kept_layers"])  # block importance
    assert rep["evaluation"]["variants"]["fp32"]["params"] == m["params_after"]


def test_learned_masks_with_vocab_trimming(tmp_path, bert4_dir, data_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    passes = [FINETUNE,
              {"type": "prune", "method": "learned", "granularities": ["heads", "ffn", "hidden", "vocab"],
               "target": {"fraction": 0.02}, "steps": 30, "batch_size": 16, "lr": 1e-3, "remap_every": 5},
              {"type": "export"}]
    cfg = _write(tmp_path, bert4_dir, data_dir, passes)
    assert main(["run", str(cfg), "-q"]) == 0, _report(tmp_path)["error"]
    m = _report(tmp_path)["passes"][1]["metrics"]
    # the vocabulary went down to the tokens of the training texts; the masks pruned the rest to the target
    assert m["vocab_after"] == m["vocab_kept"] + 1 < 200 < m["vocab_before"]  # + id K, where dropped tokens go
    assert m["params_after"] <= m["target_params"]
    assert abs(m["params_after"] / m["params_before"] - 0.02) < 0.02 * 0.1
    assert len(m["sparsity_curve"]) == 30 and m["sparsity_curve"][-1]["target"] == pytest.approx(m["target_sparsity"])
    assert {"logit", "hidden", "lagrangian"} <= set(m["term_curves"])
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out" / "model")
    assert student.config.vocab_size == m["vocab_after"] and len(tok("the movie was good")["input_ids"]) == 6


@pytest.mark.parametrize("prune, message", [
    ({"target": {"fraction": 1.0}}, "keeps everything"),
    ({"target": {"fraction": 0.5, "params": 10}}, "exactly one of"),
    ({"target": {"fraction": 0.5}, "vocab": {"fallback": "split"}}, "add 'vocab' to granularities"),
    ({"target": {"fraction": 0.5}, "granularities": ["vocab"], "vocab": {"fallback": "bpe"}}, "fallback"),
])
def test_bad_config_exit_2(tmp_path, bert4_dir, data_dir, capsys, prune, message):
    cfg = _write(tmp_path, bert4_dir, data_dir, [FINETUNE, {"type": "prune", **prune}])
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert message in line and "prune" in line


def test_vocab_on_image_model_exit_2(tmp_path, tiny_vit_dir, capsys):
    cfg = {"name": "vit", "model": {"path": str(tiny_vit_dir), "task": "image-classification"},
           "data": {"train": {"path": str(tmp_path / "x.jsonl")}},
           "passes": [{"type": "prune", "method": "magnitude", "granularities": ["heads", "vocab"],
                       "target": {"fraction": 0.5}}], "output": str(tmp_path / "out")}
    (tmp_path / "x.jsonl").write_text('{"image": "a.png"}\n')
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 2
    line = one_line_error(capsys)
    assert "vocab" in line and "remove 'vocab'" in line


def test_unreachable_targets_exit_2(tmp_path, bert4_dir, data_dir, capsys):
    # heads and FFN alone cannot remove the 30522 x 32 embedding table: 10% of the parameters is out of reach
    cfg = _write(tmp_path, bert4_dir, data_dir, [{"type": "prune", "method": "magnitude", "granularities": ["heads", "ffn"],
                                                  "target": {"fraction": 0.1}}])
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert "cannot be met" in line and "prune" in line
    # a latency below what a 1-layer minimal model measures on the target
    cfg = _write(tmp_path, bert4_dir, data_dir, [{"type": "prune", "method": "magnitude", "granularities": ["heads", "ffn"],
                                                  "target": {"latency_ms": 1e-4}, "latency_precision": "fp32"}])
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert "below the floor" in line and "latency_ms" in line


QAT = {"type": "qat", "steps": 2, "batch_size": 16, "lr": 1e-4, "calibration_examples": 16}


@pytest.mark.parametrize("after", ["distill", "qat-student", "qat-teacher"])
def test_vocab_trimmed_student_keeps_the_teachers_ids(tmp_path, bert4_dir, data_dir, after):
    """After vocabulary trimming the teacher still reads original ids: distill maps the student's ids back, qat
    hands the map on (and maps the ids when the full teacher teaches), and evaluate tokenizes for the teacher with
    its own tokenizer, so the teacher's reference is unchanged."""
    from compress.prune.idmap import load_id_map

    # quality only: no latency rounds, no ORT teacher baselines (the slowest parts of evaluate, not under test here)
    evaluate = {"type": "evaluate", "latency": False, "teacher_baselines": False}
    tail = [{"type": "export"}] + ([] if after == "distill" else [dict(QAT, teacher=after.split("-")[1])])
    prune = {"type": "prune", "method": "magnitude", "granularities": ["vocab"], "target": {"fraction": 0.5}}
    if after == "distill":  # fallback split, a token budget, tokens collected beyond data.train's limit
        prune["vocab"] = {"fallback": "split", "max_tokens": 120, "texts": 10000}
    passes = [FINETUNE, prune, {"type": "distill", "steps": 2, "batch_size": 16, "lr": 1e-3}, *tail, evaluate]
    cfg = _write(tmp_path, bert4_dir, data_dir, passes)
    if after == "distill":
        doc = yaml.safe_load(cfg.read_text())
        doc["data"]["train"]["limit"] = 64
        cfg.write_text(yaml.safe_dump(doc))
    assert main(["run", str(cfg), "-q"]) == 0, _report(tmp_path)["error"]
    trimmed = _report(tmp_path)["evaluation"]
    m = _report(tmp_path)["passes"][1]["metrics"]
    id_map = load_id_map(tmp_path / "out" / "model")
    assert id_map is not None and len(id_map) == m["vocab_after"]
    if after == "distill":  # no shared row; the 120 most frequent tokens, the specials and the character pieces
        assert m["vocab_fallback"] == "split" and m["vocab_after"] == m["vocab_kept"] and m["vocab_texts"] > 64
        assert len(set(id_map.tolist())) == len(id_map)
    else:
        assert m["vocab_fallback"] == "unk" and m["vocab_after"] == m["vocab_kept"] + 1
    cfg = _write(tmp_path, bert4_dir, data_dir, [FINETUNE, {"type": "export"}, evaluate])
    assert main(["run", str(cfg), "-q"]) == 0
    plain = _report(tmp_path)["evaluation"]
    assert trimmed["teacher"]["accuracy"] == plain["teacher"]["accuracy"]
    # the distilled trimmed student agrees with its teacher as a student should (the ids were mapped)
    assert trimmed["variants"]["fp32"]["fidelity"] >= 0.5


@pytest.mark.slow  # nine exports and latency measurements
def test_latency_target_is_met(tmp_path, bert4_dir, data_dir):
    cfg = _write(tmp_path, bert4_dir, data_dir, [
        {"type": "prune", "method": "magnitude", "granularities": ["heads", "ffn", "hidden"],
         "target": {"latency_ms": 1000.0}, "latency_precision": "fp32", "latency_steps": 2}])
    assert main(["run", str(cfg), "-q"]) == 0, _report(tmp_path)["error"]
    m = _report(tmp_path)["passes"][0]["metrics"]
    # a generous target: the unpruned model already meets it, nothing is removed
    assert m["latency_search"][0]["ratio"] == 1.0 and m["latency_search"][0]["p50_ms"] <= 1000.0
    assert m["params_after"] == m["params_before"] and m["latency_floor_ms"] > 0
    # a target between the floor and the full model: the bisection keeps a share that meets it
    goal = (m["latency_floor_ms"] + m["latency_search"][0]["p50_ms"]) / 2
    cfg = _write(tmp_path, bert4_dir, data_dir, [
        {"type": "prune", "method": "magnitude", "granularities": ["heads", "ffn", "hidden"],
         "target": {"latency_ms": goal}, "latency_precision": "fp32", "latency_steps": 3}])
    code = main(["run", str(cfg), "-q"])
    m = _report(tmp_path)["passes"][0]["metrics"]
    if code == 0:  # the measured search found a ratio under the goal (timing noise can make none do so)
        assert m["params_after"] < m["params_before"]
        assert any(h["p50_ms"] <= goal for h in m["latency_search"][1:])
    else:
        assert code == 2 and "was not met" in _report(tmp_path)["error"]
