"""The decoder path through `compress run` and `compress generate`: a tiny LLaMA (GQA) from a config file with the
shipped tweet tokenizer, export with the KV cache, ptq dynamic + int4, evaluate with the decoder stats and
gates; then generation from the output folder, and the bad inputs (exit 2, one line)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from conftest import one_line_error, sentiment_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **ptq) -> Path:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_jsonl(data / "train.jsonl", sentiment_rows(64, seed=1))
        write_jsonl(data / "eval.jsonl", sentiment_rows(24, seed=2))
    (tmp_path / "llama.yaml").write_text(
        "model_type: llama\nhidden_size: 64\nintermediate_size: 128\nnum_hidden_layers: 2\nnum_attention_heads: 4\n"
        "num_key_value_heads: 2\nmax_position_embeddings: 48\n")
    cfg = {
        "name": "tiny-decoder",
        "model": {"path": "config:llama.yaml", "tokenizer": str(REPO / "configs/tiny-llama-tokenizer"),
                  "task": "causal-lm", "max_length": 16},
        "data": {"train": {"path": str(data / "train.jsonl"), "label": None},
                 "eval": {"path": str(data / "eval.jsonl"), "label": None}},
        "passes": [{"type": "export", "cache": True, "parity_tokens": 12},
                   {"type": "ptq", "methods": ["dynamic", "int4"], "primary": "int4",
                    "int4": {"block_size": 32, **ptq}},
                   {"type": "evaluate", "batch_size": 8}],
        "gates": {"max_perplexity_increase": 0.5, "min_top1_agreement": 0.5},
        "target": {"seq_len": 8, "threads": 1, "warmup": 1, "runs": 3},
        "output": str(tmp_path / "out"),
    }
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("decoder-run")
    assert main(["run", str(_config(tmp)), "-q"]) == 0
    return tmp


def test_run_exports_quantizes_and_measures(run_dir):
    out = run_dir / "out"
    report = json.loads((out / "report.json").read_text())
    export = next(p for p in report["passes"] if p["label"] == "export")
    assert export["metrics"]["cache"] is True and export["metrics"]["generation_token_agreement"] == 1.0
    variants = report["evaluation"]["variants"]
    assert set(variants) >= {"fp32", "int8-dynamic", "int4-weight-only", "int4"}
    assert variants["int4"]["alias_of"] == "int4-weight-only"
    for name in ("fp32", "int8-dynamic", "int4-weight-only"):
        s = variants[name]
        assert s["prefill_ms"] > 0 and s["decode_tokens_per_s"] > 0 and s["perplexity"] > 1
    for name in ("int8-dynamic", "int4-weight-only"):
        assert 0.5 < variants[name]["top1_agreement_fp32"] <= 1
        assert abs(variants[name]["perplexity_increase"]) < 0.5
    assert variants["int4"]["size_mb"] < variants["int8-dynamic"]["size_mb"] < variants["fp32"]["size_mb"]
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["max_perplexity_increase"]["passed"] and gates["min_top1_agreement"]["passed"]
    assert gates["min_top1_agreement"]["variant"] == "int4"
    assert (out / "student.int4.onnx").is_file() and (out / "model" / "tokenizer.json").is_file()


def test_generate_cli(run_dir, capsys):
    out = run_dir / "out"
    capsys.readouterr()
    assert main(["generate", str(out), "the movie was", "--max-new-tokens", "6"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", str(out), "the movie was", "--max-new-tokens", "6", "--sample", "--seed", "3",
                 "--temperature", "2"]) == 0
    a = capsys.readouterr().out
    assert main(["generate", str(out), "the movie was", "--max-new-tokens", "6", "--sample", "--seed", "3",
                 "--temperature", "2"]) == 0
    assert capsys.readouterr().out == a  # seeded sampling repeats
    assert main(["generate", str(out), "the movie was", "--variant", "fp32", "--max-new-tokens", "6"]) == 0
    assert greedy.strip() or a.strip()


def test_generate_prompt_longer_than_positions(run_dir, capsys):
    capsys.readouterr()
    assert main(["generate", str(run_dir / "out"), " ".join(["movie"] * 60)]) == 2
    line = one_line_error(capsys)
    assert "exceed the model's 48 positions" in line and "shorten the prompt" in line


def test_generate_bad_folder(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "hi"]) == 2
    assert "not found" in one_line_error(capsys)


def test_bad_int4_block_size_exits_2(run_dir, capsys):
    """Same export (cached), block 128 on hidden 64: one line naming the field."""
    capsys.readouterr()
    assert main(["run", str(_config(run_dir, block_size=128)), "-q"]) == 2
    line = one_line_error(capsys)
    assert "ptq.int4.block_size: 128 does not divide the input dimension 64" in line


def test_cache_export_of_a_family_without_cache_exits_2(tmp_path, tiny_bert_dir, capsys):
    write_jsonl(tmp_path / "t.jsonl", sentiment_rows(8))
    cfg = {"name": "bert-cache", "model": {"path": str(tiny_bert_dir), "task": "causal-lm", "max_length": 16},
           "data": {"train": {"path": str(tmp_path / "t.jsonl"), "label": None}},
           "passes": [{"type": "export", "cache": True}], "output": str(tmp_path / "out")}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "m.yaml"), "-q"]) == 2
    assert "model family 'bert' has no KV-cache export" in one_line_error(capsys)
