"""The qat pass end to end on the other families: a tiny causal LM (LLaMA, GQA) and a tiny ViT image
classifier, through `compress run` (training with KD, int8 export, parity, evaluation in ORT)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from compress.cli import main
from tests.conftest import minilm_path, sentiment_rows, write_jsonl


def _run(tmp_path: Path, cfg: dict) -> dict:
    path = tmp_path / "model.yaml"
    cfg.setdefault("target", {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3})
    cfg.setdefault("output", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code = main(["run", str(path), "-q"])
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert code == 0, rep.get("error")
    return rep


def _qat_metrics(rep: dict) -> dict:
    return next(p for p in rep["passes"] if p["type"] == "qat")["metrics"]


def test_qat_pass_causal_lm_llama(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path / "llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(48)])
    text = {"path": "text.jsonl", "label": None}
    rep = _run(tmp_path, {
        "name": "lm", "model": {"path": str(folder), "task": "causal-lm", "max_length": 16},
        "data": {"train": text, "eval": text, "calibration": text},
        "passes": [{"type": "qat", "steps": 2, "batch_size": 8, "lr": 1e-4, "calibration_examples": 16,
                    "quantize_qk": True, "quantize_attention_probs": True},
                   {"type": "evaluate", "max_examples": 16}],
    })
    m = _qat_metrics(rep)
    assert m["steps"] == 2 and m["float_weights_left"] == 0 and m["parity_cosine"] >= 0.999
    ev = rep["evaluation"]["variants"]
    assert "int8-qat" in ev and ev["int8-qat"]["size_mb"] < 0.4 * _fp32_mb(tmp_path)


def _fp32_mb(tmp_path: Path) -> float:
    """Size of the tiny LLaMA's float weights in MB (the saved safetensors)."""
    return (tmp_path / "llama" / "model.safetensors").stat().st_size / 2**20


def test_qat_pass_image_classification_vit(tmp_path, tiny_vit_dir):
    digits = {"path": "package:sklearn:digits", "text": None, "image": "image"}
    rep = _run(tmp_path, {
        "name": "digits", "model": {"path": str(tiny_vit_dir), "task": "image-classification"},
        "data": {"train": {**digits, "fraction": [0.0, 0.8], "limit": 64},
                 "eval": {**digits, "fraction": [0.8, 1.0], "limit": 32},
                 "calibration": {**digits, "fraction": [0.0, 0.8], "limit": 16}},
        "passes": [{"type": "finetune", "steps": 2, "batch_size": 16, "lr": 1e-3}, {"type": "export"},
                   {"type": "qat", "steps": 2, "batch_size": 16, "lr": 1e-4, "calibration_examples": 16},
                   {"type": "evaluate"}],
    })
    m = _qat_metrics(rep)
    assert m["steps"] == 2 and m["parity_cosine"] >= 0.999 and m["parity_max_abs_diff"] <= 0.05
    assert m["float_weights_left"] == 1  # the patch embedding's Conv2d: QAT quantizes Linear layers only
    ev = rep["evaluation"]["variants"]
    # a 32-wide model: the graph and the float conv / LayerNorm / position parameters weigh as much as the Linears
    assert {"fp32", "int8-qat"} <= set(ev) and ev["int8-qat"]["size_mb"] < 0.75 * ev["fp32"]["size_mb"]
