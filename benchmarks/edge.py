"""Edge student against the desktop student, side by side, from one run (issue 14, docs/edge.md).

Runs the distilled 3-layer student (configs/minilm-distill.yaml: dynamic int8, fused, dynamic axes) and its edge
version (configs/minilm-edge.yaml: fixed [1, 64] shapes, the mobile-EP graph, static QDQ int8, .ort files)
through compress.pipeline with one shared cache (the fine-tuned teacher and the distilled student are the same
cache entries), then, on the same eval tweets for every row (--eval, default 4000, all from the default's eval
range), scores each ONNX / .ort file against the labels, and times the int8 files on the CPU EP (batch 1, seq 64,
2 threads, the config's target) in interleaved rounds (median of the rounds' p50s, so that load from other
processes falls on each row alike). Coverage and partitions per mobile EP are ORT's usability analysis
(onnxruntime.tools.mobile_helpers) of each file.

    nice -n 10 python benchmarks/edge.py [--eval 4000] [--rounds 5] [--work DIR] [--cache DIR]
    python benchmarks/edge.py --latency-only --rounds 9 --work DIR   # re-time the int8 files of an earlier run
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_config(config: Path, out: Path, cache: Path) -> Any:
    from compress.pipeline import run

    res = run(config, [f"output={out}", f"cache_dir={cache}"], progress=False)
    if res.exit_code not in (0, 3):
        raise SystemExit(f"{config.name}: exit {res.exit_code}: {res.error}")
    return res


def eval_batches(config: Path, out: Path, n: int) -> list[dict[str, Any]]:
    """`n` labelled tweets of the default's eval range, tokenised by the student's tokenizer as evaluate does."""
    from compress.config import load_config
    from compress.data import collate
    from compress.models.loading import load_preprocessor
    from compress.passes.base import DataProvider

    run = load_config(config, [f"data.eval.limit={n}"])
    data = DataProvider(run)
    return list(collate.text_batches(data.records("eval"), load_preprocessor(str(out / "model")), batch_size=64,
                                     max_length=run.model.max_length, label2id=data.label2id()))


def correct(sess: Any, batches: list[dict[str, Any]]) -> Any:
    """Per example: 1 when the model's class is the label."""
    import numpy as np

    from compress.onnx.edge import run_fixed
    from compress.passes.common import model_inputs

    hits = [np.argmax(next(iter(run_fixed(sess, model_inputs(b)).values())), -1) == b["labels"].numpy() for b in batches]
    return np.concatenate(hits).astype(np.float64)


def interleaved_p50s(files: dict[str, Path], t: dict[str, Any], args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU EP p50 of each file per round, the files interleaved within each round (the host is noisy)."""
    import numpy as np

    from compress.onnx.runtime import measure_latency
    from compress.tasks import get_task

    lat_in = get_task("sequence-classification").synthetic_inputs(None, batch_size=t["batch_size"], seq_len=t["seq_len"])
    lat_in["input_ids"] = lat_in["input_ids"] % 1000 + 1000
    lat_in["token_type_ids"] = np.zeros_like(lat_in["input_ids"])
    p50s: dict[str, list[float]] = {label: [] for label in files}
    for _ in range(args.rounds):
        for label, path in files.items():
            p50s[label].append(measure_latency(path, lat_in, threads=t["threads"], warmup=20, runs=args.runs)["p50_ms"])
    return p50s


def latency_only(args: argparse.Namespace) -> int:
    """The two int8 files of an earlier run in --work, timed interleaved; one line per file and the ratio."""
    import json

    t = json.loads((args.work / "edge" / "report.json").read_text())["target"]
    files = {"desktop int8 dynamic (shipped)": args.work / "desktop" / "student.int8.onnx",
             "edge int8 static QDQ (shipped)": args.work / "edge" / "student.int8.onnx"}
    p50s = interleaved_p50s(files, t, args)
    for label, v in p50s.items():
        print(f"{label}: p50 {statistics.median(v):.3f} ms (median of {args.rounds} rounds: "
              f"{', '.join(f'{x:.3f}' for x in v)})")
    d, e = p50s.values()
    ratios = [b / a for a, b in zip(d, e)]
    print(f"CPU latency ratio edge int8 / desktop int8: {statistics.median(ratios):.3f} (median of rounds; per round "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    return 0


def main() -> int:
    import numpy as np

    from compress.onnx.edge import load_ort_session, mobile_usability
    from compress.onnx.runtime import make_session

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=4000, help="eval tweets scored for every row")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per round and model")
    ap.add_argument("--work", type=Path, default=ROOT / "exports" / "bench-edge")
    ap.add_argument("--cache", type=Path, default=ROOT / "exports" / "minilm-edge" / ".cache")
    ap.add_argument("--latency-only", action="store_true", help="only the interleaved CPU latency of the two int8 "
                    "files of an earlier run in --work (no pipelines, no scoring)")
    args = ap.parse_args()
    if args.latency_only:
        return latency_only(args)

    desk_cfg, edge_cfg = ROOT / "configs" / "minilm-distill.yaml", ROOT / "configs" / "minilm-edge.yaml"
    desk_out, edge_out = args.work / "desktop", args.work / "edge"
    desk, edg = run_config(desk_cfg, desk_out, args.cache), run_config(edge_cfg, edge_out, args.cache)
    t = edg.report["target"]
    rows = [  # label, file, how to open it
        ("desktop fp32 (fused, dynamic axes)", desk_out / "student.onnx", make_session),
        ("desktop int8 dynamic (shipped)", desk_out / "student.int8.onnx", make_session),
        ("edge fp32 (CoreML file)", edge_out / "student.onnx", make_session),
        ("edge int8 static QDQ (NNAPI file, shipped)", edge_out / "student.int8.onnx", make_session),
        ("edge int8 static QDQ, .ort", edge_out / "student.int8.ort", load_ort_session),
    ]
    batches = eval_batches(edge_cfg, edge_out, args.eval)
    n = sum(len(b["labels"]) for b in batches)
    hits = {label: correct(opener(path, threads=2), batches) for label, path, opener in rows}
    base = hits[rows[1][0]]

    timed = [rows[1], rows[3]]
    p50s = interleaved_p50s({label: path for label, path, _ in timed}, t, args)
    lat = {k: statistics.median(v) for k, v in p50s.items()}
    ratios = [e / d for d, e in zip(p50s[timed[0][0]], p50s[timed[1][0]])]

    def cov(path: Path) -> dict[str, Any]:
        return mobile_usability(path.with_suffix(".onnx"))

    print(f"\nEdge vs desktop student (3-layer MiniLM sentiment), {n} eval tweets, the same for every row; CPU EP p50 "
          f"at batch {t['batch_size']}, seq {t['seq_len']}, {t['threads']} threads, median of {args.rounds} interleaved "
          f"rounds of {args.runs} runs")
    head = ("| model | accuracy | Δ vs desktop int8 (paired, ±1 s.e.) | agree w/ desktop int8 | CPU p50 ms | "
            "NNAPI nodes / partitions | CoreML MLProgram | CoreML NeuralNetwork |")
    print(head)
    print("|" + "---|" * 8)
    for label, path, _ in rows:
        h = hits[label]
        d = h - base
        se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        u = cov(path)
        cells = [f"{u[k]['supported_nodes']}/{u[k]['nodes']} ({100 * u[k]['coverage']:.1f}%) / {u[k]['partitions']}"
                 for k in ("nnapi", "coreml", "coreml-neuralnetwork")]
        agree = float(np.mean(h == base))
        print(f"| {label} | {100 * h.mean():.2f} | {100 * d.mean():+.2f} ± {100 * se:.2f} | {100 * agree:.1f}% | "
              f"{lat.get(label, float('nan')):.3f} | " + " | ".join(cells) + " |")
    print(f"\nCPU latency ratio edge int8 / desktop int8: {statistics.median(ratios):.3f} (median of rounds; "
          f"per round {', '.join(f'{r:.2f}' for r in ratios)})")
    unsupported = {k: v["unsupported_ops"] for k, v in cov(rows[2][1]).items()}
    print(f"ops without a kernel in the edge fp32 file: {unsupported}")
    gates = [(g["name"], g["value"], g["passed"]) for g in edg.report["gates"]]
    print(f"edge run gates: {gates}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
