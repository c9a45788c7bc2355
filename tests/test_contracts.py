"""Pass contracts: `compress validate` and `compress run` check a pipeline's order from what each pass declares
it consumes, refuses, produces and drops; typed model-file records in the artifact (and old caches upgraded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.artifact import ARTIFACT_FILE, Artifact, Evaluation, ModelFile
from compress.cli import main
from compress.contracts import Kind
from compress.passes.base import Pass, PassConfig, PassContext
from compress.registry import register, unregister
from tests.conftest import make_config


class FakeQAT(Pass):
    """Stands in for a quantization-aware-training pass: its ONNX graph already holds Q/DQ."""

    type = "test-qat"
    Config = PassConfig
    consumes = (Kind.TORCH_STUDENT,)
    produces = (Kind.ONNX, Kind.ONNX_QUANTIZED)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:  # pragma: no cover - never runs here
        raise AssertionError("the order check must refuse the pipeline before any pass runs")


@pytest.fixture()
def fake_qat():
    register(FakeQAT)
    yield FakeQAT
    unregister("test-qat")


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "passes,expected",
    [
        ([{"type": "evaluate"}], "passes[0] (evaluate): needs an ONNX model, which no pass before it makes; "
                                 "put {type: export}"),
        ([{"type": "ptq"}], "passes[0] (ptq): needs an fp32 ONNX model"),
        ([{"type": "export"}, {"type": "ptq"}, {"type": "ptq", "methods": ["dynamic"]}],
         "passes[2] (ptq): cannot run on a quantized (int8/int4, QDQ or integer-op) ONNX model (made by 'ptq-1')"),
        ([{"type": "test-qat"}, {"type": "ptq"}], "passes[1] (ptq): cannot run on a quantized"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_order_refused_with_exit_2(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path, fake_qat, command: str,
                                   passes: list[dict], expected: str, capsys) -> None:
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    assert main([command, str(cfg), *(["-q"] if command == "run" else [])]) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out" / ".cache").exists()  # refused before anything ran


def test_orders_that_hold_are_valid(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path, capsys) -> None:
    passes = [{"type": "finetune"}, {"type": "export"}, {"type": "ptq"}, {"type": "evaluate"},
              {"type": "export"}, {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate"}]
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    assert main(["validate", str(cfg)]) == 0  # export drops the quantized models: quantizing again is fine


def test_model_file_records_round_trip_and_name_the_files(tmp_path: Path) -> None:
    (tmp_path / "a.onnx").write_bytes(b"x")
    (tmp_path / "b.onnx").write_bytes(b"x")
    fp32 = ModelFile(tmp_path / "a.onnx")
    qat = ModelFile(tmp_path / "b.onnx", precision="int8", method="qat", shipped=True)
    art = Artifact(task="token-classification", models=[fp32, qat],
                   evaluation=Evaluation("accuracy", True, 4, {"quality": 1.0}, {"fp32": {"quality": 0.9}, "int8-qat": {"quality": 0.8}}))
    art.save(tmp_path, tmp_path)
    back = Artifact.load(tmp_path, tmp_path)
    assert back is not None and back.models == [fp32, qat] and back.evaluation == art.evaluation
    assert [m.name for m in back.models] == ["fp32", "int8-qat"] and qat.holds_qdq and not fp32.quantized
    assert back.shipped() == qat and back.shipped_name() == "int8"
    variants = back.evaluation.report(back.shipped())["variants"]
    assert variants["int8"] == {"quality": 0.8, "alias_of": "int8-qat"}


def test_format_1_artifacts_from_old_caches_are_upgraded(tmp_path: Path) -> None:
    for name in ("student.onnx", "student.int8-dynamic.onnx", "student.int8-static.onnx"):
        (tmp_path / name).write_bytes(b"x")
    old = {
        "format": 1, "task": "sequence-classification", "key": "k", "model_dir": None, "teacher_dir": None,
        "onnx": {"fp32": "cache:student.onnx", "int8-dynamic": "cache:student.int8-dynamic.onnx",
                 "int8-static": "cache:student.int8-static.onnx", "int8": "cache:student.int8-static.onnx"},
        "metrics": {}, "history": [],
        "extra": {"note": 1, "evaluation": {"main_metric": "accuracy", "higher_is_better": True, "examples": 2,
                                             "teacher": {"quality": 1.0},
                                             "variants": {"fp32": {"quality": 1.0}, "int8-static": {"quality": 0.5},
                                                          "int8": {"quality": 0.5, "alias_of": "int8-static"}}}},
    }
    (tmp_path / ARTIFACT_FILE).write_text(json.dumps(old))
    art = Artifact.load(tmp_path, tmp_path)
    assert art is not None
    assert [(m.name, m.shipped) for m in art.models] == [("fp32", False), ("int8-dynamic", False), ("int8-static", True)]
    assert art.shipped().path == tmp_path / "student.int8-static.onnx"
    assert art.evaluation is not None and set(art.evaluation.models) == {"fp32", "int8-static"}
    assert art.extra == {"note": 1}


def _as_format_1(data: dict) -> dict:
    """An artifact.json as compress wrote it before model-file records (format 1)."""
    def name(m: dict) -> str:
        return "fp32" if m["precision"] == "fp32" else f"{m['precision']}-{m['method']}"

    onnx = {name(m): m["path"] for m in data["models"]}
    shipped = next((m for m in data["models"] if m["shipped"]), None)
    if shipped:
        onnx["int8"] = shipped["path"]
    extra = dict(data["extra"])
    ev = data["evaluation"]
    if ev:
        variants = dict(ev["models"])
        if shipped:
            variants["int8"] = dict(variants[name(shipped)], alias_of=name(shipped))
        extra["evaluation"] = {**{k: ev[k] for k in ("main_metric", "higher_is_better", "examples", "teacher")},
                               "variants": variants}
    old = {k: v for k, v in data.items() if k not in ("models", "evaluation")}
    return {**old, "format": 1, "onnx": onnx, "extra": extra}


def test_a_cache_written_in_format_1_is_reused(tmp_path: Path, tiny_bert_dir: Path, data_dir: Path, capsys) -> None:
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[
        {"type": "export"}, {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate", "latency": False}])
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    first = json.loads((out / "report.json").read_text())
    files = list((out / ".cache").glob(f"*/{ARTIFACT_FILE}"))
    assert len(files) == 4  # load, export, ptq, evaluate
    for f in files:
        f.write_text(json.dumps(_as_format_1(json.loads(f.read_text()))))
    assert main(["run", str(cfg), "-q"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert [p["status"] for p in again["passes"]] == ["cached"] * 3
    # format 1 had no teacher baselines (compress.onnx.baselines): everything else comes back as it was
    assert again["evaluation"]["baselines"] == {}
    assert {k: v for k, v in again["evaluation"].items() if k != "baselines"} == \
        {k: v for k, v in first["evaluation"].items() if k != "baselines"}
    assert again["final_student"] == first["final_student"]
    assert again["evaluation"]["variants"]["int8"]["alias_of"] == "int8-dynamic"
