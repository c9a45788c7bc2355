"""The run report end to end on a tiny random BERT (finetune -> prune -> distill -> export -> ptq -> evaluate):
report.md and a self-contained report.html from the same report.json, gates first, the teacher in ONNX Runtime as
baseline rows with ratios, one int8 file that the report names, and the plots of the passes that ran."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from compress.cli import main
from compress.report.render import model_rows, render_markdown
from tests.conftest import make_config, save_tiny_bert, sentiment_files


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    teacher = save_tiny_bert(tmp / "bert", 2, seed=0)
    data = sentiment_files(tmp / "data")
    passes = [
        {"type": "finetune", "steps": 4, "batch_size": 16, "lr": 1e-3},
        {"type": "prune", "method": "magnitude", "granularities": ["heads", "ffn"], "target": {"fraction": 0.99}},
        {"type": "distill", "steps": 3, "batch_size": 16, "lr": 1e-3, "weights": {"logit": 1.0}},
        {"type": "export"},
        {"type": "ptq", "methods": ["dynamic", "static"], "primary": "dynamic"},
        {"type": "evaluate", "batch_size": 16, "latency_rounds": 2},
    ]
    cfg = make_config(tmp, teacher, data, passes, gates={"max_quality_drop": 1.0, "max_size_mb": 100})
    assert main(["run", str(cfg), "-q"]) == 0
    return tmp / "out"


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_one_int8_file_named_in_the_report(run_dir: Path) -> None:
    rep = _report(run_dir)
    int8_files = sorted(p.name for p in run_dir.glob("*.onnx") if "int8" in p.name)
    # the shipped dynamic model is written once, as student.int8.onnx; the static one keeps its method's name
    assert int8_files == ["student.int8-static.onnx", "student.int8.onnx"]
    assert rep["shipped"] == "student.int8.onnx" == rep["final_student"]["file"]
    assert rep["final_student"]["model"] == "int8-dynamic"
    assert rep["files"] == {"fp32": "student.onnx", "int8-dynamic": "student.int8.onnx",
                            "int8-static": "student.int8-static.onnx"}
    assert set(rep["files"].values()) == {p.name for p in run_dir.glob("student*.onnx")}
    assert "`student.int8.onnx` (the int8-dynamic student)" in (run_dir / "report.md").read_text()
    assert "<code>student.int8.onnx</code> (the int8-dynamic student)" in (run_dir / "report.html").read_text()


def test_teacher_baseline_rows_and_ratios(run_dir: Path) -> None:
    ev = _report(run_dir)["evaluation"]
    base = ev["baselines"]
    assert list(base) == ["teacher-fp32", "teacher-int8-dynamic"]
    ref = base["teacher-fp32"]
    assert ref["fused"] is True and ref["label"] == "teacher fp32 (ORT, fused)"
    assert ref["latency_x"] == 1.0 and ref["size_x"] == 1.0
    assert ref["fidelity"] == pytest.approx(1.0)  # the ORT teacher agrees with the PyTorch one
    assert base["teacher-int8-dynamic"]["size_mb"] < ref["size_mb"]
    for name, s in {**base, **ev["variants"]}.items():
        assert s["latency_p50_ms"] > 0 and s["latency_rounds"] == 2, name
        assert s["size_x"] == pytest.approx(ref["size_mb"] / s["size_mb"]), name
        assert s["latency_x"] > 0, name
    # the pruned student is smaller than the teacher
    assert ev["variants"]["fp32"]["size_x"] > 1.0
    # the markdown rows show the same numbers
    md = (run_dir / "report.md").read_text()
    shipped = ev["variants"]["int8-dynamic"]
    row = next(line for line in md.splitlines() if line.startswith("| student int8-dynamic (ORT) [shipped]"))
    assert f"{shipped['size_x']:.2f}x" in row and f"{shipped['latency_x']:.2f}x" in row
    assert "| teacher fp32 (ORT, fused) |" in md and "| teacher int8-dynamic (ORT) |" in md


def test_gates_come_first(run_dir: Path) -> None:
    md = (run_dir / "report.md").read_text()
    assert md.index("PASSED: 2 gate(s) pass") < md.index("| max_quality_drop | pass |") < md.index("## Models")
    html = (run_dir / "report.html").read_text()
    assert html.index('class="banner pass"') < html.index("max_quality_drop") < html.index("<h2>Models</h2>")
    assert html.index("teacher fp32 (ORT, fused)") < html.index("student int8-dynamic (ORT) [shipped]")


def test_html_is_self_contained(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text()
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs]
    assert "<script" not in html and "<link" not in html and "url(" not in html
    plots = _report(run_dir)["plots"]
    assert html.count('<img alt="') == len(plots)
    for name in plots:
        assert f'alt="{name}"' in html


def test_plots_of_the_passes_that_ran(run_dir: Path) -> None:
    plots = set(_report(run_dir)["plots"])
    assert {"models.png", "loss-finetune.png", "loss-distill.png", "pruning-prune.png"} <= plots
    assert not any(p.startswith(("schedule-", "pareto-")) for p in plots)  # no OPTIMA schedule, no search here
    assert all((run_dir / p).is_file() for p in plots)


def test_static_vs_dynamic_note(run_dir: Path) -> None:
    rep = _report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "Static vs dynamic int8:" in md
    ptq = next(p for p in rep["passes"] if p["type"] == "ptq")["metrics"]
    d, s = ptq["dynamic_runs"], ptq["static_runs"]
    assert d["int8_matmuls"] > 0 and s["int8_matmuls"] > 0
    assert f"static has {s['int8_matmuls']} int8 MatMuls" in md and "Static vs dynamic int8: static int8 runs at" in md


def test_rerender_from_report_json(run_dir: Path) -> None:
    rep = _report(run_dir)
    assert render_markdown(rep) == (run_dir / "report.md").read_text()
    header, rows = model_rows(rep)
    assert header[0] == "model" and [r["kind"] for r in rows[:3]] == ["reference", "baseline", "baseline"]
    assert sum(r["shipped"] for r in rows) == 1


def test_no_baselines_when_off(tmp_path: Path, tiny_bert_dir: Path) -> None:
    data = sentiment_files(tmp_path / "data")
    cfg = make_config(tmp_path, tiny_bert_dir, data, [{"type": "export"}, {"type": "evaluate", "teacher_baselines": False}])
    assert main(["run", str(cfg), "-q"]) == 0
    rep = _report(tmp_path / "out")
    assert rep["evaluation"]["baselines"] == {} and "latency_x" not in rep["evaluation"]["variants"]["fp32"]
    assert rep["shipped"] == "student.onnx"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "teacher fp32 (ORT" not in md and "Static vs dynamic" not in md


@pytest.mark.parametrize("qat_x, says_why", [(2.2, True), (3.5, False)])
def test_int8_note_compares_the_qat_student_with_dynamic_int8(qat_x: float, says_why: bool) -> None:
    """The QAT student is a static QDQ graph too: the note compares it with ptq's dynamic int8 and, when it is the
    slower one, says why it is slower and what to do instead of leaving the reader to wonder."""
    from compress.report.render import int8_note

    rep = {"evaluation": {"variants": {
        "int8-dynamic": {"latency_p50_ms": 5.7, "latency_x": 2.9},
        "int8-qat": {"latency_p50_ms": 7.4, "latency_x": qat_x}}}, "passes": []}
    note = int8_note(rep)
    assert note is not None and f"the QAT student (static int8 QDQ) runs at {qat_x / 2.9:.2f}x the speed" in note
    assert ("QuantizeLinear and each bias Add as a node of its own" in note) == says_why
    assert ("set `ship: fastest` on evaluate" in note) == says_why and "no VNNI" not in note
    rep["passes"] = [{"type": "qat", "metrics": {"reduce_range": True}}]  # qat's record of a CPU without VNNI
    assert ("This CPU has no VNNI" in int8_note(rep)) == says_why
    # dynamic int8 shipped (evaluate's `ship: fastest`): the note says so, and no longer that QAT ships
    rep["evaluation"]["variants"]["int8"] = {"alias_of": "int8-dynamic"}
    note = int8_note(rep)
    assert "The QAT student ships" not in note and "This CPU has no VNNI" not in note
    assert ("Dynamic int8 ships: evaluate's `ship: fastest` chose it" in note) == says_why
    assert ("Dynamic int8 ships although a static graph measured faster: evaluate keeps the last quantizer's file "
            "(ship: last)" in note) == (not says_why)
    # with `ship: fastest`, the note quotes evaluate's own line for why the shipped file ships: one reason, not a guess
    line = "ship: fastest: int8-qat stays: int8-dynamic measured 1.06x its speed (by speedup ...), a lead within ..."
    rep["passes"].append({"type": "evaluate", "metrics": {"ship": line}})
    del rep["evaluation"]["variants"]["int8"]
    note = int8_note(rep)
    assert (f'The QAT student ships (evaluate: "{line}") although' in note) == says_why
    assert "it is the last quantizer in the config" not in note and "set `ship: fastest`" not in note
    del rep["evaluation"]["variants"]["int8-dynamic"]
    assert int8_note(rep) is None


def test_ship_fastest_moves_the_shipped_file_to_the_faster_int8_student(run_dir: Path, tmp_path: Path) -> None:
    """evaluate `ship: fastest` on the same run (earlier passes from its cache): student.int8.onnx becomes the int8
    student timed fastest whose quality is within the tolerance; the other keeps its method's name; report, file
    names and the metric line agree. The choice itself is the measurement's (ship_fastest's own test pins the rule)."""
    cfg = run_dir.parent / "model.yaml"
    out = tmp_path / "out"
    assert main(["run", str(cfg), "-q", "--set", f"output={out}", "--set", f"cache_dir={run_dir / '.cache'}",
                 "--set", "passes.5.ship=fastest", "--set", "passes.5.ship_tolerance=1.0",
                 "--set", "passes.5.ship_margin=0"]) == 0
    rep = _report(out)
    v = rep["evaluation"]["variants"]
    chosen = max(("int8-dynamic", "int8-static"), key=lambda n: v[n]["latency_x"])
    other = ({"int8-dynamic", "int8-static"} - {chosen}).pop()
    assert rep["final_student"]["model"] == chosen == v["int8"]["alias_of"]
    assert rep["files"][chosen] == "student.int8.onnx" and rep["files"][other] == f"student.{other}.onnx"
    assert {p.name for p in out.glob("student*.onnx")} == set(rep["files"].values())
    line = next(p for p in rep["passes"] if p["type"] == "evaluate")["metrics"]["ship"]
    assert line.startswith("ship: fastest: ") and chosen in line
    assert (f"{chosen} ships instead of int8-dynamic" in line) == (chosen != "int8-dynamic")
    # without latency there is nothing to compare: bad input, exit 2
    assert main(["validate", str(cfg), "--set", "passes.5.ship=fastest", "--set", "passes.5.latency=false"]) == 2


def test_ship_fastest_rule() -> None:
    """The fastest student of the shipped one's precision within `tolerance` of its quality drop ships when its lead
    is more than `margin`; a faster one that loses more stays unshipped, and the line says so; with no latency_x on
    every candidate the p50 decides."""
    from compress.artifact import Artifact, Evaluation, ModelFile
    from compress.passes.evaluate import ship_fastest

    def artifact() -> Artifact:
        return Artifact(task="sequence-classification", models=[
            ModelFile(Path("fp32.onnx")), ModelFile(Path("dyn.onnx"), "int8", "dynamic"),
            ModelFile(Path("qat.onnx"), "int8", "qat", shipped=True)])

    def evaluation(dyn_drop: float, dyn_x: float | None) -> Evaluation:
        ev = Evaluation(main_metric="accuracy", higher_is_better=True, examples=100, teacher={"quality": 0.8})
        ev.models = {"fp32": {"quality_drop": 0.0, "latency_p50_ms": 1.0, "latency_x": 9.0},  # fp32 never competes
                     "int8-dynamic": {"quality_drop": dyn_drop, "latency_p50_ms": 2.0, "latency_x": dyn_x},
                     "int8-qat": {"quality_drop": 0.010, "latency_p50_ms": 2.5, "latency_x": 4.0}}
        return ev

    a, line = ship_fastest(artifact(), evaluation(0.014, 5.0), 0.005, 0.0)
    assert a.shipped().name == "int8-dynamic" and "1.25x its speed" in line
    assert [m.name for m in a.models if m.shipped] == ["int8-dynamic"]
    a, line = ship_fastest(artifact(), evaluation(0.014, 5.0), 0.005, 0.25)  # a 25% lead is within a 25% margin
    assert a.shipped().name == "int8-qat" and "int8-qat stays: int8-dynamic measured 1.25x its speed" in line
    assert ship_fastest(artifact(), evaluation(0.014, 5.0), 0.005, 0.2)[0].shipped().name == "int8-dynamic"
    a, line = ship_fastest(artifact(), evaluation(0.016, 5.0), 0.005, 0.0)  # 0.6 points worse: more than the tolerance
    assert a.shipped().name == "int8-qat" and "int8-qat stays" in line
    assert "int8-dynamic was faster (1.25x) but its quality drop 0.016 exceeds 0.01 + the tolerance 0.005" in line
    a, line = ship_fastest(artifact(), evaluation(0.0, None), 0.0, 0.0)  # no ratio for one of them: p50 2.0 < 2.5 ms
    assert a.shipped().name == "int8-dynamic" and "by 1 / p50" in line
    unshipped = Artifact(task="sequence-classification", models=[ModelFile(Path("fp32.onnx"))])
    assert ship_fastest(unshipped, evaluation(0.0, 5.0), 0.0, 0.0)[0].shipped().name == "fp32"
