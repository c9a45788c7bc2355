"""The search pass budgets int8 size and latency for what the run's ptq pass will do with the embedding
tables, ptq's `quantize_embeddings: auto` default (on for sentence-embedding students) included
(compress.embed.hooks.ptq_quantizes_embeddings). Tiny random BERTs, real ORT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import save_tiny_bert, sentiment_rows, write_jsonl

from compress.cli import main
from compress.config import load_config
from compress.embed import SentenceSpec, write_st_files
from compress.embed.hooks import ptq_quantizes_embeddings


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    plain = save_tiny_bert(tmp_path_factory.mktemp("plain-bert"), layers=2, seed=3)
    st = save_tiny_bert(tmp_path_factory.mktemp("st-bert"), layers=2, seed=3)
    write_st_files(st, SentenceSpec("mean", True, 32, max_seq_length=64))
    return plain, st


def _config(tmp_path: Path, model: Path, passes: list[dict], out: str = "out") -> Path:
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(32, seed=1))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(24, seed=2))
    cfg = {"name": "emb-search", "model": {"path": str(model), "task": "feature-extraction", "max_length": 16},
           "data": {"train": {"path": "train.jsonl"}, "eval": {"path": "eval.jsonl"},
                    "calibration": {"path": "eval.jsonl"}},
           "passes": passes, "target": {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3},
           "output": str(tmp_path / out)}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("ptq, st, expected", [
    ({}, True, True),                                   # ptq's auto default, sentence-embedding run: on
    ({}, False, False),                                 # auto on a plain feature-extraction folder: off
    ({"quantize_embeddings": "auto"}, False, False),    # spelled out: the string "auto" is not a yes
    ({"quantize_embeddings": "auto"}, True, True),
    ({"quantize_embeddings": False}, True, False),      # an explicit setting wins
    ({"quantize_embeddings": True}, False, True),
    (None, True, False),                                # no ptq pass: nothing is quantized
])
def test_search_reads_what_ptq_will_do_with_embeddings(tmp_path, folders, ptq, st, expected):
    model = folders[1] if st else folders[0]
    passes: list[dict] = [{"type": "export"}]
    if ptq is not None:
        passes.append({"type": "ptq", "methods": ["dynamic"], **ptq})
    run = load_config(_config(tmp_path, model, passes))
    assert ptq_quantizes_embeddings(run, model) is expected


def test_a_searched_student_is_a_sentence_student_again_after_distill(tmp_path, folders):
    search = {"type": "search", "space": {"layers": [1]}}
    ptq = {"type": "ptq", "methods": ["dynamic"]}
    plain_after_search = load_config(_config(tmp_path, folders[1], [search, {"type": "export"}, ptq]))
    assert ptq_quantizes_embeddings(plain_after_search, folders[1]) is False  # search saves a plain HF folder
    distilled = load_config(_config(tmp_path, folders[1], [search, {"type": "distill", "steps": 1}, {"type": "export"}, ptq]))
    assert ptq_quantizes_embeddings(distilled, folders[1]) is True


def test_search_size_budget_assumes_ptq_auto_for_a_sentence_student(tmp_path, folders):
    """Through the pass: with ptq's default on a sentence-embedding teacher the search measures the int8 size
    with the embedding table int8 (what ptq then ships, after distill made the searched student a sentence
    student); set to false, the table stays float and the file is several times larger. ptq's setting is part
    of the search pass's cache key (Search.reads_from_run): one output folder, the search runs again."""
    search = {"type": "search", "space": {"layers": [1], "heads": [2], "ffn": [32]}, "iterations": 1,
              "batch_size": 8, "measure_runs": 3, "latency_model": False, "latency_guard": False}
    sizes = {}
    for q in ("auto", False):
        path = _config(tmp_path, folders[1], [
            search, {"type": "distill", "steps": 2, "batch_size": 8}, {"type": "export"},
            {"type": "ptq", "methods": ["dynamic"], "quantize_embeddings": q}],
            out="out")
        assert main(["run", str(path), "-q", "--until", "search"]) == 0  # the passes after it are only read
        rep = json.loads((tmp_path / "out" / "report.json").read_text())
        m = next(p["metrics"] for p in rep["passes"] if p["type"] == "search")
        assert next(p["status"] for p in rep["passes"] if p["type"] == "search") == "ran"
        assert m["quantize_embeddings"] is (q == "auto")
        sizes[q] = m["chosen_size_mb"]
    assert sizes[False] > 2 * sizes["auto"]
