"""`compress run --check-only` (compress/check.py) on a real tiny run (finetune -> export -> ptq -> evaluate on a
tiny random BERT): it re-gates the cached artifacts with the config's current gates, rewrites the report's gate
section (report.json, report.md, junit.xml), trains and exports nothing, and is exit 2 with one line when the
artifacts the config's passes would make are not cached."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.registry import all_passes
from tests.conftest import make_config, one_line_error, sentiment_files

GATES = {"max_quality_drop": 1.0, "max_size_mb": 100}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _junit(out: Path) -> tuple[ET.Element, dict[str, ET.Element]]:
    suite = ET.parse(out / "junit.xml").getroot().find("testsuite")
    return suite, {c.get("name"): c for c in suite.iter("testcase") if c.get("classname").endswith(".gates")}


def _tree(folder: Path) -> dict[str, float]:
    """Every file under `folder` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _set_gates(cfg: Path, gates: dict) -> None:
    raw = yaml.safe_load(cfg.read_text())
    raw["gates"] = gates
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("check")
    d = sentiment_files(tmp / "data", train=32, eval=16, calib=8)
    cfg = make_config(tmp, tiny_bert_dir, d, passes=[
        {"type": "finetune", "steps": 2, "batch_size": 16, "lr": 1e-3}, {"type": "export"},
        {"type": "ptq", "methods": ["dynamic"]}, {"type": "evaluate", "batch_size": 16}], gates=GATES)
    assert main(["run", str(cfg), "-q"]) == 0
    return cfg, tmp / "out"


@pytest.fixture()
def copy_of(ran, tmp_path):
    """A private copy of the run (config + run folder with its cache) that a test may edit or break."""
    cfg, out = ran
    shutil.copytree(out, tmp_path / "out")
    raw = yaml.safe_load(cfg.read_text())
    raw["output"] = str(tmp_path / "out")
    new = tmp_path / "model.yaml"
    new.write_text(yaml.safe_dump(raw, sort_keys=False))
    return new, tmp_path / "out"


def test_check_only_after_a_run_passes_and_builds_nothing(copy_of, capsys, monkeypatch):
    cfg, out = copy_of
    before_report = _report(out)
    cache_before = sorted(p.name for p in (out / ".cache").iterdir() if p.name not in ("tmp", "work"))
    files_before = {k: v for k, v in _tree(out).items() if not k.startswith(("report.", "junit.", "compress.log"))}

    def no_run(self, artifact, ctx):  # noqa: ARG001
        raise AssertionError(f"--check-only ran pass {self.type}")

    for cls in all_passes().values():  # any pass that runs fails the test
        monkeypatch.setattr(cls, "run", no_run)
    assert main(["run", str(cfg), "--check-only"]) == 0
    printed = capsys.readouterr().out
    assert "gate max_size_mb: pass" in printed and "every gate holds" in printed

    # the cache got no entry; no model file in the run folder or the cache was rewritten
    assert sorted(p.name for p in (out / ".cache").iterdir() if p.name not in ("tmp", "work")) == cache_before
    work = out / ".cache" / "work"
    assert not work.exists() or not any(work.iterdir())  # no pass started (a started pass leaves work/<key>)
    assert {k: v for k, v in _tree(out).items() if not k.startswith(("report.", "junit.", "compress.log"))} \
        == files_before
    rep = _report(out)
    assert rep["status"] == "passed" and rep["exit_code"] == 0 and rep["error"] is None
    assert rep["gates_checked"]["by"] == "compress run --check-only"
    assert [g["passed"] for g in rep["gates"]] == [True, True]
    # everything but the gate section is the run's report
    same = {k: v for k, v in rep.items() if k not in ("gates", "status", "exit_code", "error", "gates_checked")}
    assert same == {k: v for k, v in before_report.items() if k not in ("gates", "status", "exit_code", "error")}


def test_an_edited_gate_fails_and_the_report_says_so(copy_of, capsys):
    cfg, out = copy_of
    # an impossible size limit and a newly added latency limit, written into the YAML file
    _set_gates(cfg, {"max_quality_drop": 1.0, "max_size_mb": 0.0001, "max_latency_ms": 100000})
    assert main(["run", str(cfg), "--check-only"]) == 3
    err = capsys.readouterr().err
    assert "gate failed" in err and "max_size_mb" in err
    rep = _report(out)
    verdicts = {g["name"]: g["passed"] for g in rep["gates"]}
    assert verdicts == {"max_quality_drop": True, "max_size_mb": False, "max_latency_ms": True}
    assert rep["status"] == "gate_failed" and rep["exit_code"] == 3 and "max_size_mb" in rep["error"]
    size = next(g for g in rep["gates"] if g["name"] == "max_size_mb")
    assert size["limit"] == 0.0001 and size["value"] == rep["evaluation"]["variants"]["int8"]["size_mb"]
    suite, cases = _junit(out)
    assert suite.get("failures") == "1"
    assert cases["max_size_mb"].find("failure") is not None and cases["max_latency_ms"].find("failure") is None
    md = (out / "report.md").read_text()
    assert "| max_size_mb | FAIL |" in md and "| max_latency_ms | pass |" in md
    html = (out / "report.html").read_text()
    assert "FAILED" in html and "max_size_mb" in html  # the HTML comes from the same report dict
    assert not list(out.glob(".*.tmp*"))  # the atomic writes left no temp file

    # put the gate back (here through --set): exit 0, and the three files say pass again
    assert main(["run", str(cfg), "--check-only", "--set", "gates.max_size_mb=100"]) == 0
    assert all(g["passed"] for g in _report(out)["gates"])
    assert _junit(out)[0].get("failures") == "0"
    assert "FAIL" not in (out / "report.md").read_text()


def test_nothing_cached_is_exit_2_with_one_line(tmp_path, tiny_bert_dir, data_dir, capsys):
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, gates=GATES)  # never run
    assert main(["run", str(cfg), "--check-only"]) == 2
    line = one_line_error(capsys)
    assert "no report.json" in line and str(tmp_path / "out") in line and "without --check-only" in line
    assert not (tmp_path / "out" / ".cache").exists()  # and it built nothing


def test_removed_cache_is_exit_2(copy_of, capsys):
    cfg, out = copy_of
    shutil.rmtree(out / ".cache")
    assert main(["run", str(cfg), "--check-only"]) == 2
    line = one_line_error(capsys)
    assert f"no cache at {out / '.cache'}" in line and "without --check-only" in line
    assert not (out / ".cache").exists()


def test_removed_report_is_exit_2(copy_of, capsys):
    cfg, out = copy_of
    (out / "report.json").unlink()
    assert main(["run", str(cfg), "--check-only"]) == 2
    assert "no report.json in the run folder" in one_line_error(capsys)


def test_changed_pass_names_the_pass_without_a_cached_result(copy_of, capsys):
    cfg, out = copy_of
    cache_before = sorted(p.name for p in (out / ".cache").iterdir())
    report_before = (out / "report.json").read_bytes()
    assert main(["run", str(cfg), "--check-only", "--set", "passes.3.batch_size=8"]) == 2
    line = one_line_error(capsys)
    assert "passes[3] (evaluate): no cached result for the current config" in line and "without --check-only" in line
    assert sorted(p.name for p in (out / ".cache").iterdir()) == cache_before
    assert (out / "report.json").read_bytes() == report_before  # nothing rewritten on exit 2


def test_missing_cache_entry_names_its_pass(copy_of, capsys):
    cfg, out = copy_of
    key = next(p["cache_key"] for p in _report(out)["passes"] if p["label"] == "export")
    shutil.rmtree(out / ".cache" / key)  # the ptq and evaluate entries still exist, but their input is gone
    assert main(["run", str(cfg), "--check-only"]) == 2
    assert "passes[1] (export): no cached result" in one_line_error(capsys)


def test_report_of_another_run_is_exit_2(copy_of, capsys):
    cfg, out = copy_of
    rep = _report(out)
    rep["passes"][3]["cache_key"] = "0" * 64  # the folder's report describes other artifacts
    (out / "report.json").write_text(json.dumps(rep))
    assert main(["run", str(cfg), "--check-only"]) == 2
    line = one_line_error(capsys)
    assert "written by another run" in line and "pass 'evaluate'" in line


@pytest.mark.parametrize("flag", [["--no-cache"], ["--from", "export"], ["--until", "export"], ["--nproc", "2"]])
def test_flags_that_build_are_refused(copy_of, capsys, flag):
    cfg, _ = copy_of
    assert main(["run", str(cfg), "--check-only", *flag]) == 2
    assert f"--check-only does not combine with {flag[0]}" in one_line_error(capsys)
