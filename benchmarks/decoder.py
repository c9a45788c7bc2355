"""Decoder students on the edge: one table from one run.

Runs (or reuses from the cache) the pipeline of a decoder config (default configs/tiny-llama-decoder.yaml:
LLaMA-family teacher trained from scratch, 2-layer distilled student, KV-cache export, int8 dynamic, int4
MatMulNBits), exports the teacher with its cache too, and measures in ONNX Runtime, on the same eval texts and
the same prompts:

    teacher fp32 | student fp32 | student int8 (dynamic) | student int4 (weight-only)

columns: perplexity on data.eval, top-1 agreement with the teacher (per next-token position), file size,
prefill ms (a --prompt-len prompt), decode tokens/s (--new-tokens greedy steps with the KV cache, batch 1), and
ratios against the teacher. Timing rounds are interleaved over the four models (the machine is shared: each
round sees the same load) and the median is reported.

    nice -n 10 .venv/bin/python benchmarks/decoder.py [--config C] [--output DIR] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs/tiny-llama-decoder.yaml"))
    ap.add_argument("--output", default=None, help="run output folder (default: the config's)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--eval", type=int, default=None, help="eval texts (default: the config's data.eval)")
    args = ap.parse_args()

    from compress.config import load_config
    from compress.data.collate import causal_lm_batches
    from compress.data.sources import load_records
    from compress.generate import OnnxDecoder
    from compress.models.loading import load_model, load_preprocessor
    from compress.onnx.decoder import export_decoder, top1_agreement
    from compress.onnx.runtime import make_session, onnx_size_mb, run_session
    from compress.pipeline import Pipeline
    from compress.tasks import get_task

    overrides = [f"output={args.output}"] if args.output else []
    if args.eval:
        overrides.append(f"data.eval.limit={args.eval}")
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()
    result = Pipeline(cfg, progress=False).run()
    if result.exit_code not in (0, 3) or result.artifact is None:
        print(f"pipeline failed: {result.error}")
        return 1
    print(f"pipeline: {time.perf_counter() - t0:.0f} s (cached passes are reused)")
    art = result.artifact
    work = result.output_dir / "bench"
    work.mkdir(exist_ok=True)
    teacher_onnx = work / "teacher.onnx"
    teacher = load_model(str(art.teacher_dir), "causal-lm").eval()
    if not teacher_onnx.is_file():
        export_decoder(teacher, teacher_onnx)
    by_name = {m.name: m.path for m in art.models}
    models = {"teacher fp32": teacher_onnx, "student fp32": by_name["fp32"],
              "student int8": by_name["int8-dynamic"], "student int4": by_name["int4-weight-only"]}

    tok = load_preprocessor(str(art.model_dir))
    recs = load_records(cfg.data.eval, base_dir=cfg.base_dir, name="eval")
    batches = list(causal_lm_batches(recs, tok, batch_size=32, max_length=cfg.model.max_length))
    outs = {}
    for name, path in models.items():
        sess = make_session(path, threads=2)
        outs[name] = [torch.from_numpy(next(iter(run_session(sess, b).values()))) for b in batches]
    score = get_task("causal-lm").score
    quality = {n: score(batches, o, outs["teacher fp32"]) for n, o in outs.items()}
    agree = {n: top1_agreement(batches, o, outs["teacher fp32"]) for n, o in outs.items()}
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    # timing: interleaved rounds, same prompt for every model
    decs = {n: OnnxDecoder(p, threads=args.threads) for n, p in models.items()}
    vocab = decs["teacher fp32"].layout.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, args.prompt_len).tolist()
    for d in decs.values():
        d.timed(prompt, 4)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in decs}
    for _ in range(args.rounds):
        for n, d in decs.items():
            runs[n].append(d.timed(prompt, args.new_tokens))
    timing = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}

    t = "teacher fp32"
    s = "student fp32"
    rows = []
    for n, path in models.items():
        ppl = quality[n]["perplexity"]
        rows.append([
            n, f"{ppl:.2f}", f"{agree[n]:.3f}", f"{onnx_size_mb(path):.2f}", f"{timing[n]['prefill_ms']:.2f}",
            f"{timing[n]['decode_tokens_per_s']:.0f}",
            f"{onnx_size_mb(path) / onnx_size_mb(models[t]):.2f}x",
            f"{timing[n]['decode_tokens_per_s'] / timing[t]['decode_tokens_per_s']:.2f}x",
            f"{timing[n]['prefill_ms'] / timing[t]['prefill_ms']:.2f}x",
            f"{(ppl / quality[s]['perplexity'] - 1) * 100:+.1f}%",
        ])
    head = ["model", "perplexity", "top-1 agree (teacher)", "MB", "prefill ms", "decode tok/s", "size vs teacher",
            "decode speed vs teacher", "prefill vs teacher", "ppl vs student fp32"]
    print(f"\n{len(recs.texts or [])} eval texts ({tokens} next-token positions), prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} decode steps, batch 1, {args.threads} ORT thread(s), median of {args.rounds} "
          "interleaved rounds\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    speed = timing["student int4"]["decode_tokens_per_s"] / timing[t]["decode_tokens_per_s"]
    inc = quality["student int4"]["perplexity"] / quality[s]["perplexity"] - 1
    print(f"\ntarget: int4 student decodes >= 4x the fp32 teacher: {speed:.2f}x -> {'met' if speed >= 4 else 'NOT met'}")
    print(f"target: int4 perplexity <= +10% over the fp32 student: {inc * 100:+.1f}% -> {'met' if inc <= 0.10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
