"""report.html: the same report dict as report.md (compress.report.render builds the tables), as one self-contained
page: inline CSS, plots embedded as base64 PNG, no script, no external file or network fetch."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from compress.report.render import GATE_COLUMNS, gate_banner, gate_rows, headline, int8_note, model_rows, pass_rows

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:1.6em;margin:0 0 12px}
h2{font-size:1.2em;margin:32px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
h3{font-size:1em;margin:20px 0 6px;color:#3b4252}
.banner{font-size:1.25em;font-weight:600;padding:14px 18px;border-radius:8px;margin:8px 0 14px}
.banner.pass{background:#e3f4e8;color:#14532d;border:1px solid #9ad2ab}
.banner.fail{background:#fde8e8;color:#7f1d1d;border:1px solid #f0a3a3}
.banner.error{background:#fff4de;color:#7a4a00;border:1px solid #f2c97a}
table{border-collapse:collapse;background:#fff;margin:6px 0 8px;font-size:.9em;box-shadow:0 1px 2px rgba(0,0,0,.06)}
th,td{padding:6px 10px;border-bottom:1px solid #e6e8ec;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.verdict-pass{color:#166534;font-weight:600}td.verdict-FAIL{color:#b91c1c;font-weight:700}td.verdict-skipped{color:#6b7280}
tr.baseline td{background:#f8f8fa;color:#444}tr.reference td{color:#555;font-style:italic}
tr.shipped td{background:#eef6ff;font-weight:600}
.meta{color:#4b5563;margin:4px 0;line-height:1.5}
.meta code,td code{background:#eef0f4;padding:1px 4px;border-radius:3px}
.note{background:#fff;border-left:4px solid #6b8fd6;padding:10px 14px;margin:12px 0;max-width:980px;line-height:1.45}
.caption{color:#4b5563;font-size:.9em;margin:4px 0 14px;max-width:980px}
figure{margin:8px 0 22px;background:#fff;padding:10px;border-radius:6px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:#4b5563;font-size:.9em;margin-top:6px}
td.metrics{font-size:.85em;color:#374151;max-width:640px}
.wide{overflow-x:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
.grid figure{margin:0}
footer{color:#6b7280;font-size:.8em;margin-top:36px}
"""

# plot file name prefix -> (section, caption)
PLOT_SECTIONS = (
    ("models", "Quality, latency and size", "Teacher in ONNX Runtime (squares), students (circles), shipped student "
     "(star); the green step line is the Pareto front, the dashed line the PyTorch teacher's quality."),
    ("loss-", "Training loss", "Loss per optimizer step of the training pass, with its moving average."),
    ("pruning-", "Pruning: what was kept per layer", "Attention heads and FFN width kept per layer (grey: before)."),
    ("schedule-", "OPTIMA: arm choices over time", "The module (arm) the bandit chose to train per round, and the "
     "reward it saw."),
    ("pareto-", "Search: Pareto front", "Score vs measured int8 latency of each candidate shape; the star is the "
     "chosen one."),
)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
           num_cols: set[int] | None = None, cell_class: Any = None) -> str:
    out = ['<div class="wide"><table>', "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>",
           "<tbody>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = []
        for j, c in enumerate(r):
            classes = []
            if num_cols and j in num_cols:
                classes.append("num")
            if cell_class:
                extra = cell_class(j, c)
                if extra:
                    classes.append(extra)
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_e(c)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _img(path: Path) -> str | None:
    if not path.is_file():
        return None
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(path.name)}" src="data:image/png;base64,{data}">'


def render_html(report: dict[str, Any], folder: Path) -> str:
    """The report as one HTML page; the plots named in report["plots"] are read from `folder` and embedded."""
    state, banner = gate_banner(report)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>compress report: {_e(report['name'])}</title><style>{CSS}</style></head><body><main>",
             f"<h1>compress report: {_e(report['name'])}</h1>",
             f'<div class="banner {state}">{_e(banner)}</div>']
    if report.get("gates"):
        parts.append(_table(list(GATE_COLUMNS), gate_rows(report), num_cols={2, 3},
                            cell_class=lambda j, c: f"verdict-{c}" if j == 1 else None))
    if report.get("error") and state != "fail":
        parts.append(f'<div class="note">{_e(report["error"])}</div>')
    fs = report.get("final_student") or {}
    meta = []
    if report.get("shipped"):
        meta.append(f"<b>shipped:</b> <code>{_e(report['shipped'])}</code> (the {_e(fs.get('model', fs.get('variant')))} "
                    "student)")
    if headline(report):
        meta.append(f"<b>{_e(headline(report))}</b>")
    t = report["target"]
    meta.append(f"task: {_e(report['task'])}; teacher: <code>{_e(report['teacher'])}</code>; run took "
                f"{report['duration_s']:.1f} s")
    meta.append(f"target: {_e(t['provider'])}, batch {_e(t['batch_size'])}, sequence {_e(t['seq_len'])}, threads "
                f"{_e(t['threads'])}")
    parts.append('<div class="meta">' + "<br>".join(meta) + "</div>")
    header, rows = model_rows(report)
    if rows:
        ev = report["evaluation"]
        parts.append("<h2>Models</h2>")
        parts.append(_table(header, [r["cells"] for r in rows],
                            row_classes=["shipped" if r["shipped"] else r["kind"] for r in rows],
                            num_cols=set(range(2, len(header)))))
        parts.append(f'<div class="caption">{_e(ev.get("main_metric"))} on {_e(ev.get("examples"))} examples of '
                     "data.eval; fidelity: agreement with the PyTorch teacher; <b>x</b>: times smaller / faster than the "
                     "fp32 teacher in ONNX Runtime (latency: the median of per-round ratios, every model timed in the "
                     "same interleaved rounds).</div>")
    note = int8_note(report)
    if note:
        parts.append(f'<div class="note">{_e(note)}</div>')
    plots = list(report.get("plots") or [])
    if plots:
        parts.append("<h2>Plots</h2>")
    done: set[str] = set()
    for prefix, section, caption in PLOT_SECTIONS:
        mine = [p for p in plots if p.startswith(prefix) and p not in done]
        if not mine:
            continue
        parts.append(f"<h3>{_e(section)}</h3>")
        grid = prefix == "loss-" and len(mine) > 1  # small plots side by side
        if grid:
            parts.append('<div class="grid">')
        for p in mine:
            done.add(p)
            img = _img(folder / p)
            if img:
                label = p.removesuffix(".png").removeprefix(prefix) if prefix.endswith("-") else ""
                parts.append(f"<figure>{img}<figcaption>{_e((label + ': ') if label else '')}{_e(caption)}"
                             "</figcaption></figure>")
        if grid:
            parts.append("</div>")
    for p in plots:  # anything else a pass drew
        if p not in done and (img := _img(folder / p)):
            parts.append(f"<figure>{img}<figcaption>{_e(p)}</figcaption></figure>")
    parts.append("<h2>Passes</h2>")
    parts.append(_table(["pass", "status", "duration s", "key metrics"], pass_rows(report), num_cols={2},
                        cell_class=lambda j, c: "metrics" if j == 3 else None))
    for p in report["passes"]:
        if p["metrics"].get("chosen") and p["metrics"].get("why"):
            parts.append(f'<div class="note"><b>{_e(p["label"])}: chose <code>{_e(p["metrics"]["chosen"])}</code></b>: '
                         f'{_e(p["metrics"]["why"])}</div>')
    v = report.get("versions") or {}
    parts.append("<footer>versions: " + _e(", ".join(f"{k} {val}" for k, val in v.items() if val)) + "</footer>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)
