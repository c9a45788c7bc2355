"""report.json (the machine-readable contract), report.md, junit.xml and plots, and the export of the
final student into the output folder. Everything is written to a temp name and renamed into place."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
import xml.etree.ElementTree as ET
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress.artifact import Artifact
    from compress.config import RunConfig
    from compress.report.records import StepRecord

REPORT_SCHEMA = 1
DEPENDENCIES = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "optimum", "numpy", "triton")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("compress-ml", *DEPENDENCIES):
        try:
            out["compress" if name == "compress-ml" else name] = version(name)
        except PackageNotFoundError:
            out["compress" if name == "compress-ml" else name] = None
    return out


def onnx_file_name(variant: str) -> str:
    return "student.onnx" if variant == "fp32" else f"student.{variant}.onnx"


def build_report(
    run: RunConfig,
    records: list[StepRecord],
    gates: list[dict[str, Any]],
    artifact: Artifact | None,
    exit_code: int,
    error: str | None,
    started: float,
) -> dict[str, Any]:
    final = artifact.shipped() if artifact else None
    return {
        "schema": REPORT_SCHEMA,
        "name": run.name,
        "task": run.model.task,
        "teacher": run.model.path,
        "status": {0: "passed", 3: "gate_failed", 2: "bad_input", 130: "interrupted"}.get(exit_code, "error"),
        "exit_code": exit_code,
        "error": error,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 3),
        "target": run.target.model_dump(mode="json"),
        "passes": [
            {
                "label": r.label,
                "type": r.type,
                "version": r.version,
                "status": r.status,
                "cache_key": r.key,
                "duration_s": r.duration_s,
                "config": r.config,
                "metrics": r.metrics,
                "events": r.events,
                "error": r.error,
            }
            for r in records
        ],
        "evaluation": artifact.evaluation.report(final) if artifact and artifact.evaluation else None,
        "final_student": {"variant": final.precision, "file": onnx_file_name(final.precision)} if final else None,
        "gates": gates,
        "versions": versions(),
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if Path(src).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def write_outputs(out: Path, report: dict[str, Any], artifact: Artifact | None, records: list[StepRecord]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if artifact is not None:
        from compress.onnx.edge import sidecars

        for m in artifact.models:
            _atomic_copy(Path(m.path), out / onnx_file_name(m.name))
            for src, name in sidecars(Path(m.path), onnx_file_name(m.name)):  # edge: .ort + operator config
                _atomic_copy(src, out / name)
            if m.shipped:
                _atomic_copy(Path(m.path), out / onnx_file_name(m.precision))
        if artifact.model_dir is not None and report["status"] in ("passed", "gate_failed"):
            _atomic_copy(Path(artifact.model_dir), out / "model")
    plots = write_plots(out, report, records)
    report["plots"] = plots
    _atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
    _atomic_write(out / "report.md", render_markdown(report))
    _atomic_write(out / "junit.xml", render_junit(report))


# ------------------------------------------------------------------------------------------ markdown
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def shipped_variant(variants: dict[str, Any]) -> str:
    """Which evaluated ONNX student ships: the one `int8` (or `int4`) aliases, else fp32."""
    for precision in ("int8", "int4"):
        if precision in variants:
            return variants[precision].get("alias_of") or precision
    return "fp32"


def variants_table(evaluation: dict[str, Any] | None) -> str:
    if not evaluation:
        return ""
    metric = evaluation.get("main_metric", "quality")
    rows = [
        f"| model | {metric} | fidelity | p50 ms | p90 ms | size MB | params |",
        "|---|---|---|---|---|---|---|",
    ]
    t = evaluation.get("teacher", {})
    rows.append(
        f"| teacher (PyTorch) | {_fmt(t.get('quality'))} | 1 | - | - | {_fmt(t.get('size_mb'))} | {_fmt(t.get('params'))} |"
    )
    variants = evaluation.get("variants", {})
    shipped = shipped_variant(variants)
    for name, s in variants.items():
        if "alias_of" in s:
            continue
        rows.append(
            f"| student {name} (ORT){' **shipped**' if name == shipped else ''} | {_fmt(s.get('quality'))} | {_fmt(s.get('fidelity'))} | "
            f"{_fmt(s.get('latency_p50_ms'))} | {_fmt(s.get('latency_p90_ms'))} | {_fmt(s.get('size_mb'))} | "
            f"{_fmt(s.get('params'))} |"
        )
    return "\n".join(rows)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# compress report: {report['name']}", ""]
    lines.append(f"**status:** {report['status']} (exit code {report['exit_code']})  ")
    lines.append(f"task: {report['task']}; teacher: `{report['teacher']}`; duration {report['duration_s']:.1f} s  ")
    t = report["target"]
    lines.append(f"target: {t['provider']}, batch {t['batch_size']}, seq {t['seq_len']}, threads {t['threads']}")
    if report.get("error"):
        lines += ["", f"> {report['error']}"]
    table = variants_table(report.get("evaluation"))
    if table:
        lines += ["", "## Models", "", table]
    lines += ["", "## Passes", "", "| pass | status | duration s | key metrics |", "|---|---|---|---|"]
    for p in report["passes"]:
        flat = {k: v for k, v in p["metrics"].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(flat.items())[:6])
        lines.append(f"| {p['label']} | {p['status']} | {p['duration_s']:.1f} | {shown} |")
    for p in report["passes"]:
        if p["metrics"].get("chosen") and p["metrics"].get("why"):
            lines += ["", f"**{p['label']}: chose `{p['metrics']['chosen']}`**: {p['metrics']['why']}"]
    if report["gates"]:
        lines += ["", "## Gates", "", "| gate | verdict | detail |", "|---|---|---|"]
        for g in report["gates"]:
            verdict = "skipped" if g["passed"] is None else ("pass" if g["passed"] else "FAIL")
            lines.append(f"| {g['name']} | {verdict} | {g['detail']} |")
    for plot in report.get("plots", []):
        lines += ["", f"![{plot}]({plot})"]
    v = report["versions"]
    lines += ["", "versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ junit
def render_junit(report: dict[str, Any]) -> str:
    cases = []
    for p in report["passes"]:
        case = ET.Element("testcase", classname=f"compress.{report['name']}.passes", name=p["label"],
                          time=str(p["duration_s"]))
        if p["status"] == "failed":
            ET.SubElement(case, "failure", message=p["error"] or "failed").text = p["error"] or ""
        elif p["status"] == "skipped":
            ET.SubElement(case, "skipped", message="not run (--until, or an earlier pass failed)")
        cases.append(case)
    for g in report["gates"]:
        case = ET.Element("testcase", classname=f"compress.{report['name']}.gates", name=g["name"], time="0")
        if g["passed"] is None:
            ET.SubElement(case, "skipped", message=g["detail"])
        elif not g["passed"]:
            ET.SubElement(case, "failure", message=g["detail"]).text = g["detail"]
        cases.append(case)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    suite = ET.Element("testsuite", name=f"compress.{report['name']}", tests=str(len(cases)),
                       failures=str(failures), errors="0", skipped=str(skipped), time=str(report["duration_s"]))
    suite.extend(cases)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# ------------------------------------------------------------------------------------------ plots
def write_plots(out: Path, report: dict[str, Any], records: list[StepRecord]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        tmp = out / f".{name}.tmp{os.getpid()}.png"
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, out / name)
        written.append(name)

    ev = report.get("evaluation") or {}
    variants = ev.get("variants", {})
    if variants:
        names = [n for n, v in variants.items() if "alias_of" not in v]  # `int8` repeats one of the others
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, key, title in zip(
            axes,
            ("quality", "latency_p50_ms", "size_mb"),
            (ev.get("main_metric", "quality"), "p50 latency (ms)", "size (MB)"),
        ):
            vals = [variants[n].get(key) or 0 for n in names]
            ax.bar(names, vals, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
            if key == "quality" and ev.get("teacher", {}).get("quality") is not None:
                ax.axhline(ev["teacher"]["quality"], color="k", ls="--", lw=1, label="teacher")
                ax.legend(loc="lower right")
            ax.set_title(title)
            ax.tick_params(axis="x", labelrotation=20)
        fig.suptitle(f"{report['name']}: students in ONNX Runtime", y=1.04)
        save(fig, "models.png")

    for r in records:
        curve = r.metrics.get("loss_curve")
        if isinstance(curve, list) and len(curve) > 1:
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.plot(range(1, len(curve) + 1), curve)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"{r.label}: training loss")
            save(fig, f"loss-{r.label}.png")
        kept = r.metrics.get("kept_per_layer")
        if isinstance(kept, list) and kept:
            from compress.prune.plot import plot_kept

            name = f"pruning-{r.label}.png"
            plot_kept(r.metrics, out / name, title=f"{r.label}: what pruning kept per layer")
            written.append(name)
        rounds = [e for e in r.events if e.get("event") == "schedule_round"]
        if rounds:
            from compress.distill.schedule import plot_schedule

            name = f"schedule-{r.label}.png"
            plot_schedule(rounds, out / name, title=f"{r.label}: OPTIMA module (arm) and reward per round")
            written.append(name)
        trials = r.metrics.get("trials")
        if isinstance(trials, list) and r.metrics.get("chosen"):  # the search pass: score vs latency, chosen marked
            from compress.search.evolve import plot_pareto

            name = f"pareto-{r.label}.png"
            plot_pareto(trials, r.metrics["chosen"], out / name, budget_ms=r.metrics.get("budget_latency_ms"),
                        title=f"{r.label}: {r.metrics.get('score_kind', 'score')} vs int8 latency",
                        score_name=f"{r.metrics.get('score_kind', 'score')} score (higher = better)")
            written.append(name)
    return written
