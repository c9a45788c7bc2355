"""report.json (the machine-readable contract), report.md, junit.xml and plots, and the export of the
final student into the output folder. Everything is written to a temp name and renamed into place."""
from __future__ import annotations

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


def model_file_names(artifact: Artifact | None) -> dict[str, str]:
    """The file each ONNX model is written as in the run folder, by model name: the shipped quantized model as
    `student.<precision>.onnx` (student.int8.onnx: one file, not a second copy under its method's name), every
    other one as `student.<name>.onnx` (student.onnx for fp32, student.int8-static.onnx...)."""
    if artifact is None:
        return {}
    return {m.name: onnx_file_name(m.precision if m.shipped else m.name) for m in artifact.models}


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
    files = model_file_names(artifact)
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
        "final_student": {"variant": final.precision, "model": final.name, "file": files[final.name]} if final else None,
        # the one file that ships (also final_student.file) and each model's file in the run folder
        "shipped": files[final.name] if final else None,
        "files": files,
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


# ------------------------------------------------------------------------------------------ tables
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v / 1e6:.2f}M"
    return str(v)


def _ratio(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) or v != v else f"{v:.2f}x"


def shipped_variant(variants: dict[str, Any]) -> str:
    """Which evaluated ONNX student ships: the one `int8` (or `int4`) aliases, else fp32."""
    for precision in ("int8", "int4"):
        if precision in variants:
            return variants[precision].get("alias_of") or precision
    return "fp32"


MODEL_COLUMNS = ("model", "file", "params", "size MB", "size x", "p50 ms", "p90 ms", "latency x", "{metric}", "fidelity")


def model_rows(report: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The models table as (header, rows), shared by report.md and report.html: the teacher in PyTorch (the quality
    reference), the teacher in ONNX Runtime (fp32 fused, int8: the baselines; `x` columns are ratios against the
    fp32 ORT teacher: how many times smaller / faster), then every ONNX student. Each row: `cells` (strings, in
    header order), `kind` (reference | baseline | student), `shipped`."""
    ev = report.get("evaluation")
    if not ev:
        return [], []
    metric = ev.get("main_metric", "quality")
    header = [c.format(metric=metric) for c in MODEL_COLUMNS]
    rows: list[dict[str, Any]] = []

    def row(label: str, s: dict[str, Any], kind: str, file: str = "", shipped: bool = False, fidelity: Any = None) -> None:
        cells = [label, file, _fmt(s.get("params")), _fmt(s.get("size_mb")), _ratio(s.get("size_x")),
                 _fmt(s.get("latency_p50_ms")), _fmt(s.get("latency_p90_ms")), _ratio(s.get("latency_x")),
                 _fmt(s.get("quality")), _fmt(s.get("fidelity") if fidelity is None else fidelity)]
        rows.append({"cells": cells, "kind": kind, "shipped": shipped})

    row("teacher (PyTorch)", ev.get("teacher", {}), "reference", fidelity=1)
    for name, s in (ev.get("baselines") or {}).items():
        row(s.get("label") or name, s, "baseline")
    variants = ev.get("variants", {})
    shipped = shipped_variant(variants)
    files = report.get("files") or {}
    for name, s in variants.items():
        if "alias_of" in s:
            continue
        row(f"student {name} (ORT)" + (" [shipped]" if name == shipped else ""), s, "student", files.get(name, ""),
            shipped=name == shipped)
    return header, rows


def gate_banner(report: dict[str, Any]) -> tuple[str, str]:
    """(state, one line) for the top of the report: state is pass, fail or error."""
    gates = report.get("gates") or []
    failed = [g["name"] for g in gates if g["passed"] is False]
    skipped = [g["name"] for g in gates if g["passed"] is None]
    if report["status"] == "passed":
        text = f"PASSED: {len(gates)} gate(s) pass" if gates else "PASSED (no gates configured)"
        if skipped:
            text += f"; {len(skipped)} skipped ({', '.join(skipped)})"
        return "pass", text
    if report["status"] == "gate_failed":
        return "fail", f"FAILED: gate(s) {', '.join(failed)} failed ({len(gates) - len(failed)} of {len(gates)} pass)"
    return "error", f"{report['status'].upper()} (exit code {report['exit_code']}): {report.get('error') or ''}".rstrip(": ")


def headline(report: dict[str, Any]) -> str | None:
    """One sentence under the verdict: the shipped student against the teacher in ONNX Runtime."""
    ev = report.get("evaluation") or {}
    variants = ev.get("variants", {})
    name = shipped_variant(variants)
    s = variants.get(name)
    if not s or not s.get("latency_x"):
        return None
    metric = ev.get("main_metric", "quality")
    text = (f"The shipped student ({name}) is {s['latency_x']:.2f}x faster and {_ratio(s.get('size_x'))} smaller than "
            "the fp32 teacher in ONNX Runtime")
    base = (ev.get("baselines") or {}).get("teacher-int8-dynamic")
    if base and base.get("latency_x"):
        text += f", {s['latency_x'] / base['latency_x']:.2f}x faster than the teacher's dynamic int8"
    teacher_q = (ev.get("teacher") or {}).get("quality")
    return text + f"; {metric} {_fmt(s.get('quality'))} against the teacher's {_fmt(teacher_q)}."


def gate_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for g in report.get("gates") or []:
        verdict = "skipped" if g["passed"] is None else ("pass" if g["passed"] else "FAIL")
        out.append([g["name"], verdict, _fmt(g.get("value")), _fmt(g.get("limit")), g["detail"]])
    return out


GATE_COLUMNS = ("gate", "verdict", "value", "limit", "detail")


def int8_note(report: dict[str, Any]) -> str | None:
    """One paragraph on static (QDQ) vs dynamic int8 when both were timed, for ptq's static student and for the QAT
    student (a static QDQ graph too): which is faster (the ratio of their per-round speedups when the teacher baseline
    was timed, else of their p50), and what ORT runs for each (the ptq pass's `<method>_runs`: op counts of the
    session-optimized graphs)."""
    ev = report.get("evaluation") or {}
    v = ev.get("variants", {})
    dyn = v.get("int8-dynamic")
    if not dyn or not dyn.get("latency_p50_ms"):
        return None
    parts = []
    for name, label in (("int8-static", "static int8"), ("int8-qat", "the QAT student (static int8 QDQ)")):
        sta = v.get(name)
        if not sta or not sta.get("latency_p50_ms"):
            continue
        if dyn.get("latency_x") and sta.get("latency_x"):
            speed = sta["latency_x"] / dyn["latency_x"]
            how = (f"{label} runs at {speed:.2f}x the speed of dynamic int8 ({sta['latency_x']:.2f}x vs "
                   f"{dyn['latency_x']:.2f}x faster than the fp32 teacher, per-round medians)")
        else:
            speed = dyn["latency_p50_ms"] / sta["latency_p50_ms"]
            how = (f"{label} runs at {speed:.2f}x the speed of dynamic int8 (p50 {sta['latency_p50_ms']:.3g} vs "
                   f"{dyn['latency_p50_ms']:.3g} ms)")
        parts.append((name, speed, how))
    if not parts:
        return None
    text = "Static vs dynamic int8: " + "; ".join(how for _, _, how in parts) + "."
    ptq = next((p["metrics"] for p in report.get("passes", []) if p["type"] == "ptq"), {})
    d, s = ptq.get("dynamic_runs"), ptq.get("static_runs")
    static_speed = next((sp for n, sp, _ in parts if n == "int8-static"), None)
    if isinstance(d, dict) and isinstance(s, dict) and static_speed is not None:
        text += (f" What ONNX Runtime runs (the session-optimized graphs): dynamic has {d['int8_matmuls']} int8 MatMul "
                 f"kernels that quantize their input themselves (or share one of {d['quantize']} DynamicQuantizeLinear) "
                 f"and take the bias in ({d['add']} Add nodes left), and {d['float_matmuls']} float MatMuls; static has "
                 f"{s['int8_matmuls']} int8 MatMuls, {s['float_matmuls']} float ones, and around them {s['quantize']} "
                 f"QuantizeLinear, {s['dequantize']} DequantizeLinear and {s['add']} Add nodes, each one more pass over "
                 "the activations.")
        if static_speed < 1:
            text += (" At this size those passes cost more than static int8 saves by not measuring activation ranges at "
                     "run time, so dynamic int8 ships (docs/quantization.md).")
    qat_speed = next((sp for n, sp, _ in parts if n == "int8-qat"), None)
    ships = (v.get("int8") or {}).get("alias_of")
    # evaluate's `ship: fastest` says why it shipped what it shipped; without it the last quantizer's file ships
    why = next((p["metrics"].get("ship") for p in report.get("passes", []) if p["type"] == "evaluate"), None)
    why = f" (evaluate: \"{why}\")" if why else None
    if ships == "int8-dynamic" and any(sp > 1 for _, sp, _ in parts):
        text += (" Dynamic int8 ships although a static graph measured faster" + (why or ": evaluate keeps the last "
                 "quantizer's file (ship: last)") + ".")
    elif ships == "int8-dynamic" and qat_speed is not None:
        text += " Dynamic int8 ships: evaluate's `ship: fastest` chose it over the QAT student" + (why or "") + "."
    if qat_speed is not None and qat_speed < 1 and ships in (None, "int8-qat"):
        qat = next((p["metrics"] for p in report.get("passes", []) if p["type"] == "qat"), {})
        text += (" The QAT student ships" + (why or " (it is the last quantizer in the config)") + " although dynamic "
                 "int8 measured faster here: a static QDQ graph runs each activation's QuantizeLinear and each bias Add "
                 "as a node of its own, where dynamic int8's MatMul kernels quantize their input and add the bias inside "
                 "(docs/quantization.md, \"Static vs dynamic int8\").")
        if why is None:
            text += (" QAT is the int8 to keep where its accuracy is the better one; where it is not, set `ship: "
                     "fastest` on evaluate to ship the faster file.")
        if qat.get("reduce_range") is True:
            text += " This CPU has no VNNI: both int8 files use 7-bit weights, and its int8 kernels gain less over fp32."
    return text


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in esc)]


def variants_table(evaluation: dict[str, Any] | None) -> str:
    header, rows = model_rows({"evaluation": evaluation})
    return "\n".join(_md_table(header, [r["cells"] for r in rows])) if rows else ""


def pass_rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    for p in report["passes"]:
        flat = {k: v for k, v in p["metrics"].items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                and "." not in k}
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(flat.items())[:6])
        out.append([p["label"], p["status"], f"{p['duration_s']:.1f}", shown])
    return out


def render_markdown(report: dict[str, Any]) -> str:
    lines = [f"# compress report: {report['name']}", ""]
    state, banner = gate_banner(report)
    lines.append(f"**{banner}**")
    lines.append("")
    if report.get("gates"):
        lines += _md_table(list(GATE_COLUMNS), gate_rows(report)) + [""]
    if report.get("shipped"):
        fs = report.get("final_student") or {}
        lines.append(f"**shipped:** `{report['shipped']}` (the {fs.get('model', fs.get('variant'))} student)  ")
    if headline(report):
        lines.append(f"{headline(report)}  ")
    lines.append(f"task: {report['task']}; teacher: `{report['teacher']}`; duration {report['duration_s']:.1f} s  ")
    t = report["target"]
    lines.append(f"target: {t['provider']}, batch {t['batch_size']}, seq {t['seq_len']}, threads {t['threads']}")
    if report.get("error") and state != "fail":
        lines += ["", f"> {report['error']}"]
    header, rows = model_rows(report)
    if rows:
        ev = report["evaluation"]
        lines += ["", "## Models", "", *_md_table(header, [r["cells"] for r in rows]), "",
                  f"{ev.get('main_metric')} on {ev.get('examples')} examples of data.eval; fidelity: agreement with the "
                  "PyTorch teacher; `x`: times smaller / faster than the fp32 teacher in ONNX Runtime (latency: median "
                  "of per-round ratios, all models timed interleaved)."]
    note = int8_note(report)
    if note:
        lines += ["", note]
    lines += ["", "## Passes", "", *_md_table(["pass", "status", "duration s", "key metrics"], pass_rows(report))]
    for p in report["passes"]:
        if p["metrics"].get("chosen") and p["metrics"].get("why"):
            lines += ["", f"**{p['label']}: chose `{p['metrics']['chosen']}`**: {p['metrics']['why']}"]
    if report.get("plots"):
        lines += ["", "## Plots"]
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

    from compress.report.figures import save_figure

    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        save_figure(fig, out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    ev = report.get("evaluation") or {}
    if ev.get("variants"):
        fig = plot_tradeoff(report)
        if fig is not None:
            save(fig, "models.png")

    for r in records:
        curve = r.metrics.get("loss_curve")
        if isinstance(curve, list) and len(curve) > 1:
            fig, ax = plt.subplots(figsize=(6.4, 3.2))
            steps = list(range(1, len(curve) + 1))
            ax.plot(steps, curve, color="#9ecae1", lw=1, label="per step")
            window = max(1, len(curve) // 20)
            if window > 1:  # a moving average shows the trend through the per-batch noise
                import numpy as np

                smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1:], smooth, color="#08519c", lw=1.8, label=f"mean of {window}")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.set_title(f"{r.label} ({r.type}): training loss")
            ax.legend(loc="upper right", fontsize=8)
            ax.grid(alpha=0.3)
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


def plot_tradeoff(report: dict[str, Any]) -> Any:
    """The quality-vs-latency Pareto plot (left) and quality vs size (right): the teacher in ONNX Runtime (squares),
    every student (circles; the shipped one a star), the PyTorch teacher's quality as a dashed line, the Pareto front
    (faster and at least as good) as a step line. Every point labelled. None when nothing was timed."""
    import matplotlib.pyplot as plt

    ev = report.get("evaluation") or {}
    metric = ev.get("main_metric", "quality")
    higher = ev.get("higher_is_better", True)
    shipped = shipped_variant(ev.get("variants", {}))
    points = []  # (label, latency, size, quality, kind)
    for name, s in (ev.get("baselines") or {}).items():
        label = name.replace("teacher-", "teacher ", 1) + " (ORT)"
        points.append((label, s.get("latency_p50_ms"), s.get("size_mb"), s.get("quality"), "baseline"))
    for name, s in ev.get("variants", {}).items():
        if "alias_of" not in s:
            points.append((f"student {name}", s.get("latency_p50_ms"), s.get("size_mb"), s.get("quality"),
                           "shipped" if name == shipped else "student"))
    if not any(p[1] is not None and p[3] is not None for p in points):
        return None
    style = {"baseline": ("s", "#7f7f7f", 70), "student": ("o", "#4c72b0", 60), "shipped": ("*", "#d62728", 220)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, idx, xlabel in ((axes[0], 1, "p50 latency on target (ms, log scale; left is faster)"), (axes[1], 2, "size (MB, log scale; left is smaller)")):
        shown = [p for p in points if p[idx] is not None and p[3] is not None]
        for kind, (marker, color, size) in style.items():
            pts = [p for p in shown if p[4] == kind]
            if pts:
                ax.scatter([p[idx] for p in pts], [p[3] for p in pts], marker=marker, color=color, s=size, zorder=3,
                           label={"baseline": "teacher (ORT)", "student": "student", "shipped": "shipped student"}[kind])
        offsets = ((6, 7), (6, -13), (6, 19), (6, -25))  # cycled in x order so close neighbours do not overlap
        for i, p in enumerate(sorted(shown, key=lambda p: p[idx])):
            ax.annotate(p[0], (p[idx], p[3]), textcoords="offset points", xytext=offsets[i % len(offsets)],
                        fontsize=8)
        front, best = [], None
        for p in sorted(shown, key=lambda p: p[idx]):
            if best is None or (p[3] > best if higher else p[3] < best):
                front.append(p)
                best = p[3]
        if len(front) > 1:
            ax.step([p[idx] for p in front], [p[3] for p in front], where="post", color="#2ca02c", lw=1, ls="-",
                    alpha=0.7, label="Pareto front", zorder=2)
        tq = (ev.get("teacher") or {}).get("quality")
        if tq is not None:
            ax.axhline(tq, color="k", ls="--", lw=1, label="teacher (PyTorch)")
        ax.set_xscale("log")
        from matplotlib.ticker import FormatStrFormatter, LogLocator

        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(1.5, 4.0, 6.0, 7.0, 8.0, 9.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)")
        ax.grid(alpha=0.3, which="both")
        xs = [p[idx] for p in shown]
        if xs:
            ax.set_xlim(min(xs) / 1.35, max(xs) * 1.6)  # room for the labels right of the points
        ys = [p[3] for p in shown] + ([tq] if tq is not None else [])
        if ys:
            pad = (max(ys) - min(ys)) * 0.25 or 0.01
            ax.set_ylim(min(ys) - pad, max(ys) + pad)
    axes[0].set_title(f"{metric} vs latency")
    axes[1].set_title(f"{metric} vs size")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, -0.06))
    fig.suptitle(f"{report['name']}: teacher and students in ONNX Runtime", y=1.0)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig
