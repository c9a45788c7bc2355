"""Writing a run folder's outputs: the model files (one per model, the shipped one named in report.json),
report.json, and report.md / report.html / junit.xml rendered from that one report dict."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.report.html import render_html
from compress.report.records import StepRecord
from compress.report.render import _atomic_copy, _atomic_write, model_file_names, render_junit, render_markdown, write_plots


def write_outputs(out: Path, report: dict[str, Any], artifact: Artifact | None, records: list[StepRecord]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if artifact is not None:
        from compress.onnx.edge import sidecars

        files = report.get("files") or model_file_names(artifact)
        written: set[str] = set()
        for m in artifact.models:
            name = files[m.name]
            _atomic_copy(Path(m.path), out / name)
            written.add(name)
            for src, side in sidecars(Path(m.path), name):  # edge: .ort + operator config
                _atomic_copy(src, out / side)
                written.add(side)
        for old in out.glob("student*.onnx"):  # an earlier run's models (e.g. a second copy of the shipped one)
            if old.name not in written:
                old.unlink()
                for side in out.glob(old.name.removesuffix(".onnx") + ".*"):
                    if side.name not in written and side.suffix in (".ort", ".config", ".data"):
                        side.unlink()
        if artifact.model_dir is not None and report["status"] in ("passed", "gate_failed"):
            _atomic_copy(Path(artifact.model_dir), out / "model")
    plots = write_plots(out, report, records)
    report["plots"] = plots
    _atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
    render_outputs(out, report)


def render_outputs(out: Path, report: dict[str, Any]) -> None:
    """report.md, report.html (plots read from `out` and embedded) and junit.xml from one report dict (report.json):
    also what re-renders an existing run folder."""
    _atomic_write(out / "report.md", render_markdown(report))
    _atomic_write(out / "report.html", render_html(report, out))
    _atomic_write(out / "junit.xml", render_junit(report))
