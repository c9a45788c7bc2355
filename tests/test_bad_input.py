"""Damaged input files through the CLI: exit code 2, one line naming the file, no traceback."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from compress.cli import main
from tests.conftest import make_config, one_line_error


def test_truncated_safetensors_is_bad_input(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cfg = make_config(tmp_path, model, data_dir, passes=[{"type": "export"}])
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert str(weights) in line and "truncated" in line


@pytest.mark.parametrize("content", [b"", b"\x08\x07not a protobuf at all"])
def test_corrupt_onnx_file_is_bad_input(tmp_path: Path, content: bytes, capsys) -> None:
    bad = tmp_path / "student.onnx"
    bad.write_bytes(content)
    assert main(["bench", str(bad), "--runs", "1", "--warmup", "0"]) == 2
    line = one_line_error(capsys)
    assert str(bad) in line and "cannot load" in line


@pytest.mark.parametrize(
    "name,content,expected",
    [
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file is empty"),
        ("empty.csv", b"", "the file is empty"),
        ("empty.parquet", b"", "the file is empty"),
        ("latin1.jsonl", b'{"text": "caf\xe9", "label": "positive"}\n', "not UTF-8 text"),
        ("latin1.csv", b"text,label\ncaf\xe9 au lait,positive\n", "not UTF-8 text"),
        ("garbage.parquet", b"PAR1 these bytes are no parquet file", "cannot read as Parquet"),
    ],
)
def test_bad_data_file_is_bad_input(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path, name: str, content: bytes,
                                    expected: str, capsys) -> None:
    bad = data_dir / name
    bad.write_bytes(content)
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "export"}],
                      data={"eval": {"path": str(bad)}})
    assert main(["run", str(cfg), "-q"]) == 2
    line = one_line_error(capsys)
    assert str(bad) in line and expected in line
