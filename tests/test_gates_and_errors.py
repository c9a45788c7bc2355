"""Every gate can fail, and so can each error path of evaluate, ptq and export: bad input is exit 2 with one
line naming the pass and the fix (no traceback); a gate that fails is exit 3 with the gate named.
(max_quality_drop and min_fidelity fail in test_pipeline_tasks.py, on the runs whose int8 models lose some.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main
from tests.conftest import make_config


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_bert_dir):
    """export -> ptq (dynamic) -> evaluate on the tiny BERT; the gate tests rerun it from the cache."""
    from tests.conftest import sentiment_files

    tmp = tmp_path_factory.mktemp("gates")
    d = sentiment_files(tmp / "data", train=32, eval=16, calib=8)
    cfg = make_config(tmp, tiny_bert_dir, d, passes=[
        {"type": "export"}, {"type": "ptq", "methods": ["dynamic", "static"]}, {"type": "evaluate"}])
    assert main(["run", str(cfg), "-q"]) == 0
    return cfg, tmp / "out"


@pytest.mark.parametrize("sets, gate", [
    (["gates.max_size_mb=0.01"], "max_size_mb"),
    (["gates.max_latency_ms=0.000001"], "max_latency_ms"),
    # configured but not measured (no latency measured) is a failure, not a pass
    (["passes.2.latency=false", "gates.max_latency_ms=1000"], "max_latency_ms"),
    (["gates.min_size_x=1000"], "min_size_x"),
    (["gates.min_latency_x=1000"], "min_latency_x"),
])
def test_each_gate_can_fail(exported, capsys, sets, gate):
    cfg, out = exported
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", str(cfg), "-q", *args]) == 3
    assert gate in capsys.readouterr().err
    rep = _report(out)
    assert [g["name"] for g in rep["gates"] if g["passed"] is False] == [gate]
    assert rep["status"] == "gate_failed"


def test_ratio_gates_read_the_evaluated_ratios_against_the_fp32_teacher(exported, capsys):
    """min_size_x / min_latency_x hold the shipped int8 model's size_x / latency_x (evaluate's teacher baselines):
    the tiny teacher's int8 copy is hardly smaller (its float embedding table is most of it), so 1.0x < it < 2x."""
    cfg, out = exported
    assert main(["run", str(cfg), "-q", "--set", "gates.min_size_x=1", "--set", "gates.min_latency_x=0.01"]) == 0
    rep = _report(out)
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["min_size_x"]["passed"] and 1 < gates["min_size_x"]["value"] < 2
    assert gates["min_latency_x"]["passed"] and gates["min_latency_x"]["value"] > 0.01
    assert "size reduction over the fp32 ORT teacher 1.0" in gates["min_size_x"]["detail"]
    cfg2 = cfg.parent / "off.yaml"
    cfg2.write_text(cfg.read_text())
    assert main(["validate", str(cfg2), "--set", "gates.min_latency_x=2", "--set", "passes.2.teacher_baselines=false"]) == 2
    assert "gates.min_latency_x: needs the teacher's ONNX baseline; set teacher_baselines: true" in \
        _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("passes, words", [
    # caught before anything runs, from the passes' declared contracts (compress/contracts.py)
    ([{"type": "evaluate"}], ["passes[0] (evaluate): needs an ONNX model", "put {type: export} or {type: qat} before it"]),
    ([{"type": "ptq"}], ["passes[0] (ptq): needs an fp32 ONNX model", "put {type: export} before it"]),
    ([{"type": "export"}, {"type": "evaluate", "variants": ["int8-static"]}],
     ["'evaluate'.variants: ['int8-static'] not made", "available: ['fp32']"]),
])
def test_pass_order_and_variant_errors_are_exit_2(tmp_path, tiny_bert_dir, data_dir, capsys, passes, words):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    assert main(["run", str(cfg), "-q"]) == 2
    line = _one_line(capsys.readouterr().err)
    for w in words:
        assert w in line, line


@pytest.mark.parametrize("passes, data, words", [
    ([{"type": "ptq", "methods": ["static"], "primary": "dynamic"}], None, "primary: 'dynamic' is not among methods"),
    ([{"type": "ptq", "methods": ["static"], "primary": "static"}], {"eval": "eval.jsonl"},
     "static quantization needs data.calibration"),
    ([{"type": "export"}, {"type": "evaluate"}], {"train": "train.jsonl"}, "evaluate needs data.eval"),
])
def test_config_errors_of_ptq_and_evaluate(tmp_path, tiny_bert_dir, data_dir, capsys, passes, data, words):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    if data is not None:
        import yaml

        raw = yaml.safe_load(cfg.read_text())
        raw["data"] = {k: {"path": str(data_dir / v)} for k, v in data.items()}
        cfg.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(cfg)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "model.yaml" in line and words in line, line


def test_fusion_rejected_when_its_parity_fails(tmp_path, tiny_bert_dir, data_dir, monkeypatch):
    """The fused graph is kept only if it keeps parity. ORT's fusion is exact on this model (same max abs diff
    as the unfused graph), so a fusion bug is made here: the real optimizer runs, then one weight of its output
    file is changed. The pass succeeds with the unfused graph and records the rejection."""
    import numpy as np
    import onnx
    import onnx.numpy_helper

    import compress.onnx.export as export_mod

    real = export_mod.optimize_onnx

    def broken_fusion(src, dst, **kw):
        ok = real(src, dst, **kw)
        model = onnx.load(str(dst))
        init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save(model, str(dst))
        return ok

    monkeypatch.setattr(export_mod, "optimize_onnx", broken_fusion)
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "export"}])
    assert main(["run", str(cfg), "-q"]) == 0
    rep = _report(tmp_path / "out")
    m = rep["passes"][0]["metrics"]
    assert m["fused"] is False and m["parity_max_abs_diff"] < 1e-3, m
    cache = tmp_path / "out" / ".cache"
    art = json.loads((cache / rep["passes"][0]["cache_key"] / "artifact.json").read_text())
    events = next(h for h in art["history"] if h["label"] == "export")["events"]
    assert [e["event"] for e in events] == ["fusion_rejected"] and events[0]["max_abs_diff"] > 1e-3
    from compress.onnx.export import op_counts

    ops = op_counts(tmp_path / "out" / "student.onnx")
    assert "MatMul" in ops and not any("Attention" in op or "SkipLayerNorm" in op for op in ops), ops
