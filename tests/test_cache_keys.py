"""Cache invalidation, end to end through the engine: changing the contents of a data file, of the teacher's
files (same path) or of one pass's config reruns exactly the passes from the first one affected; an
unchanged rerun hits every pass. The passes are small real passes that declare the data splits they read."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from compress.artifact import Artifact
from compress.cli import main
from compress.passes.base import Pass, PassConfig, PassContext
from compress.registry import register, unregister
from tests.conftest import make_config, sentiment_rows, write_jsonl


class StepConfig(PassConfig):
    note: str = ""


class _Step(Pass):
    Config = StepConfig

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        seen = {s: len(ctx.data.records(s)) for s in self.uses_data}
        return artifact.replace(extra=dict(artifact.extra, **{ctx.label: seen}))


class Plain(_Step):
    type = "test-plain"


class ReadsTrain(_Step):
    type = "test-reads-train"
    uses_data = ("train",)


class ReadsEval(_Step):
    type = "test-reads-eval"
    uses_data = ("eval",)


PASSES = [{"type": "test-plain", "name": "a"}, {"type": "test-reads-train", "name": "b"},
          {"type": "test-plain", "name": "c"}, {"type": "test-reads-eval", "name": "d"}]


@pytest.fixture()
def steps():
    for cls in (Plain, ReadsTrain, ReadsEval):
        register(cls)
    yield
    for cls in (Plain, ReadsTrain, ReadsEval):
        unregister(cls.type)


def _statuses(out: Path) -> dict[str, str]:
    return {p["label"]: p["status"] for p in json.loads((out / "report.json").read_text())["passes"]}


def test_contents_of_data_teacher_and_config_invalidate_exactly_downstream(tmp_path, tiny_bert_dir, data_dir, steps):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    cfg = make_config(tmp_path, teacher, data_dir, passes=PASSES)
    out = tmp_path / "out"

    def run(*extra: str) -> dict[str, str]:
        assert main(["run", str(cfg), "-q", *extra]) == 0
        return _statuses(out)

    assert run() == dict.fromkeys("abcd", "ran")
    assert run() == dict.fromkeys("abcd", "cached")
    # the eval file's contents (same path, same number of rows): only d reads it
    rows = sentiment_rows(32, seed=2)
    rows[5]["text"] += " indeed"
    write_jsonl(data_dir / "eval.jsonl", rows)
    assert run() == {"a": "cached", "b": "cached", "c": "cached", "d": "ran"}
    # the train file's contents: b reads it, and c and d come after it
    rows = sentiment_rows(96, seed=1)
    rows[0]["label"] = "negative" if rows[0]["label"] == "positive" else "positive"
    write_jsonl(data_dir / "train.jsonl", rows)
    assert run() == {"a": "cached", "b": "ran", "c": "ran", "d": "ran"}
    assert run() == dict.fromkeys("abcd", "cached")
    # one pass's config: that pass and the ones after it
    assert run("--set", "passes.2.note=x") == {"a": "cached", "b": "cached", "c": "ran", "d": "ran"}
    # the teacher's weights, rewritten in place at the same path: everything
    from transformers import BertModel

    model = BertModel.from_pretrained(teacher)
    with torch.no_grad():
        model.encoder.layer[0].output.dense.bias.add_(0.01)
    model.save_pretrained(teacher)
    assert run("--set", "passes.2.note=x") == dict.fromkeys("abcd", "ran")
    assert run("--set", "passes.2.note=x") == dict.fromkeys("abcd", "cached")


def test_python_teacher_module_contents_invalidate(tmp_path, data_dir, steps, monkeypatch):
    """A `python:module:factory` teacher: editing the module's file (same name) reruns every pass."""
    import sys

    pkg = tmp_path / "site"
    pkg.mkdir()
    src = ("import torch\n"
           "def make():\n"
           "    torch.manual_seed(0)\n"
           "    return torch.nn.Sequential(torch.nn.Linear(4, {n}))\n")
    (pkg / "wiring_teacher.py").write_text(src.format(n=2))
    monkeypatch.syspath_prepend(str(pkg))
    cfg = make_config(tmp_path, Path("unused"), data_dir, passes=PASSES[:2])
    text = cfg.read_text().replace(f"path: unused", "path: python:wiring_teacher:make", 1)
    cfg.write_text(text)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "-q"]) == 0 and _statuses(out) == {"a": "ran", "b": "ran"}
    assert main(["run", str(cfg), "-q"]) == 0 and _statuses(out) == {"a": "cached", "b": "cached"}
    (pkg / "wiring_teacher.py").write_text(src.format(n=30))  # another size: no stale bytecode in the same second
    shutil.rmtree(pkg / "__pycache__", ignore_errors=True)
    sys.modules.pop("wiring_teacher", None)
    importlib.invalidate_caches()
    assert main(["run", str(cfg), "-q"]) == 0 and _statuses(out) == {"a": "ran", "b": "ran"}


def test_hash_path_keys_on_names_places_and_every_byte(tmp_path):
    """The teacher's content hash (`compress.pipeline._hash_path`) on its own: a folder's hash follows each
    file's path inside it and every byte (past the first 1 MiB read too); a single file's, its name and bytes.
    Found by mutation testing: a hash that ignored a single file's bytes, or a file's sub-folder, survived."""
    from compress.pipeline import _hash_path

    def folder(name: str, files: dict[str, bytes]) -> Path:
        root = tmp_path / name
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        return root

    big = bytes(range(256)) * 8192  # 2 MiB: more than one read
    base = {"config.json": b"{}", "sub/a.bin": big}
    ref = _hash_path(folder("ref", base))
    assert _hash_path(folder("same", base)) == ref  # the folder's own name and location do not count
    assert _hash_path(folder("late_byte", {**base, "sub/a.bin": big[:-1] + b"\x01"})) != ref
    assert _hash_path(folder("moved", {"config.json": b"{}", "other/a.bin": big})) != ref
    assert _hash_path(folder("renamed", {"config.json": b"{}", "sub/b.bin": big})) != ref
    assert _hash_path(folder("extra", {**base, "sub/c.bin": b""})) != ref  # an empty file still counts
    one = tmp_path / "one" / "teacher.py"
    one.parent.mkdir()
    one.write_bytes(b"x = 1\n")
    first = _hash_path(one)
    one.write_bytes(b"x = 2\n")
    assert _hash_path(one) != first
    other = tmp_path / "one" / "student.py"
    other.write_bytes(b"x = 2\n")
    assert _hash_path(other) != _hash_path(one)  # same bytes, another name
