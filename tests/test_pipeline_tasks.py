"""The pipeline on the other tasks: causal LM (tiny GPT-2), image classification (tiny ViT on the digits
scikit-learn ships) and feature extraction (tiny BERT), each through export, int8 and evaluation in ORT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.conftest import sentiment_rows, write_jsonl


def _run(tmp_path: Path, cfg: dict) -> dict:
    path = tmp_path / "model.yaml"
    cfg.setdefault("target", {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3})
    cfg.setdefault("output", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["run", str(path), "-q"]) == 0
    return json.loads((tmp_path / "out" / "report.json").read_text())


def test_causal_lm(tmp_path, tiny_gpt2_dir):
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(48)])
    rep = _run(tmp_path, {
        "name": "lm",
        "model": {"path": str(tiny_gpt2_dir), "task": "causal-lm", "max_length": 16},
        "data": {"train": {"path": "text.jsonl", "label": None}, "eval": {"path": "text.jsonl", "label": None}},
        "passes": [{"type": "finetune", "steps": 3, "batch_size": 8, "lr": 1e-3}, {"type": "export"},
                   {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate", "max_examples": 16}],
        # perplexity points (absolute): int8 costs about 0.4 of ~27000, 3.5 with the 7-bit weights of a CPU without VNNI
        "gates": {"max_quality_drop": 10.0},
    })
    ev = rep["evaluation"]
    assert ev["main_metric"] == "perplexity" and ev["higher_is_better"] is False
    fp32 = ev["variants"]["fp32"]
    # the fp32 ONNX student is the teacher itself here: same perplexity, full agreement
    assert abs(fp32["perplexity"] - ev["teacher"]["perplexity"]) / ev["teacher"]["perplexity"] < 1e-3
    assert fp32["fidelity"] > 0.99
    int8, teacher_ppl = ev["variants"]["int8"], ev["teacher"]["perplexity"]
    # a random LM predicts close to uniformly: perplexity near the vocabulary size (30522)
    assert 0.5 * 30522 < teacher_ppl < 1.2 * 30522
    # quality_drop is absolute for perplexity too (config.Gates): student minus teacher, in perplexity points
    assert int8["quality_drop"] == int8["perplexity"] - teacher_ppl
    assert rep["gates"][0]["value"] == int8["quality_drop"] and rep["gates"][0]["passed"] is True
    # and the gate fails below the measured drop (passes from the cache: exit 3, the gate named)
    tight = int8["quality_drop"] / 2
    assert main(["run", str(tmp_path / "model.yaml"), "-q", "--set", f"gates.max_quality_drop={tight!r}"]) == 3
    gate = json.loads((tmp_path / "out" / "report.json").read_text())["gates"][0]
    assert gate["name"] == "max_quality_drop" and gate["passed"] is False


def test_image_classification_digits(tmp_path, tiny_vit_dir):
    rep = _run(tmp_path, {
        "name": "digits",
        "model": {"path": str(tiny_vit_dir), "task": "image-classification"},
        "data": {
            "train": {"path": "package:sklearn:digits", "text": None, "image": "image", "fraction": [0.0, 0.8], "limit": 64},
            "eval": {"path": "package:sklearn:digits", "text": None, "image": "image", "fraction": [0.8, 1.0], "limit": 32},
            "calibration": {"path": "package:sklearn:digits", "text": None, "image": "image", "fraction": [0.0, 0.8],
                            "limit": 16},
        },
        "passes": [{"type": "finetune", "steps": 4, "batch_size": 16, "lr": 1e-3}, {"type": "export"},
                   {"type": "ptq"}, {"type": "evaluate"}],
    })
    ev = rep["evaluation"]
    assert ev["main_metric"] == "accuracy"
    assert set(ev["variants"]) >= {"fp32", "int8-dynamic", "int8-static", "int8"}
    assert ev["variants"]["fp32"]["fidelity"] == 1.0
    assert rep["passes"][1]["metrics"]["parity_max_abs_diff"] < 1e-3
    from transformers import AutoModelForImageClassification

    m = AutoModelForImageClassification.from_pretrained(tmp_path / "out" / "model")
    assert m.config.num_labels == 10
    # `compress bench` makes image inputs of the graph's channels and side (16x16 here, not the default 224)
    from compress.cli import main

    assert main(["bench", str(tmp_path / "out" / "student.int8.onnx"), "--runs", "2", "--warmup", "0", "--json"]) == 0


def test_feature_extraction(tmp_path, tiny_bert_dir):
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(40)])
    rep = _run(tmp_path, {
        "name": "embed",
        "model": {"path": str(tiny_bert_dir), "task": "feature-extraction", "max_length": 16},
        "data": {"eval": {"path": "text.jsonl", "label": None}, "calibration": {"path": "text.jsonl", "label": None}},
        "passes": [{"type": "export"}, {"type": "ptq", "methods": ["dynamic", "static"]}, {"type": "evaluate"}],
        "gates": {"min_fidelity": 0.999},
    })
    ev = rep["evaluation"]
    assert ev["main_metric"] == "retrieval_agreement"
    assert ev["variants"]["fp32"]["cosine"] > 0.9999 and ev["variants"]["fp32"]["retrieval_agreement"] == 1.0
    for variant in ("int8-dynamic", "int8-static"):  # int8 keeps the embeddings of a tiny BERT to > 0.9999
        assert 0.999 < ev["variants"][variant]["cosine"] <= 1.0 + 1e-6, variant
        assert ev["variants"][variant]["retrieval_agreement"] == 1.0, variant
    # the min_fidelity gate fails when the shipped int8 model is one whose cosine is below the limit
    static = ev["variants"]["int8-static"]["fidelity"]
    assert static < 0.99999
    path = tmp_path / "model.yaml"
    assert main(["run", str(path), "-q", "--set", "passes.1.primary=static", "--set", "gates.min_fidelity=0.99999"]) == 3
    gate = json.loads((tmp_path / "out" / "report.json").read_text())["gates"][0]
    assert gate["name"] == "min_fidelity" and gate["passed"] is False and gate["value"] == pytest.approx(static)
    assert rep["gates"][0]["passed"] is True
