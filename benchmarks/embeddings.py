"""Sentence embeddings: the all-MiniLM-L6-v2 teacher against the compress student of configs/minilm-embeddings.yaml,
one table from one run.

Rows: the teacher exported to ONNX fp32 (pooling and normalisation in the graph, fused by ORT's transformer
optimizer as the student's export is: evaluate's teacher baselines, compress.onnx.baselines), the teacher with
ORT dynamic int8 (MatMul weights only, one scale per tensor: what a user gets today from `quantize_dynamic`) and
with one scale per output column (as ptq quantizes), and the student of the config in fp32 and int8 (the shipped
one, embedding table int8 too; the same int8 student with its embedding table left float; and, when the config
trims the vocabulary, the int8 student before trimming). Quality is measured on the config's held-out eval tweets against
the PyTorch teacher's embeddings: cosine fidelity, recall@10 of the teacher's neighbours, Spearman of pairwise
similarities, and leave-one-out 10-NN accuracy on the tweets' sentiment labels (compress.embed.metrics).
Latency: ORT p50 at the config's target (batch 1, 64 tokens, 2 threads); the models are timed in interleaved
rounds (each round times every model once) and the median of the rounds' p50s is reported, so that load from
other processes hits all rows alike. Ratios are against the teacher fp32 row.

Run: `nice -n 10 python benchmarks/embeddings.py [--rounds 7 --runs 40]`. It runs the config first unless its
output folder already holds a finished run (`--rerun` forces it; cached passes are reused), writes the teacher's
ONNX files under the config's output folder, and prints the table.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "minilm-embeddings.yaml"))
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=40, help="timed runs per model per round")
    ap.add_argument("--set", action="append", default=[], help="config override, as `compress run --set`")
    ap.add_argument("--rerun", action="store_true", help="run the config even when its output folder holds a "
                    "finished run (else that run's student files are measured)")
    args = ap.parse_args()

    from transformers import AutoModel, AutoTokenizer

    from compress.config import load_config
    from compress.data.sources import load_records
    from compress.embed.metrics import embedding_scores
    from compress.embed.model import OUTPUT, SentenceEncoder
    from compress.models.loading import resolve_source
    from compress.onnx.baselines import teacher_baselines
    from compress.onnx.quantize import quantize_dynamic_int8
    from compress.onnx.runtime import make_session, measure_latency, onnx_size_mb, run_session
    from compress.pipeline import run as run_pipeline
    from compress.tasks import get_task

    cfg = load_config(args.config, args.set)
    out = cfg.output_dir
    if args.rerun or not _finished(out):
        result = run_pipeline(cfg, progress=False)
        if result.exit_code not in (0, 3):
            print(f"the config run failed (exit {result.exit_code}): {result.report.get('error')}", file=sys.stderr)
            return result.exit_code
        out = result.output_dir
    _, teacher_dir = resolve_source(cfg.model.path, cfg.base_dir)
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = SentenceEncoder.from_folder(AutoModel.from_pretrained(teacher_dir), teacher_dir, cfg.model.pooling).eval()

    bench = out / "benchmark"
    bench.mkdir(exist_ok=True)
    t_fp32, t_int8 = bench / "teacher.onnx", bench / "teacher.int8-dynamic.onnx"
    t_int8_pc = bench / "teacher.int8-dynamic-per-channel.onnx"
    if not (t_fp32.is_file() and t_int8.is_file()):
        # as evaluate's teacher baselines: exported, fused by ORT's transformer optimizer (as the student's export
        # is) where parity holds, and ORT's dynamic int8 of that graph, as users run it (one scale per tensor)
        example = dict(tok(["a first example", "and a second, longer example sentence"], padding=True,
                           return_tensors="pt"))
        teacher_baselines(None, "feature-extraction", bench, cfg.target, methods=("fp32", "dynamic"), model=teacher,
                          example_inputs=example, output_name=OUTPUT)
    if not t_int8_pc.is_file():  # the same with one scale per output column, as ptq quantizes (its per_channel)
        quantize_dynamic_int8(t_fp32, t_int8_pc, per_channel=True)
    s_keep_emb = bench / "student.int8-fp32-embeddings.onnx"
    if not s_keep_emb.is_file() or s_keep_emb.stat().st_mtime < (out / "student.onnx").stat().st_mtime:
        # ptq's int8 with the embedding table left float (ptq's default before sentence students)
        quantize_dynamic_int8(out / "student.onnx", s_keep_emb, per_channel=True)
    models = {"teacher fp32": t_fp32, "teacher int8 (ORT dynamic)": t_int8,
              "teacher int8 (dynamic, per-channel weights)": t_int8_pc,
              "student fp32": out / "student.onnx", "student int8, embeddings fp32": s_keep_emb,
              "student int8 (shipped: embeddings int8)": out / "student.int8.onnx"}
    untrimmed = _untrimmed_student(out, cfg.cache_path)  # the distilled student before prune trimmed its vocabulary
    if untrimmed is not None:
        full_int8 = bench / "student.full-vocab.int8.onnx"
        if not full_int8.is_file() or full_int8.stat().st_mtime < (out / "student.onnx").stat().st_mtime:
            s_tok = AutoTokenizer.from_pretrained(untrimmed)
            s_enc = SentenceEncoder.from_folder(AutoModel.from_pretrained(untrimmed), untrimmed, cfg.model.pooling).eval()
            example = dict(s_tok(["a first example", "and a second, longer example sentence"], padding=True,
                                 return_tensors="pt"))
            # exported and fused where parity holds, as the export pass makes the shipped student (the same code as
            # the teacher rows), then int8 as ptq makes it
            (fp32,) = teacher_baselines(None, "feature-extraction", bench / "full-vocab", cfg.target, methods=("fp32",),
                                        model=s_enc, example_inputs=example, output_name=OUTPUT)
            quantize_dynamic_int8(fp32.path, full_int8, op_types=("MatMul", "Gemm", "Gather"), per_channel=True)
            shutil.rmtree(bench / "full-vocab")
        models = {**dict(list(models.items())[:-1]), "student int8, full vocabulary (before trimming)": full_int8,
                  **dict(list(models.items())[-1:])}

    records = load_records(cfg.data.eval, base_dir=cfg.base_dir, name="data.eval")
    texts, labels = records.texts or [], records.labels
    batches = [dict(tok(texts[i:i + 64], padding=True, truncation=True, max_length=cfg.model.max_length,
                        return_tensors="pt")) for i in range(0, len(texts), 64)]
    # the students take their own tokenizer's ids (a trimmed vocabulary numbers tokens anew; compress.prune.vocab)
    s_tok = AutoTokenizer.from_pretrained(out / "model") if (out / "model" / "tokenizer.json").is_file() else tok
    s_batches = [dict(s_tok(texts[i:i + 64], padding=True, truncation=True, max_length=cfg.model.max_length,
                            return_tensors="pt")) for i in range(0, len(texts), 64)]
    oov = _share_with_dropped_tokens(tok, s_tok, texts)
    with torch.no_grad():
        ref = np.concatenate([teacher(**b).numpy() for b in batches])
    t = cfg.target
    lat_inputs = get_task("feature-extraction").synthetic_inputs(teacher.config, batch_size=t.batch_size, seq_len=t.seq_len)
    if oov is not None:  # every model gets the same ids, valid for the trimmed student's smaller table too
        lat_inputs["input_ids"] = lat_inputs["input_ids"] % _rows(out / "model")
    rows: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        sess = make_session(path, threads=t.threads)
        own = s_batches if name.startswith("student") and "full vocabulary" not in name else batches
        emb = np.concatenate([run_session(sess, {k: v.numpy() for k, v in b.items()})[OUTPUT] for b in own])
        rows[name] = {**embedding_scores(emb, ref, labels), "size_mb": onnx_size_mb(path), "p50": []}  # type: ignore[dict-item]
    for _ in range(args.rounds):  # interleaved: each round times every model once
        for name, path in models.items():
            lat = measure_latency(path, lat_inputs, provider=t.provider, threads=t.threads, warmup=5, runs=args.runs)
            rows[name]["p50"].append(lat["p50_ms"])  # type: ignore[union-attr]
    base = rows["teacher fp32"]
    base_p50 = statistics.median(base["p50"])  # type: ignore[arg-type]
    print(f"{cfg.name}: {len(texts)} held-out tweets (reference: the PyTorch teacher's embeddings); ORT p50 at batch "
          f"{t.batch_size}, {t.seq_len} tokens, {t.threads} threads, median of {args.rounds} interleaved rounds x "
          f"{args.runs} runs")
    if oov is not None:
        share, split = oov
        print(f"vocabulary: the student's embedding table has {_rows(out / 'model')} rows (the teacher's {len(tok)}); "
              f"{share:.1%} of the held-out tweets have a token outside it ("
              + ("spelled with kept pieces: fallback split)" if split else "it reaches the model as [UNK])"))
    print("| model | fidelity (cos) | recall@10 | Spearman | kNN acc | size MB | p50 ms | smaller vs teacher fp32 "
          "| faster vs teacher fp32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        p50 = statistics.median(r["p50"])  # type: ignore[arg-type]
        knn = f"{r['knn_accuracy']:.3f}" if "knn_accuracy" in r else "-"
        print(f"| {name} | {r['fidelity']:.4f} | {r['recall_at_10']:.3f} | {r['spearman']:.3f} | {knn} | "
              f"{r['size_mb']:.1f} | {p50:.2f} | {base['size_mb'] / r['size_mb']:.2f}x | {base_p50 / p50:.2f}x |")
    return 0


def _untrimmed_student(out: Path, cache: Path) -> Path | None:
    """The distill pass's student folder when a prune pass after it trimmed the vocabulary, else None."""
    import json

    passes = json.loads((out / "report.json").read_text())["passes"]
    if not any(p["type"] == "prune" and (p.get("metrics") or {}).get("vocab_kept") for p in passes):
        return None
    distill = [p for p in passes if p["type"] == "distill"]
    folder = cache / distill[-1]["cache_key"] / "model" if distill else None
    return folder if folder is not None and folder.is_dir() else None


def _share_with_dropped_tokens(tok, s_tok, texts: list[str]) -> tuple[float, bool] | None:  # type: ignore[no-untyped-def]
    """(share of `texts` with a token the trimmed student does not keep, whether the trimming's fallback is split);
    None when the vocabulary is the teacher's."""
    from compress.prune.idmap import load_id_map

    id_map = load_id_map(Path(s_tok.name_or_path))
    if id_map is None:
        return None
    ids = id_map.tolist()
    kept = set(ids)  # fallback unk: the last entry (dropped tokens) repeats [UNK]'s id; split: one to one
    share = float(np.mean([any(i not in kept for i in t) for t in tok(texts, truncation=True)["input_ids"]]))
    return share, len(kept) == len(ids)


def _rows(folder: Path) -> int:
    import json

    return int(json.loads((folder / "config.json").read_text())["vocab_size"])


def _finished(out: Path) -> bool:
    """Whether `out` holds a finished run of the config (report with every pass run, both student files)."""
    import json

    report = out / "report.json"
    if not (report.is_file() and (out / "student.onnx").is_file() and (out / "student.int8.onnx").is_file()):
        return False
    return json.loads(report.read_text()).get("exit_code") in (0, 3)


if __name__ == "__main__":
    raise SystemExit(main())
