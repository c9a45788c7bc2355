"""The compress pipeline against what users pick today: one table, the same data and target for every row.

Rows (all scored on the same >= 3000 held-out tweets, all timed in one process in interleaved rounds):

  1. the fp32 teacher in ONNX Runtime: the plain export and the export fused by ORT's transformer optimizer are
     both timed and the faster becomes row 1 (the fastest fp32 a user gets, not a straw man);
  2. the teacher + ORT dynamic int8 of the optimized graph (what Olive or optimum give in one command);
  3. the teacher + ORT static int8 (QDQ, U8S8) calibrated on the run's calibration split;
  4. a plain student of the pipeline student's final shape, fine-tuned on the labels only (no teacher), dynamic
     int8: initialised as the pipeline initialises its student before any distillation (the search pass's output,
     or distill's `student_layers` kept teacher layers, shrunk with the prune pass's keep plan when the run prunes),
     trained by the finetune pass for as many examples as the run's distillation passes saw. It is built by
     compress's own pipeline (a derived config) in --work, on a copy of the run's cache: the teacher is a cache hit;
  5. the run's shipped int8 student (report.json names the file).

Teacher rows 1-3 come from compress.onnx.baselines (the same code the evaluate pass uses). Accuracy: each file in
ORT with its own model's tokenizer, on the first --eval tweets of the config's eval range (read past the config's
eval limit: held out, disjoint from train). Latency: ORT p50 at the run's target (batch, seq, threads); every round
times every row once (rotating order, fresh warm sessions), ratios are the median of the per-round ratios.

    nice -n 10 python benchmarks/pipeline.py --run exports/minilm-sentiment [--eval 3000] [--rounds 5] [--work DIR]
    nice -n 10 python benchmarks/pipeline.py --config configs/minilm-sentiment.yaml   # runs the pipeline first
    ... --write-readme      # also replace the results section of benchmarks/README.md (atomically)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from compress.artifact import Artifact  # noqa: E402
from compress.contracts import Kind  # noqa: E402
from compress.errors import InputError  # noqa: E402
from compress.passes.base import Pass, PassConfig, PassContext  # noqa: E402
from compress.registry import register  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
BEGIN = "<!-- benchmarks/pipeline.py results: begin (written by --write-readme) -->"
END = "<!-- benchmarks/pipeline.py results: end -->"
GOALS = {"latency_x": 8.0, "size_x": 10.0, "accuracy_pts": -1.0, "vs_row2": 3.0}


# ------------------------------------------------------------------------------------------- row 4: plain student
class PlainInitConfig(PassConfig):
    layers: int | None = Field(None, gt=0, description="Keep this many uniformly chosen teacher layers (distill's "
                               "student_layers); None: start from the artifact's student.")
    plans: list[dict[str, Any]] = Field(default_factory=list, description="KeepPlans (KeepPlan.to_dict) applied in "
                                        "order with compress.prune.shrink, as the run's prune passes recorded them.")
    vocab_fallbacks: list[str] = Field(default_factory=list, description="Each plan's vocabulary-trimming fallback "
                                       "(the prune pass's vocab_fallback metric); missing ones are unk.")


@register
class PlainInit(Pass):
    """The student the pipeline starts from, before any teacher signal: kept teacher layers or the artifact's model
    (e.g. the search pass's output), shrunk with the run's prune plans (vocabulary trimming as the prune pass does
    it). No training."""

    type = "bench-plain-init"
    Config = PlainInitConfig
    version = "1"
    consumes = (Kind.TORCH_STUDENT, Kind.TEACHER)
    refuses = (Kind.ONNX,)
    produces = (Kind.TORCH_STUDENT,)

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:
        from compress.prune.plan import KeepPlan
        from compress.prune.shrink import shrink
        from compress.prune.vocab import add_dropped_token_row, dropped_token_rows, trim_tokenizer
        from compress.search.inherit import student_from_teacher

        cfg: PlainInitConfig = self.config  # type: ignore[assignment]
        pre = ctx.load_preprocessor(artifact)
        if cfg.layers is not None:
            model, kept = student_from_teacher(ctx.load_teacher(artifact), cfg.layers)
            ctx.metrics["inherited_layers"] = [k + 1 for k in kept]
        else:
            model = ctx.load_student(artifact)
        for i, raw in enumerate(cfg.plans):
            plan = KeepPlan.from_dict(raw)
            model = shrink(model, plan)
            if plan.vocab is not None:  # the prune pass's trimmed vocabulary: its extra row (fallback unk), tokenizer
                fallback = cfg.vocab_fallbacks[i] if i < len(cfg.vocab_fallbacks) else "unk"
                if dropped_token_rows(fallback):
                    add_dropped_token_row(model, plan.vocab, pre.unk_token_id)
                pre = trim_tokenizer(pre, plan.vocab, fallback)
        ctx.metrics["params"] = sum(p.numel() for p in model.parameters())
        return artifact.replace(model_dir=ctx.save_student(model.cpu(), pre))


TRAIN_FIELDS = ("lr", "weight_decay", "warmup_ratio", "scheduler", "batch_size", "grad_accum", "max_grad_norm",
                "bf16", "seed", "checkpoint_every", "log_every", "max_length")


def _teacher_training(spec: dict[str, Any]) -> bool:
    """A pass that trains the student with a teacher's signal (distillation)."""
    return spec["type"] in ("distill", "qat") or (spec["type"] == "prune" and spec.get("method") == "learned")


def plain_student_config(run: Any, report: dict[str, Any], cache: Path, work: Path) -> tuple[Any, dict[str, Any]]:
    """The derived RunConfig of row 4 and what it did (init, steps): the run's passes before its first
    distillation (same labels: cache hits), a PlainInit, a labels-only finetune for as many examples as the
    run's distillation passes saw, export and dynamic int8."""
    from compress.config import parse_config
    from compress.prune.plan import KeepPlan  # noqa: F401  (the plan files are KeepPlan.to_dict)

    labels = run.pass_labels()
    specs = [{"type": s.type, **s.options()} for s in run.passes]
    records = {p["label"]: p for p in report["passes"]}
    first = next((i for i, s in enumerate(specs) if _teacher_training(s)), None)
    if first is None:
        raise InputError("--run: the run has no distillation pass (distill, qat, or prune with method learned); "
                         "row 4 (a plain student of the same shape) has nothing to compare with")
    layers = specs[first].get("student_layers") if specs[first]["type"] == "distill" else None
    plans: list[dict[str, Any]] = []
    fallbacks: list[str] = []
    examples = 0
    for i in range(first, len(specs)):
        s, rec = specs[i], records.get(labels[i])
        if rec is None:
            raise InputError(f"--run: report.json has no pass '{labels[i]}'; the config does not match the run")
        if s["type"] == "search":
            raise InputError(f"passes: '{labels[i]}': a search after a distillation pass is not supported here")
        if s["type"] == "prune":
            from compress.passes.prune import PLAN_FILE

            path = cache / rec["cache_key"] / PLAN_FILE
            if not path.is_file():
                raise InputError(f"{path}: the prune pass '{labels[i]}' recorded no keep plan (a cache entry made "
                                 f"before the prune pass wrote one); rerun the run with --from {labels[i]}")
            plans.append(json.loads(path.read_text()))
            fallbacks.append(rec["metrics"].get("vocab_fallback", "unk"))
        if _teacher_training(s):
            c = rec["config"]
            examples += int(rec["metrics"].get("steps") or 0) * int(c.get("batch_size", 1)) * int(c.get("grad_accum", 1))
    base = records[labels[first]]["config"]
    per_step = int(base.get("batch_size", 32)) * int(base.get("grad_accum", 1))
    steps = max(1, round(examples / per_step))
    train = {k: base[k] for k in TRAIN_FIELDS if k in base}
    # int8 embeddings as the run's student has them: its ptq pass's setting, else qat's (default on), else ptq's default
    quantize_embeddings = next((s.get("quantize_embeddings") for s in specs if s["type"] == "ptq"),
                               next((s.get("quantize_embeddings", True) for s in specs if s["type"] == "qat"), None))
    export = next((s for s in specs if s["type"] == "export"), {"type": "export"})
    passes = [{**s, "name": labels[i]} for i, s in enumerate(specs[:first])]
    passes += [
        {"type": PlainInit.type, "name": "plain-init", "layers": layers, "plans": plans, "vocab_fallbacks": fallbacks},
        {"type": "finetune", "name": "plain-finetune", **train, "steps": steps, "epochs": None, "as_teacher": False},
        {**export, "name": "plain-export"},
        {"type": "ptq", "name": "plain-ptq", "methods": ["dynamic"], "primary": "dynamic",
         **({"quantize_embeddings": quantize_embeddings} if quantize_embeddings is not None else {})},
    ]
    raw = run.model_dump(mode="json", exclude={"passes", "gates", "output", "cache_dir", "name"})
    raw.update(name=f"{run.name}-plain-student", passes=passes, gates={}, output=str(work / "plain-student"),
               cache_dir=str(work / "cache"))
    derived = parse_config(raw, file="benchmarks/pipeline.py (row 4)", source=run.source)
    init = (f"{layers} kept teacher layers (student_layers)" if layers else
            f"the artifact's student after '{labels[first - 1]}'" if first > 0 else "the teacher")
    if plans:
        init += f", shrunk with {len(plans)} prune plan(s)"
    return derived, {"init": init, "steps": steps, "examples": examples, "batch_size": per_step,
                     "cached_labels": labels[:first]}


@dataclass
class PlainStudent:
    model_dir: Path
    int8: Path
    report: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)


def build_plain_student(run: Any, report: dict[str, Any], cache: Path, work: Path, progress: bool = True) -> PlainStudent:
    """Row 4 through compress.pipeline on `work`/cache (which must hold a copy of the run's cache)."""
    from compress.pipeline import Pipeline

    derived, info = plain_student_config(run, report, cache, work)
    res = Pipeline(derived, progress=progress).run()
    if res.exit_code != 0 or res.artifact is None:
        raise SystemExit(f"row 4 (plain student) failed: exit {res.exit_code}: {res.error}")
    status = {p["label"]: p["status"] for p in res.report["passes"]}
    info["missed"] = [lab for lab in info["cached_labels"] if status.get(lab) != "cached"]
    int8 = next(m.path for m in res.artifact.models if m.name == "int8-dynamic")
    return PlainStudent(Path(res.artifact.model_dir), Path(int8), res.report, info)


# ------------------------------------------------------------------------------------------------- the run
def shipped_file(run_dir: Path, report: dict[str, Any]) -> Path:
    """The run's shipped int8 file: report.json's `shipped` (a name or {file: ...}), else `final_student.file`, else
    the names today's runs use."""
    names = []
    shipped = report.get("shipped")
    if isinstance(shipped, dict):
        names.append(shipped.get("file") or shipped.get("path"))
    elif isinstance(shipped, str):
        names.append(shipped)
    names.append((report.get("final_student") or {}).get("file"))
    names += ["student.int8.onnx", "student.int8-dynamic.onnx"]
    for n in names:
        if n and (run_dir / Path(n).name).is_file():
            return run_dir / Path(n).name
    raise InputError(f"{run_dir}: no shipped int8 student (report.json names none of {[n for n in names if n]})")


def load_run(run_dir: Path, config: str | None, cache: Path | None) -> tuple[Any, dict[str, Any], Path]:
    """The finished run's config (checked against report.json pass by pass), report and cache folder."""
    from compress.config import load_config
    from compress.pipeline import check_pipeline

    rep_path = run_dir / "report.json"
    if not rep_path.is_file():
        raise InputError(f"--run {run_dir}: no report.json; point it at a finished run folder (exports/<name>)")
    report = json.loads(rep_path.read_text())
    if report.get("exit_code") not in (0, 3):
        raise InputError(f"--run {run_dir}: the run did not finish (exit {report.get('exit_code')}: {report.get('error')})")
    cfg_path = Path(config) if config else ROOT / "configs" / f"{report['name']}.yaml"
    if not cfg_path.is_file():
        raise InputError(f"--config: {cfg_path} not found; give the config the run was made from")
    cache = cache or run_dir / ".cache"
    run = load_config(cfg_path, [f"output={run_dir}", f"cache_dir={cache}"])
    passes = check_pipeline(run, str(cfg_path))
    done = [p for p in report["passes"]]
    if [p["label"] for p in done] != run.pass_labels():
        raise InputError(f"--config {cfg_path}: its passes {run.pass_labels()} are not the run's "
                         f"{[p['label'] for p in done]}; give the config the run was made from")
    for p, rec in zip(passes, done):
        if p.config.model_dump(mode="json") != rec["config"]:
            raise InputError(f"--config {cfg_path}: pass '{rec['label']}' differs from the run's; give the config the "
                             "run was made from")
    if not cache.is_dir():
        raise InputError(f"--cache {cache}: not a folder; give the run's cache folder")
    return run, report, cache


def copy_cache(src: Path, dst: Path) -> None:
    """A copy of the run's finished cache entries (never written into the source)."""
    if dst.is_dir():
        return
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("tmp", "work"))
    os.replace(tmp, dst)


def eval_records(run: Any, n: int) -> tuple[Any, dict[Any, int], dict[str, Any]]:
    """The first `n` examples of the config's eval range (its limit raised), the labels' ids and a description."""
    from compress.data.sources import load_records
    from compress.passes.base import DataProvider

    spec = run.data.eval
    if spec is None:
        raise InputError("data.eval: the benchmark scores the held-out eval range; add data.eval to the config")
    records = load_records(spec.model_copy(update={"limit": n}), base_dir=run.base_dir, name="data.eval")
    if len(records) < n:
        raise InputError(f"--eval {n}: data.eval ({spec.path}, fraction {list(spec.fraction)}) has only "
                         f"{len(records)} examples; lower --eval or widen the eval range")
    data = DataProvider(run)
    train = set(data.records("train").texts or []) if run.data.train is not None else set()
    overlap = sum(t in train for t in records.texts or [])
    return records, data.label2id() or {}, {"path": spec.path, "fraction": list(spec.fraction),
                                           "examples": len(records), "same_text_in_train": overlap}


class Scorer:
    """Per-example correctness of an ONNX classifier on the eval records, tokenised by a model folder's tokenizer."""

    def __init__(self, run: Any, records: Any, label2id: dict[Any, int]):
        self.run, self.records, self.label2id = run, records, label2id
        self._batches: dict[str, list[dict[str, Any]]] = {}

    def batches(self, tokenizer_dir: Path) -> list[dict[str, Any]]:
        from compress.data.collate import text_batches
        from compress.models.loading import load_preprocessor

        key = str(tokenizer_dir)
        if key not in self._batches:
            tok = load_preprocessor(key)
            self._batches[key] = list(text_batches(self.records, tok, batch_size=64, max_length=self.run.model.max_length,
                                                   label2id=self.label2id))
        return self._batches[key]

    def correct(self, path: Path, tokenizer_dir: Path) -> Any:
        import numpy as np

        from compress.onnx.runtime import make_session, run_session
        from compress.passes.common import model_inputs

        sess = make_session(path, threads=self.run.target.threads)
        hits = []
        for b in self.batches(tokenizer_dir):
            logits = next(iter(run_session(sess, model_inputs(b)).values()))
            hits.append(np.argmax(logits, -1) == b["labels"].numpy())
        return np.concatenate(hits).astype(np.float64)


def calibration_batches(run: Any, teacher_dir: Path) -> list[dict[str, Any]]:
    """The run's calibration split (else train) as the ptq pass reads it: its batch size and example count."""
    from compress.models.loading import load_preprocessor
    from compress.passes.base import DataProvider
    from compress.passes.common import first_split, model_inputs, task_batches
    from compress.passes.ptq import PTQConfig

    ptq = next((s.options() for s in run.passes if s.type == "ptq"), {})
    pcfg = PTQConfig(**{k: v for k, v in ptq.items() if k in PTQConfig.model_fields})
    ctx = PassContext(run=run, label="bench", out_dir=teacher_dir, work_dir=teacher_dir, seed=run.seed,
                      data=DataProvider(run))
    split = first_split(ctx, "calibration", "train")
    pre = load_preprocessor(str(teacher_dir))
    return [model_inputs(b) for b in task_batches(ctx, split, pre, batch_size=pcfg.batch_size,
                                                  limit=pcfg.calibration_examples)]


def interleaved_p50s(files: dict[str, Path], inputs: dict[str, dict[str, Any]], target: Any, rounds: int,
                     runs: int) -> dict[str, list[float]]:
    """Per round, every file's p50 (compress.onnx.runtime.measure_latency_rounds, one round per call: fresh warm
    sessions; the order rotates from round to round)."""
    from compress.onnx.runtime import measure_latency_rounds

    names = list(files)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        got = measure_latency_rounds({n: files[n] for n in order}, inputs, provider=target.provider,
                                     threads=target.threads, warmup=max(5, target.warmup), runs=runs, rounds=1)
        for n in names:
            out[n].append(got[n]["p50_ms"])
        print(f"latency round {r + 1}/{rounds}: " + ", ".join(f"{n} {out[n][-1]:.2f} ms" for n in names),
              file=sys.stderr)
    return out


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "load_start": os.getloadavg()}


# ---------------------------------------------------------------------------------------------------- table
def ratios(p50s: dict[str, list[float]], ref: str, name: str) -> float:
    """Median over rounds of ref's p50 / name's p50 (> 1: name is faster)."""
    return statistics.median(a / b for a, b in zip(p50s[ref], p50s[name]))


def goal_lines(row5: dict[str, Any]) -> list[tuple[str, bool]]:
    g = GOALS
    return [
        (f"latency {row5['latency_x']:.2f}x lower than row 1 (goal >= {g['latency_x']:g}x)", row5["latency_x"] >= g["latency_x"]),
        (f"size {row5['size_x']:.2f}x smaller than row 1 (goal >= {g['size_x']:g}x)", row5["size_x"] >= g["size_x"]),
        (f"accuracy {row5['accuracy_pts']:+.2f} points vs row 1 (goal >= {g['accuracy_pts']:+g})",
         row5["accuracy_pts"] >= g["accuracy_pts"]),
        (f"latency {row5['vs_row2']:.2f}x lower than row 2 (goal >= {g['vs_row2']:g}x)", row5["vs_row2"] >= g["vs_row2"]),
    ]


HEAD = ("#", "model", "accuracy", "Δ acc (pts)", "size MB", "p50 ms", "latency x", "size x", "vs row 2")


def cells(i: int, r: dict[str, Any]) -> list[str]:
    return [str(i), r["label"], f"{r['accuracy']:.4f}", f"{r['accuracy_pts']:+.2f}", f"{r['size_mb']:.2f}",
            f"{r['p50_ms']:.2f}", f"{r['latency_x']:.2f}x", f"{r['size_x']:.2f}x", f"{r['vs_row2']:.2f}x"]


def markdown(result: dict[str, Any]) -> str:
    """The results section of benchmarks/README.md: command, machine, the table, the goals, the notes."""
    m = result["machine"]
    lines = [f"### Results ({result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} logical cores; onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
             f"Python {m['python']}; load average {', '.join(f'{x:.2f}' for x in m['load_start'])} at the start, "
             f"{', '.join(f'{x:.2f}' for x in m['load_end'])} at the end (other jobs shared the machine).", "",
             result["title"], "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for i, r in enumerate(result["rows"], 1):
        lines.append("| " + " | ".join(cells(i, r)) + " |")
    lines += ["", "Goal (row 5 against rows 1 and 2):", ""]
    lines += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in result["goals"]]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_readme(path: Path, body: str) -> None:
    """Replace the text between the BEGIN / END markers of `path` with `body` (appended with the markers when they
    are missing), written to a temp file in the same folder and renamed into place."""
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        new = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    elif BEGIN in text or END in text:
        raise InputError(f"{path}: only one of the benchmark's markers is there; restore both or remove the one left")
    else:
        new = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def notes_for(rows: list[dict[str, Any]], goals: list[tuple[str, bool]], extra: list[str],
              passes: list[str] | None = None) -> list[str]:
    """The notes under the table; `passes`: the types of the run's passes (what would close a gap depends on them)."""
    r5, r4 = rows[4], rows[3]
    notes = list(extra)
    short = [text for text, ok in goals if not ok]
    shrunk = bool({"search", "prune"} & set(passes or []))
    if short:
        notes.append("Short of the goal: " + "; ".join(short) + ".")
        if r5["latency_x"] < GOALS["latency_x"] or r5["vs_row2"] < GOALS["vs_row2"] or r5["size_x"] < GOALS["size_x"]:
            if not shrunk:
                notes.append("What would close it: a smaller student. A layer-dropped student keeps the teacher's "
                             "hidden size, FFN width and full vocabulary (the int8 embeddings alone are a large share of "
                             "its file); the search pass under a latency/size budget and the learned prune pass (heads, "
                             "FFN, hidden, vocabulary) shrink those, with distill and qat recovering accuracy.")
            else:
                notes.append("What would close it: the student is already searched and pruned, so a tighter budget "
                             "(search `min_speedup`, a lower prune `target`), paid for in accuracy, or longer recovery "
                             "(the config's `full` profile) to pay for it.")
            if r4["p50_ms"] < r5["p50_ms"]:
                notes.append(f"Row 4 (dynamic int8) runs {r5['p50_ms'] / r4['p50_ms']:.2f}x faster than row 5 at the "
                             "same shape. If row 5 is a static QDQ graph (qat, static ptq): it runs its "
                             "QuantizeLinear and bias Add nodes outside the int8 kernels, where dynamic int8 fuses them "
                             "(docs/quantization.md); evaluate's `ship: fastest` picks between the run's int8 files by "
                             "its own, shorter timing. Gaps of a few percent are within this benchmark's noise.")
        if r5["accuracy_pts"] < GOALS["accuracy_pts"]:
            notes.append("Accuracy: longer distillation (more epochs) or qat after it would recover points.")
    else:
        notes.append("Every goal holds on this run.")
    return notes


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoConfig

    from compress.models.loading import load_model
    from compress.onnx.baselines import teacher_baselines
    from compress.onnx.runtime import onnx_size_mb
    from compress.tasks import get_task

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder (exports/<name>)")
    ap.add_argument("--config", default=None, help="the run's config; without --run the pipeline runs first")
    ap.add_argument("--cache", type=Path, default=None, help="the run's cache folder (default: <run>/.cache)")
    ap.add_argument("--eval", type=int, default=3000, help="eval examples, the same for every row (>= 3000)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds")
    ap.add_argument("--runs", type=int, default=100, help="timed runs per row and round")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--write-readme", action="store_true", help="replace the results section of benchmarks/README.md")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    command = "python benchmarks/pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        if args.eval < 3000:
            print(f"--eval {args.eval}: claims of <= 1 accuracy point need >= 3000 examples; the table says so",
                  file=sys.stderr)
        if args.run is None and args.config is None:
            raise InputError("give --run exports/<name> (a finished run) or --config <model.yaml> (run it first)")
        mach = machine()
        if args.run is None:
            from compress.pipeline import run as run_pipeline

            res = run_pipeline(args.config, [f"cache_dir={args.cache}"] if args.cache else None, progress=True)
            if res.exit_code not in (0, 3):
                raise SystemExit(f"{args.config}: exit {res.exit_code}: {res.error}")
            args.run = res.output_dir
        run_dir = args.run.resolve()
        run, report, cache = load_run(run_dir, args.config, args.cache)
        task = get_task(run.model.task)
        if not task.has_classes or run.model.task != "sequence-classification":
            raise InputError(f"model.task: {run.model.task}: this benchmark scores sequence classification (accuracy)")
        work = (args.work or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))).resolve()
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        copy_cache(cache, work / "cache")

        # row 4 first (the long part), through compress's pipeline on the cache copy
        plain = build_plain_student(run, report, work / "cache", work)
        print(f"row 4: plain student trained {plain.info['steps']} steps in {time.time() - t0:.0f} s", file=sys.stderr)

        # rows 1-3: the teacher baselines (compress.onnx.baselines)
        last = Artifact.load(work / "cache" / report["passes"][-1]["cache_key"], work / "cache")
        if last is None or last.teacher_dir is None:
            raise InputError(f"{cache}: the run's last cache entry is missing; give the run's --cache")
        teacher_dir = Path(last.teacher_dir)
        teacher = load_model(str(teacher_dir), run.model.task)
        plain_t = teacher_baselines(teacher_dir, run.model.task, work / "teacher-plain", run.target, methods=("fp32",),
                                    model=teacher, optimize=False)[0]
        made = teacher_baselines(teacher_dir, run.model.task, work / "teacher-optimized", run.target,
                                 methods=("fp32", "dynamic", "static"), calibration=calibration_batches(run, teacher_dir),
                                 model=teacher)
        opt_t, dyn_t, sta_t = made
        shipped = shipped_file(run_dir, report)

        # the same eval tweets for every row
        records, label2id, ev = eval_records(run, args.eval)
        scorer = Scorer(run, records, label2id)
        cand = {  # label, file, model folder (tokenizer, config)
            "plain": (f"teacher fp32 (ORT, plain export)", plain_t.path, teacher_dir),
            "optimized": (f"teacher fp32 (ORT, {'transformer optimizer' if opt_t.fused else 'optimizer refused: unfused'})",
                          opt_t.path, teacher_dir),
            "dynamic": ("teacher int8 dynamic (ORT, optimized graph)", dyn_t.path, teacher_dir),
            "static": ("teacher int8 static QDQ U8S8 (calibrated)", sta_t.path, teacher_dir),
            "plain-student": (f"plain student int8 dynamic (labels only, no teacher)", plain.int8, plain.model_dir),
            "compress": (f"compress student int8 ({shipped.name})", shipped, run_dir / "model"),
        }
        hits = {k: scorer.correct(p, d) for k, (_, p, d) in cand.items()}
        print(f"scored {ev['examples']} eval examples: " + ", ".join(f"{k} {v.mean():.4f}" for k, v in hits.items()),
              file=sys.stderr)

        # latency: all candidates interleaved in one process
        t = run.target
        inputs = {k: task.synthetic_inputs(AutoConfig.from_pretrained(d), batch_size=t.batch_size, seq_len=t.seq_len)
                  for k, (_, _, d) in cand.items()}
        p50s = interleaved_p50s({k: p for k, (_, p, _) in cand.items()}, inputs, t, args.rounds, args.runs)
        fp32_speed = ratios(p50s, "plain", "optimized")  # > 1: the optimized graph is faster
        row1 = "optimized" if fp32_speed >= 1 else "plain"
        other = "plain" if row1 == "optimized" else "optimized"
        keys = [row1, "dynamic", "static", "plain-student", "compress"]
        ref_mb = onnx_size_mb(cand[row1][1])
        rows = []
        for k in keys:
            label, path, _ = cand[k]
            rows.append({"key": k, "label": label, "file": str(path), "accuracy": float(hits[k].mean()),
                         "accuracy_pts": 100 * float(hits[k].mean() - hits[row1].mean()),
                         "size_mb": onnx_size_mb(path), "p50_ms": statistics.median(p50s[k]),
                         "p50_rounds": p50s[k], "latency_x": ratios(p50s, row1, k),
                         "size_x": ref_mb / onnx_size_mb(path), "vs_row2": ratios(p50s, "dynamic", k)})
        goals = goal_lines(rows[4])
        d = hits["compress"] - hits[row1]
        se = 100 * float(d.std(ddof=1) / np.sqrt(len(d)))
        extra = [
            f"Row 1 is the {'optimized' if row1 == 'optimized' else 'plain'} fp32 export: the {other} one ran at "
            f"p50 {statistics.median(p50s[other]):.2f} ms ({'optimized' if row1 == 'optimized' else 'plain'} / {other} "
            f"speed {max(fp32_speed, 1 / fp32_speed):.2f}x, median of rounds); the optimizer "
            f"{'fused the graph (attention / LayerNorm / GELU)' if opt_t.fused else 'was not applied (parity or family)'}.",
            f"Eval: the first {ev['examples']} examples of data.eval ({ev['path']}, fraction {ev['fraction']}), the same "
            f"for every row, held out from training ({ev['same_text_in_train']} of them have a text identical to a "
            f"training tweet: duplicates in the source). Row 5 - row 1: {100 * float(d.mean()):+.2f} ± {se:.2f} points "
            "(paired standard error).",
            f"Row 5 - row 4 (distillation against labels-only fine-tuning of the same shape): "
            f"{100 * float((hits['compress'] - hits['plain-student']).mean()):+.2f} ± "
            f"{100 * float((hits['compress'] - hits['plain-student']).std(ddof=1) / np.sqrt(len(d))):.2f} points.",
            f"Row 4: initialised from {plain.info['init']}, fine-tuned on the labels alone for {plain.info['steps']} steps "
            f"of {plain.info['batch_size']} ({plain.info['examples']} examples, what the run's distillation passes saw); "
            f"same shape as row 5 ({_shape(plain.model_dir)} vs {_shape(run_dir / 'model')})."
            + (f" Not cache hits (the teacher was trained again): {plain.info['missed']}." if plain.info["missed"] else ""),
            f"Latency: ORT p50 at batch {t.batch_size}, seq {t.seq_len}, {t.threads} threads, {t.provider}; {args.rounds} "
            f"rounds of {args.runs} runs per row, rows interleaved in one process; ratios are medians of per-round "
            "ratios, p50 ms the median of the rounds' p50s.",
        ]
        if ev["examples"] < 3000:
            extra.append(f"Only {ev['examples']} eval examples: differences under ~1.4 points are noise.")
        mach["load_end"] = os.getloadavg()
        title = (f"{run.name}: the compress pipeline against the teacher in ORT, {ev['examples']} eval examples; "
                 f"ORT p50 batch {t.batch_size}, seq {t.seq_len}, {t.threads} threads")
        result = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "command": command, "machine": mach,
                  "title": title, "rows": rows, "goals": goals, "notes": notes_for(rows, goals, extra, [p["type"] for p in report["passes"]]),
                  "work": str(work)}
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    table = Table(title=title)
    for col in HEAD:
        table.add_column(col, justify="left" if col in ("#", "model") else "right")
    for i, r in enumerate(rows, 1):
        table.add_row(*cells(i, r))
    con = Console(width=170)
    con.print(table)
    con.print("Goal (row 5 against rows 1 and 2):")
    for text, ok in goals:
        con.print(f"  {'met' if ok else 'NOT met'}: {text}")
    for n in result["notes"]:
        con.print(f"- {n}")
    con.print(f"Machine: {mach['cpu']}, {mach['cores']} cores, onnxruntime {mach['onnxruntime']}, torch {mach['torch']}, "
              f"load {mach['load_start']} -> {mach['load_end']}; outputs under {work}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.write_readme:
        write_readme(args.readme, markdown(result))
        con.print(f"wrote the results section of {args.readme}")
    return 0


def _shape(model_dir: Path) -> str:
    """layers / hidden / heads / FFN / vocabulary of a model folder, and its parameter count."""
    from transformers import AutoConfig

    from compress.models.loading import count_params, load_model

    cfg = AutoConfig.from_pretrained(model_dir)
    params = count_params(load_model(str(model_dir), "sequence-classification"))
    return (f"{getattr(cfg, 'num_hidden_layers', '?')} layers, hidden {getattr(cfg, 'hidden_size', '?')}, "
            f"vocab {getattr(cfg, 'vocab_size', '?')}, {params:,} params")


if __name__ == "__main__":
    raise SystemExit(main())
