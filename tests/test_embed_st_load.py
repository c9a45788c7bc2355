"""The student folder compress writes loads with `SentenceTransformer(path)` (sentence-transformers, a test-only
dependency: compress itself never imports it) and encodes as compress's student does: the distilled student of
a tiny run against its exported ONNX graph (pooling and normalisation inside), and a folder with each pooling
mode and a Dense projection against compress's SentenceEncoder. Tiny random BERTs, real ORT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_bert

from compress.cli import main
from compress.embed import OUTPUT, SentenceEncoder, SentenceSpec, write_st_files
from compress.onnx.runtime import make_session, run_session

st = pytest.importorskip("sentence_transformers")

TEXTS = ["a short one", "a much longer sentence with many more words than the first one has", "mid length text",
         "another tweet about the weather today", "ok"]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_distilled_student_folder_loads_with_sentence_transformers(tmp_path):
    """distill writes the student as a sentence-transformers folder; SentenceTransformer(path).encode gives the
    exported ONNX student's `sentence_embedding` (padded batch), and knows its pooling and normalisation."""
    from test_embed import _embed_cfg
    from transformers import AutoTokenizer

    teacher = save_tiny_bert(tmp_path / "teacher", layers=2, seed=3)
    write_st_files(teacher, SentenceSpec("mean", True, 32, max_seq_length=64))
    path = _embed_cfg(tmp_path, teacher, 24, [
        {"type": "distill", "student_layers": 1, "steps": 2, "batch_size": 8, "lr": 1e-3}, {"type": "export"}])
    assert main(["run", str(path), "-q"]) == 0
    folder = tmp_path / "out" / "model"
    assert (folder / "modules.json").is_file()
    model = st.SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    got = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    enc = dict(AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="np"))
    assert int(enc["attention_mask"].sum(1).min()) < enc["attention_mask"].shape[1]  # padded rows
    ours = run_session(make_session(tmp_path / "out" / "student.onnx"), enc)[OUTPUT]
    assert got.shape == ours.shape == (len(TEXTS), 32)
    assert _cosines(got, ours).min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the Normalize module is there


@pytest.mark.parametrize("mode", ["mean", "cls", "max"])
def test_written_folder_with_projection_encodes_as_compress(tmp_path, mode):
    """write_st_files with each pooling mode and a Dense 32 -> 48: sentence-transformers' encode equals
    compress's SentenceEncoder of the same folder."""
    from transformers import AutoModel, AutoTokenizer

    folder = save_tiny_bert(tmp_path / "m", layers=1, seed=5)
    torch.manual_seed(0)
    write_st_files(folder, SentenceSpec(mode, True, 32, max_seq_length=64), torch.nn.Linear(32, 48))
    assert json.loads((folder / "2_Dense" / "config.json").read_text())["out_features"] == 48
    got = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    ours_model = SentenceEncoder.from_folder(AutoModel.from_pretrained(folder), folder).eval()
    with torch.no_grad():
        ours = ours_model(**dict(AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt"))).numpy()
    assert got.shape == ours.shape == (len(TEXTS), 48)
    assert _cosines(got, ours).min() > 0.9999
