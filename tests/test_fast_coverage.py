"""Fast stand-ins for what only the slow end-to-end test covered: a `package:` teacher, and the shipped demo
config (configs/minilm-sentiment.yaml) validating as shipped and running, passes and gates unchanged, on a
tiny 6-layer model stand-in and a few hundred of its tweets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.cli import main
from tests.conftest import make_config, save_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "minilm-sentiment.yaml"


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_package_teacher(tmp_path, tiny_bert_dir, data_dir, monkeypatch, capsys):
    """`package:<pkg>` loads the folder the package's get_model_path() names; a missing package or getter is
    exit 2 with the fix."""
    site = tmp_path / "site"
    (site / "tiny_teacher_pkg").mkdir(parents=True)
    (site / "tiny_teacher_pkg" / "__init__.py").write_text(f"def get_model_path():\n    return {str(tiny_bert_dir)!r}\n")
    (site / "no_getter_pkg").mkdir()
    (site / "no_getter_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    cfg = make_config(tmp_path, Path("x"), data_dir, passes=[{"type": "export", "optimize": False}])
    text = cfg.read_text()
    cfg.write_text(text.replace("path: x\n", "path: package:tiny_teacher_pkg\n", 1))
    assert main(["run", str(cfg), "-q"]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["passes"][0]["metrics"]["parity_max_abs_diff"] < 1e-4
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert student.config.hidden_size == 32 and student.config.num_hidden_layers == 2  # the package's model
    for pkg, words in (("not_installed_pkg", "pip install not-installed-pkg"), ("no_getter_pkg", "get_model_path()")):
        cfg.write_text(text.replace("path: x\n", f"path: package:{pkg}\n", 1))
        assert main(["run", str(cfg), "-q"]) == 2
        assert words in _one_line(capsys.readouterr().err)


def test_demo_config_validates_as_shipped(capsys):
    assert main(["validate", str(DEMO)]) == 0


@pytest.fixture(scope="module")
def minilm_shaped(tmp_path_factory) -> Path:
    """A stand-in for all-MiniLM-L6-v2: 6 layers like it (the demo keeps 3), tiny widths, its tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("minilm-standin"), 6, seed=0, max_position_embeddings=128)


def test_demo_config_runs_on_a_tiny_stand_in(tmp_path, minilm_shaped):
    """Every pass of the demo (finetune, search, prune with learned masks and vocabulary trimming, distill with
    OPTIMA, export, ptq, qat, evaluate) on the stand-in, with the demo's settings but the steps and the search
    space cut to its size."""
    out = tmp_path / "out"
    sets = [f"model.path={minilm_shaped}", f"output={out}", "data.train.limit=128", "data.eval.limit=64",
            "data.calibration.limit=16", "passes.0.steps=4",
            "passes.1.space={layers: [2, 3], hidden: [16, 32], heads: [2, 4], ffn: [32, 64]}",
            "passes.1.min_speedup=null", "passes.1.max_latency_ms=1000", "passes.1.iterations=3", "passes.1.population=2", "passes.1.sample=1",
            "passes.1.measure_runs=3", "passes.2.steps=4", "passes.3.steps=4", "passes.3.schedule.interval=2",
            "passes.6.steps=2", "passes.6.calibration_examples=16", "target.runs=5", "target.warmup=1"]
    code = main(["run", str(DEMO), "-q", *[a for s in sets for a in ("--set", s)]])
    rep = json.loads((out / "report.json").read_text())
    assert [p["type"] for p in rep["passes"]] == ["finetune", "search", "prune", "distill", "export", "ptq", "qat",
                                                  "evaluate"]
    assert all(p["status"] == "ran" for p in rep["passes"]), rep["error"]
    search, prune = rep["passes"][1]["metrics"], rep["passes"][2]["metrics"]
    assert search["chosen"].startswith(("L2-", "L3-"))
    assert prune["vocab_after"] < 30522 and prune["params_after"] < prune["params_before"]
    assert {g["name"] for g in rep["gates"]} == {"max_quality_drop", "min_fidelity", "min_latency_x", "min_size_x",
                                                 "max_size_mb"}
    # a random stand-in's accuracy says nothing, nor does the speed of widths this tiny; what must hold is the
    # size (the vocabulary is trimmed), and the exit code must be the gates' verdict
    gates = {g["name"]: g for g in rep["gates"]}
    assert gates["max_size_mb"]["passed"] and gates["min_size_x"]["passed"]
    assert gates["min_latency_x"]["value"] > 0
    # qat and ptq's dynamic int8 of the same student are both evaluated; `ship: fastest` ships the one timed faster
    # (by more than ship_margin, within half a point of QAT's accuracy) as student.int8.onnx, the other keeps its
    # method's name
    variants = rep["evaluation"]["variants"]
    assert {"fp32", "int8-dynamic", "int8-qat"} <= set(variants) and rep["shipped"] == "student.int8.onnx"
    shipped = variants["int8"]["alias_of"]
    other = ({"int8-dynamic", "int8-qat"} - {shipped}).pop()
    assert rep["files"][other] == f"student.{other}.onnx" and (out / f"student.{other}.onnx").is_file()
    assert next(p for p in rep["passes"] if p["type"] == "evaluate")["metrics"]["ship"].startswith("ship: fastest")
    assert code == (0 if all(g["passed"] for g in rep["gates"]) else 3)
    for f in ("student.onnx", "model/config.json", "model/vocab_kept.json", "junit.xml", "report.md",
              "schedule-distill.png"):
        assert (out / f).exists(), f
