"""The engine end to end on a tiny random BERT: outputs, cache hits and invalidation, gates and exit
codes, resume after an interrupted pass, custom passes (decorator and entry point)."""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from compress.artifact import Artifact
from compress.cli import main
from compress.passes.base import Pass, PassConfig, PassContext
from compress.registry import register, unregister
from tests.conftest import make_config


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _statuses(out: Path) -> dict[str, str]:
    return {p["label"]: p["status"] for p in _report(out)["passes"]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_bert_dir):
    """One full finetune -> export -> ptq -> evaluate run, shared by the tests that read its outputs."""
    from tests.conftest import sentiment_files

    tmp = tmp_path_factory.mktemp("full")
    d = sentiment_files(tmp / "data")
    cfg = make_config(tmp, tiny_bert_dir, d, gates={"max_quality_drop": 1.0, "max_size_mb": 100})
    code = main(["run", str(cfg), "-q"])
    return cfg, tmp / "out", code


def test_full_run_outputs(full_run):
    cfg, out, code = full_run
    assert code == 0
    for f in ("student.onnx", "student.int8.onnx", "report.json", "report.md", "report.html",
              "junit.xml", "models.png", "compress.log"):
        assert (out / f).is_file(), f
    assert not (out / "student.int8-dynamic.onnx").exists()  # the shipped int8 model is written once
    rep = _report(out)
    assert rep["shipped"] == "student.int8.onnx" and rep["files"]["int8-dynamic"] == "student.int8.onnx"
    assert rep["status"] == "passed" and rep["exit_code"] == 0
    assert [p["type"] for p in rep["passes"]] == ["finetune", "export", "ptq", "evaluate"]
    assert all(p["status"] == "ran" for p in rep["passes"])
    ev = rep["evaluation"]
    fp32, int8 = ev["variants"]["fp32"], ev["variants"]["int8"]
    assert fp32["fidelity"] == 1.0  # the fp32 student is the fine-tuned teacher itself here
    assert fp32["latency_p50_ms"] > 0 and fp32["latency_p90_ms"] >= fp32["latency_p50_ms"]
    assert int8["size_mb"] < fp32["size_mb"]
    assert rep["passes"][1]["metrics"]["parity_max_abs_diff"] < 1e-3
    assert rep["versions"]["torch"] and rep["versions"]["onnxruntime"]
    assert {g["name"] for g in rep["gates"]} == {"max_quality_drop", "max_size_mb"}
    # the student folder reloads with from_pretrained
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert m.config.num_labels == 2 and set(m.config.label2id) == {"negative", "positive"}
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("tests") == "6" and suite.get("failures") == "0"


def _decisive_classifier(folder: Path, texts: list[str]) -> Path:
    """A tiny random BERT classifier with large weights (initializer_range 1) and its bias centred on `texts`:
    its logits differ by O(1) and change sign from row to row, so its predictions vary and no row sits on a
    near-tie that int8 rounding could flip (a random tiny BERT at the usual 0.02, fine-tuned or not, predicts
    one class with margins of 1e-4). Accuracy, F1 and fidelity then differ, and a metric scored against the
    wrong vector shows."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.conftest import minilm_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, initializer_range=1.0, num_labels=2, label2id={"negative": 0, "positive": 1},
        id2label={0: "negative", 1: "positive"})).eval()
    with torch.no_grad():
        logits = model(**tok(texts, padding=True, return_tensors="pt")).logits
        model.classifier.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_evaluate_scores_the_models_it_names(tmp_path, data_dir):
    """The reported metrics, recomputed without compress: the teacher in PyTorch and the fp32 and int8
    students in ONNX Runtime on data/eval.jsonl (batches of 16 in file order, as evaluate reads them: int8
    dynamic quantization scales activations per batch), scored by scikit-learn against the file's labels."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [json.loads(line) for line in (data_dir / "eval.jsonl").read_text().splitlines()]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]  # DataSpec: a seeded shuffle (seed 0)
    teacher_dir = _decisive_classifier(tmp_path / "teacher", [r["text"] for r in rows])
    passes = [{"type": "export"}, {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate", "batch_size": 16}]
    cfg = make_config(tmp_path, teacher_dir, data_dir, passes=passes)
    assert main(["run", str(cfg), "-q"]) == 0
    out = tmp_path / "out"
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    labels = [model.config.label2id[r["label"]] for r in rows]
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    encs = [tok([r["text"] for r in rows[i:i + 16]], padding=True, truncation=True, max_length=32,
                return_tensors="pt") for i in range(0, len(rows), 16)]
    with torch.no_grad():
        teacher = np.concatenate([model(**enc).logits.argmax(-1).numpy() for enc in encs])
    ev = _report(out)["evaluation"]
    assert ev["examples"] == len(rows) == 32
    assert 0.2 < teacher.mean() < 0.8, "the teacher predicts both classes"
    assert ev["teacher"]["accuracy"] == pytest.approx(accuracy_score(labels, teacher), abs=1e-6)
    assert ev["teacher"]["f1_macro"] == pytest.approx(f1_score(labels, teacher, average="macro"), abs=1e-6)
    for variant, file in (("fp32", "student.onnx"), ("int8", "student.int8.onnx")):
        sess = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        preds = np.concatenate([sess.run(None, {k: v.numpy() for k, v in enc.items() if k in names})[0].argmax(-1)
                                for enc in encs])
        stats = ev["variants"][variant]
        assert stats["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-6), variant
        assert stats["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-6), variant
        assert stats["fidelity"] == pytest.approx(accuracy_score(teacher, preds), abs=1e-6), variant
        # quality_drop is absolute (config.Gates): teacher minus student, in accuracy points
        assert stats["quality_drop"] == pytest.approx(ev["teacher"]["accuracy"] - stats["accuracy"], abs=1e-12)


def test_rerun_hits_cache_and_invalidation(full_run, capsys):
    cfg, out, _ = full_run
    assert main(["run", str(cfg), "-q"]) == 0
    assert set(_statuses(out).values()) == {"cached"}
    # a changed ptq config reruns ptq and what follows; finetune and export stay cached
    assert main(["run", str(cfg), "-q", "--set", "passes.2.methods=[dynamic, static]"]) == 0
    assert _statuses(out) == {"finetune": "cached", "export": "cached", "ptq": "ran", "evaluate": "ran"}
    assert (out / "student.int8-static.onnx").is_file()
    assert "int8-static" in _report(out)["evaluation"]["variants"]
    # int8 embeddings: a much smaller file (the word embeddings are most of this tiny model)
    sizes = _report(out)["passes"][2]["metrics"]
    assert main(["run", str(cfg), "-q", "--set", "passes.2.quantize_embeddings=true"]) == 0
    smaller = _report(out)["passes"][2]["metrics"]
    assert smaller["dynamic_size_mb"] < 0.5 * sizes["dynamic_size_mb"]
    assert _report(out)["evaluation"]["variants"]["int8"]["fidelity"] >= 0.95  # int8 embeddings flip < 1 in 20
    # --from reruns from that pass even when cached; --until stops after a pass
    assert main(["run", str(cfg), "-q", "--from", "evaluate"]) == 0
    assert _statuses(out)["evaluate"] == "ran" and _statuses(out)["export"] == "cached"
    assert main(["run", str(cfg), "-q", "--until", "export"]) == 0
    assert _statuses(out) == {"finetune": "cached", "export": "cached", "ptq": "skipped", "evaluate": "skipped"}
    # a changed target invalidates only evaluate (the pass that measures on it)
    assert main(["run", str(cfg), "-q", "--set", "target.seq_len=16"]) == 0
    assert _statuses(out) == {"finetune": "cached", "export": "cached", "ptq": "cached", "evaluate": "ran"}


def test_gate_failure_exit_3_keeps_artifacts(full_run, capsys):
    cfg, out, _ = full_run
    code = main(["run", str(cfg), "-q", "--set", "gates.max_latency_ms=0.000001"])
    err = capsys.readouterr().err
    assert code == 3
    assert "max_latency_ms" in err
    rep = _report(out)
    assert rep["status"] == "gate_failed" and rep["exit_code"] == 3
    failed = [g for g in rep["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["max_latency_ms"]
    assert (out / "student.int8.onnx").is_file() and (out / "model" / "config.json").is_file()
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite.get("failures") == "1"


# ---------------------------------------------------------------------------------- custom passes
class CountConfig(PassConfig):
    add: int = 1
    fail_once: bool = False


class Counter(Pass):
    """Adds `add` to a counter kept in artifact.extra; with fail_once, crashes after a checkpoint the first time."""

    type = "test-counter"
    Config = CountConfig
    calls: list[str] = []

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        ckpt = ctx.work_dir / "ckpt.json"
        resumed = ckpt.is_file()
        Counter.calls.append("resumed" if resumed else "fresh")
        if self.config.fail_once and not resumed:
            (ctx.out_dir / "half-written.bin").write_bytes(b"x" * 10)
            ckpt.write_text(json.dumps({"progress": 1}))
            raise RuntimeError("simulated crash after a checkpoint")
        (ctx.out_dir / "note.txt").write_text("hi")
        ctx.metrics["resumed"] = resumed
        return artifact.replace(extra=dict(artifact.extra, count=artifact.extra.get("count", 0) + self.config.add))


@pytest.fixture()
def counter():
    register(Counter)
    Counter.calls = []
    yield Counter
    unregister("test-counter")


def test_custom_pass_cache_and_resume(tmp_path, tiny_bert_dir, data_dir, counter, capsys):
    passes = [{"type": "test-counter", "name": "a"}, {"type": "test-counter", "name": "b", "add": 2, "fail_once": True}]
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    out, cache = tmp_path / "out", tmp_path / "out" / ".cache"
    code = main(["run", str(cfg), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "internal error in pass 'b'" in err and "compress.log" in err
    assert "simulated crash" in (out / "compress.log").read_text()
    assert not list((cache / "tmp").iterdir()), "a failed pass leaves nothing half-written"
    rep = _report(out)
    assert rep["status"] == "error" and _statuses(out) == {"a": "ran", "b": "failed"}
    # rerun: 'a' from the cache, 'b' resumes from its checkpoint and finishes
    assert main(["run", str(cfg), "-q"]) == 0
    assert _statuses(out) == {"a": "cached", "b": "ran"}
    assert counter.calls == ["fresh", "fresh", "resumed"]
    art = Artifact.load(cache / _report(out)["passes"][1]["cache_key"], cache)
    assert art is not None and art.extra["count"] == 3 and art.metrics["b"]["resumed"] is True
    assert not (cache / "work" / _report(out)["passes"][1]["cache_key"]).exists(), "scratch removed on success"
    # changing an earlier pass invalidates the later one
    no_fail = ["--set", "passes.1.fail_once=false"]
    assert main(["run", str(cfg), "-q", "--set", "passes.0.add=5", *no_fail]) == 0
    assert _statuses(out) == {"a": "ran", "b": "ran"}
    assert main(["run", str(cfg), "-q", "--set", "passes.0.add=5", *no_fail]) == 0
    assert _statuses(out) == {"a": "cached", "b": "cached"}
    # --no-cache reruns everything
    assert main(["run", str(cfg), "-q", "--set", "passes.0.add=5", "--no-cache", *no_fail]) == 0
    assert _statuses(out) == {"a": "ran", "b": "ran"}


def test_interrupt_leaves_nothing_partial(tmp_path, tiny_bert_dir, data_dir, capsys):
    class Interrupt(Pass):
        type = "test-interrupt"

        def run(self, artifact, ctx):
            (ctx.out_dir / "partial.bin").write_bytes(b"x")
            raise KeyboardInterrupt

    register(Interrupt)
    try:
        cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "test-interrupt"}])
        assert main(["run", str(cfg), "-q"]) == 130
        cache = tmp_path / "out" / ".cache"
        assert not list((cache / "tmp").iterdir())
        entries = [p for p in cache.iterdir() if p.name not in ("tmp", "work")]
        assert len(entries) == 1  # only the load step (the teacher) was committed
    finally:
        unregister("test-interrupt")


def test_a_run_leaves_the_tmp_entries_of_live_runs_sharing_its_cache(tmp_path, tiny_bert_dir, data_dir):
    """Two runs may share a cache_dir: the one starting cleans tmp/ of killed runs only, not of a live one."""
    import subprocess
    import sys

    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "export", "optimize": False}])
    tmp = tmp_path / "out" / ".cache" / "tmp"
    tmp.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp / f"{'a' * 24}-{alive.pid}-0123abcd").mkdir()
        (tmp / f"{'b' * 24}-{dead.pid}-0123abcd").mkdir()
        (tmp / "not-a-run-entry").mkdir()
        assert main(["run", str(cfg), "-q"]) == 0
        assert sorted(p.name for p in tmp.iterdir()) == [f"{'a' * 24}-{alive.pid}-0123abcd"]
    finally:
        alive.kill()
        alive.wait()


def test_entry_point_plugin(tmp_path, tiny_bert_dir, data_dir, monkeypatch):
    import compress.registry as registry

    site = tmp_path / "site"
    (site / "compress_plugin_demo-0.1.dist-info").mkdir(parents=True)
    (site / "compress_plugin_demo-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: compress-plugin-demo\nVersion: 0.1\n")
    (site / "compress_plugin_demo-0.1.dist-info" / "entry_points.txt").write_text(
        "[compress.passes]\nshout = compress_plugin_demo:Shout\n")
    (site / "compress_plugin_demo.py").write_text(
        "from compress.passes.base import Pass, PassConfig\n"
        "class ShoutConfig(PassConfig):\n    word: str = 'hi'\n"
        "class Shout(Pass):\n    type = 'shout'\n    Config = ShoutConfig\n"
        "    def run(self, artifact, ctx):\n        ctx.metrics['word'] = self.config.word.upper()\n        return artifact\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_loaded", False)
    try:
        assert "shout" in registry.available_types()
        cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "shout", "word": "plug"}])
        assert main(["run", str(cfg), "-q"]) == 0
        assert _report(tmp_path / "out")["passes"][0]["metrics"]["word"] == "PLUG"
    finally:
        unregister("shout")
        sys.modules.pop("compress_plugin_demo", None)


def test_python_api(tmp_path, tiny_bert_dir, data_dir, counter):
    import compress

    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "test-counter", "add": 4}])
    result = compress.run(cfg, progress=False)
    assert result.exit_code == 0 and result.artifact.extra["count"] == 4


def test_pipeline_from_pass_list(tmp_path, tiny_bert_dir, data_dir, counter):
    from compress.pipeline import Pipeline

    result = Pipeline(
        [counter(counter.Config(add=2)), {"type": "test-counter", "name": "again", "add": 3}],
        name="listed", model={"path": str(tiny_bert_dir), "task": "sequence-classification"},
        data={"train": {"path": str(data_dir / "train.jsonl")}}, output=str(tmp_path / "o"), progress=False,
    ).run()
    assert result.exit_code == 0 and result.artifact.extra["count"] == 5
    assert [p["label"] for p in result.report["passes"]] == ["test-counter-0", "again"]


def test_bench_and_report_commands(full_run, capsys):
    cfg, out, _ = full_run
    capsys.readouterr()
    assert main(["bench", str(out / "student.int8.onnx"), "--seq-len", "16", "--runs", "5", "--warmup", "1", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] and stats["runs"] == 5 and stats["size_mb"] > 0
    assert main(["bench", str(out / "nope.onnx")]) == 2
    (out / "report.md").unlink()
    (out / "junit.xml").unlink()
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert "## Models" in (out / "report.md").read_text() and (out / "junit.xml").is_file()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert main(["report", str(out / "model")]) == 2


def test_export_parity_over_tolerance_fails_the_pass(tmp_path, tiny_bert_dir, data_dir, capsys):
    """ORT and PyTorch agree to ~1e-8 here; an impossible tolerance must fail the export pass (exit 1, named)."""
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir,
                      passes=[{"type": "export", "atol": 1e-15, "min_cosine": 1.0, "optimize": False}])
    code = main(["run", str(cfg), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "pass 'export' failed" in err and "differs from PyTorch" in err and "compress.log" in err
    rep = _report(tmp_path / "out")
    assert rep["passes"][0]["status"] == "failed" and not (tmp_path / "out" / "student.onnx").exists()
