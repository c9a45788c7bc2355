"""benchmarks/pipeline.py on tiny random BERT runs: row 4 (the plain student) has the pipeline student's shape and
is trained by the labels-only finetune pass, never by a teacher; the prune pass's keep plan rebuilds the pruned
student; the README section is replaced between its markers, atomically."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compress.errors import InputError
from compress.pipeline import Pipeline
from compress.registry import register, unregister
from tests.conftest import make_config, save_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "pipeline.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_pipeline"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _bench()
unregister(bench.PlainInit.type)  # registered only while this module's tests run (see _plain_init_pass)


@pytest.fixture(autouse=True, scope="module")
def _plain_init_pass():
    """The benchmark's own pass, registered for these tests only: left registered, every later test would see a
    pass compress does not ship (`compress passes` in a fresh process lists the shipped ones)."""
    register(bench.PlainInit)
    yield
    unregister(bench.PlainInit.type)


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), 4, seed=1, intermediate_size=64)


FINETUNE = {"type": "finetune", "steps": 3, "batch_size": 16, "lr": 1e-3}


def _run(tmp_path: Path, model_dir: Path, data: Path, passes: list[dict]) -> Path:
    path = make_config(tmp_path, model_dir, data, passes, name="bench-tiny",
                       model={"path": str(model_dir), "task": "sequence-classification", "max_length": 16},
                       target={"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3},
                       output=str(tmp_path / "run"))
    from compress.config import load_config

    res = Pipeline(load_config(path), progress=False).run()
    assert res.exit_code == 0, res.error
    return path


def _sizes(folder: Path) -> tuple[dict, list, int]:
    from transformers import AutoConfig

    from compress.models.loading import count_params, load_model
    from compress.prune.shrink import layer_sizes

    cfg = AutoConfig.from_pretrained(folder).to_dict()
    model = load_model(str(folder), "sequence-classification")
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    return {k: cfg.get(k) for k in keys}, layer_sizes(model), count_params(model)


def test_plain_student_of_a_pruned_run_has_its_shape_and_no_teacher(tmp_path, bert4_dir, data_dir):
    passes = [FINETUNE,
              {"type": "prune", "method": "taylor", "granularities": ["heads", "ffn", "hidden", "vocab"],
               "target": {"fraction": 0.032}, "scope": "global", "calibration_examples": 32},
              {"type": "distill", "steps": 4, "batch_size": 8, "lr": 1e-3, "weights": {"logit": 1.0, "hidden": 1.0}},
              {"type": "export"}, {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate"}]
    cfg = _run(tmp_path, bert4_dir, data_dir, passes)
    run_dir = tmp_path / "run"
    run, report, cache = bench.load_run(run_dir, str(cfg), None)
    work = tmp_path / "work"
    bench.copy_cache(cache, work / "cache")
    plain = bench.build_plain_student(run, report, work / "cache", work, progress=False)

    # the teacher and the pruned student of the run come from the cache copy; the source cache is untouched
    status = {p["label"]: p["status"] for p in plain.report["passes"]}
    assert status == {"finetune": "cached", "prune": "cached", "plain-init": "ran", "plain-finetune": "ran",
                      "plain-export": "ran", "plain-ptq": "ran"}
    assert plain.info["missed"] == []
    # same final shape as the pipeline's student: config sizes, per-layer sizes (a compress pruned type), params
    mine, theirs = _sizes(plain.model_dir), _sizes(run_dir / "model")
    assert mine == theirs
    full = _sizes(bert4_dir)
    assert mine[1] != full[1] or mine[0]["hidden_size"] < 32  # pruned inside the layers too, not only the vocabulary
    assert mine[0]["vocab_size"] < 30522  # the trimmed vocabulary came along
    # trained by the finetune pass on the labels (task loss only) for the distill pass's steps, no teacher pass after
    # the init, and the weights moved away from the init
    types = [p["type"] for p in plain.report["passes"]]
    assert types[types.index("bench-plain-init"):] == ["bench-plain-init", "finetune", "export", "ptq"]
    ft = next(p for p in plain.report["passes"] if p["label"] == "plain-finetune")
    distill = next(p for p in report["passes"] if p["type"] == "distill")
    assert ft["config"]["as_teacher"] is False
    assert ft["metrics"]["steps"] == distill["metrics"]["steps"] == 4
    assert ft["config"]["batch_size"] == 8 and ft["config"]["lr"] == pytest.approx(1e-3)
    from compress.artifact import Artifact
    from compress.models.loading import load_model

    init_key = next(p["cache_key"] for p in plain.report["passes"] if p["label"] == "plain-init")
    init = load_model(str(Artifact.load(work / "cache" / init_key, work / "cache").model_dir),
                      "sequence-classification").state_dict()
    trained = load_model(str(plain.model_dir), "sequence-classification").state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    # the init is the prune pass's output before distillation: the pipeline's pruned model, bit for bit
    prune_key = next(p["cache_key"] for p in report["passes"] if p["type"] == "prune")
    pruned = load_model(str(cache / prune_key / "model"), "sequence-classification").state_dict()
    assert init.keys() == pruned.keys() and all(torch.equal(pruned[k], init[k]) for k in pruned)
    assert plain.int8.is_file()
    from compress.onnx.export import op_counts

    ops = op_counts(plain.int8)
    assert ops.get("DynamicQuantizeLinear", 0) + ops.get("MatMulInteger", 0) > 0

    # the prune pass's keep plan rebuilds its output exactly from its input (here the fine-tuned teacher)
    plan = json.loads((cache / prune_key / "keep_plan.json").read_text())
    assert plan["vocab"] and (plan["hidden"] or plan["heads"] or plan["ffn"])
    rebuilt = Pipeline([{**FINETUNE, "name": "finetune"}, {"type": "bench-plain-init", "plans": [plan]}],
                       name="rebuild", model=run.model.model_dump(mode="json"), data=run.data.model_dump(mode="json"),
                       output=str(tmp_path / "rebuild"), cache_dir=str(work / "cache"), progress=False).run()
    assert rebuilt.exit_code == 0, rebuilt.error
    again = load_model(str(rebuilt.artifact.model_dir), "sequence-classification").state_dict()
    assert again.keys() == pruned.keys() and all(torch.equal(pruned[k], again[k]) for k in pruned)


def test_plain_student_of_learned_pruning_and_student_layers(tmp_path, bert4_dir, data_dir):
    """learned pruning trains with a teacher: the plain init is the teacher shrunk with the learned plan, trained
    for the pruning pass's steps; with distill's student_layers, the kept teacher layers."""
    passes = [FINETUNE,
              {"type": "prune", "method": "learned", "granularities": ["heads", "ffn"], "target": {"fraction": 0.985},
               "steps": 3, "batch_size": 8, "lr": 1e-3, "weights": {"logit": 1.0}}]
    cfg = _run(tmp_path, bert4_dir, data_dir, passes)
    run, report, cache = bench.load_run(tmp_path / "run", str(cfg), None)
    derived, info = bench.plain_student_config(run, report, cache, tmp_path / "work")
    init = next(p for p in derived.passes if p.type == "bench-plain-init").options()
    assert init["layers"] is None and len(init["plans"]) == 1 and info["steps"] == 3
    bench.copy_cache(cache, tmp_path / "work" / "cache")
    derived, info = bench.plain_student_config(run, report, tmp_path / "work" / "cache", tmp_path / "work")
    res = Pipeline(derived, until="plain-finetune", progress=False).run()  # the exports are checked above
    assert res.exit_code == 0, res.error
    assert {p["label"]: p["status"] for p in res.report["passes"]}["finetune"] == "cached"
    assert _sizes(res.artifact.model_dir) == _sizes(tmp_path / "run" / "model")

    # student_layers: two kept teacher layers, trained for the distill pass's steps
    passes2 = [FINETUNE, {"type": "distill", "student_layers": 2, "steps": 2, "batch_size": 8, "lr": 1e-3}]
    (tmp_path / "b").mkdir()
    cfg2 = _run(tmp_path / "b", bert4_dir, data_dir, passes2)
    run2, report2, cache2 = bench.load_run(tmp_path / "b" / "run", str(cfg2), None)
    derived2, info2 = bench.plain_student_config(run2, report2, cache2, tmp_path / "b" / "work")
    init2 = next(p for p in derived2.passes if p.type == "bench-plain-init").options()
    assert init2["layers"] == 2 and info2["steps"] == 2 and "kept teacher layers" in info2["init"]


def test_load_run_refuses_a_config_that_is_not_the_runs(tmp_path, bert4_dir, data_dir):
    cfg = _run(tmp_path, bert4_dir, data_dir, [FINETUNE])
    raw = yaml.safe_load(cfg.read_text())
    raw["passes"][0]["lr"] = 2e-3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match="pass 'finetune' differs"):
        bench.load_run(tmp_path / "run", str(other), None)
    with pytest.raises(InputError, match="no distillation pass"):
        run, report, cache = bench.load_run(tmp_path / "run", str(cfg), None)
        bench.plain_student_config(run, report, cache, tmp_path / "w")


def _result() -> dict:
    rows = [{"label": f"row {i}", "accuracy": 0.7 + i / 100, "accuracy_pts": i - 1.0, "size_mb": 80.0 / i,
             "p50_ms": 10.0 / i, "latency_x": float(i), "size_x": float(i), "vs_row2": i / 2} for i in range(1, 6)]
    goals = bench.goal_lines(rows[4])
    return {"date": "2026-12-01", "command": "python benchmarks/pipeline.py --run x", "title": "the title",
            "machine": {"cpu": "Some CPU", "cores": 2, "onnxruntime": "1.0", "torch": "2.0", "python": "3.11",
                        "load_start": (1.0, 2.0, 3.0), "load_end": (1.5, 2.0, 3.0)},
            "rows": rows, "goals": goals, "notes": bench.notes_for(rows, goals, ["a note"])}


def test_goals_and_markdown():
    res = _result()
    # row 5: 5x latency (goal 8x: not met), 5x size (not met), +4 points (met), 2.5x vs row 2 (not met)
    assert [ok for _, ok in res["goals"]] == [False, False, True, False]
    md = bench.markdown(res)
    assert md.count("\n| ") == 6  # header + 5 rows
    assert "| 5 | row 5 | 0.7500 | +4.00 | 16.00 | 2.00 | 5.00x | 5.00x | 2.50x |" in md
    assert "NOT met: latency 5.00x lower than row 1 (goal >= 8x)" in md and "met: accuracy +4.00 points" in md
    assert "Short of the goal" in md and "Some CPU, 2 logical cores" in md
    assert "a smaller student" in md and "already searched and pruned" not in md  # a layer-dropped run
    rows, goals = res["rows"], res["goals"]
    pruned = bench.notes_for(rows, goals, [], ["finetune", "search", "prune", "distill", "export", "qat"])
    assert any("already searched and pruned" in n for n in pruned) and not any("a smaller student" in n for n in pruned)
    rows[3] = {**rows[3], "p50_ms": rows[4]["p50_ms"] / 2}  # row 4 faster than row 5 at the same shape
    assert any("Row 4 (dynamic int8) runs 2.00x faster" in n for n in bench.notes_for(rows, goals, [], ["prune"]))


def test_write_readme_replaces_the_marked_section_atomically(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n\n## pipeline.py\n\nhow to run\n\n## later section\n\nkept\n")
    bench.write_readme(readme, "first body\n")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and "## later section\n\nkept\n" in text
    assert text.count(bench.BEGIN) == 1 and "first body" in text
    # a marked section in the middle: replaced in place, what follows stays
    moved = text.replace(f"{bench.BEGIN}\nfirst body\n{bench.END}\n", "")
    moved = moved.replace("how to run\n", f"how to run\n\n{bench.BEGIN}\nfirst body\n{bench.END}\n")
    readme.write_text(moved)
    inode = os.stat(readme).st_ino
    bench.write_readme(readme, bench.markdown(_result()))
    text = readme.read_text()
    assert "first body" not in text and text.count(bench.BEGIN) == text.count(bench.END) == 1
    assert text.index("how to run") < text.index(bench.BEGIN) < text.index("| 5 | row 5 |") < text.index(bench.END) \
        < text.index("## later section")
    assert os.stat(readme).st_ino != inode  # a new file renamed into place, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no temp file left
    # a lone marker: refused, the file untouched
    broken = text.replace(bench.END, "")
    readme.write_text(broken)
    with pytest.raises(InputError, match="only one of the benchmark's markers"):
        bench.write_readme(readme, "x")
    assert readme.read_text() == broken and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
