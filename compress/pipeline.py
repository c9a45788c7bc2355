"""The Engine: runs the passes of a RunConfig in order with a content-addressed cache, resume,
gates and exit codes (DESIGN.md, Data flow and Interfaces).

Cache layout under `cache_path`:
  <key>/            one finished step (artifact.json + the files it made); immutable once renamed into place
  tmp/<key>-<pid>/  a step being written; renamed to <key>/ on success, removed on failure or Ctrl-C
  work/<key>/       a step's persistent scratch (training checkpoints), kept after a crash so a rerun
                    resumes, removed once the step succeeds
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.artifact import Artifact
from compress.config import RunConfig, validate_pass_configs
from compress.errors import CompressError, ConfigError, GateFailed, InputError, NotCached, PassFailed
from compress.passes.base import DataProvider, Pass, PassConfig, PassContext, Progress, stable_hash
from compress.contracts import Kind, check_order
from compress.registry import all_passes, get_pass
from compress.report.records import StepRecord
from compress.tasks import get_task

log = logging.getLogger(__name__)

LOAD_VERSION = "2"  # 2: keeps the sentence-transformers files of the model folder
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass
class RunResult:
    exit_code: int
    output_dir: Path
    report: dict[str, Any]
    artifact: Artifact | None
    error: str | None = None


def _hash_path(path: Path) -> str:
    """Content hash of a file or folder (names and bytes), to key the cache on the teacher's files."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _owner_alive(name: str) -> bool:
    """Whether the process that names a tmp entry (`<key>-<pid>-<uuid>`) is another live process."""
    parts = name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) == os.getpid():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _rebase(art: Artifact, old: Path, new: Path) -> Artifact:
    def fix(p: Path | None) -> Path | None:
        if p is None:
            return None
        try:
            return new / Path(p).resolve().relative_to(old.resolve())
        except ValueError:
            return p

    return art.replace(
        model_dir=fix(art.model_dir),
        teacher_dir=fix(art.teacher_dir),
        models=[dataclasses.replace(m, path=fix(m.path)) for m in art.models],
    )


class Pipeline:
    """Python API. `Pipeline(run_config).run()`, or a list of passes plus the rest of a config as keywords:

        Pipeline([{"type": "export"}, Evaluate(EvaluateConfig())], name="x",
                 model={"path": "my/model", "task": "sequence-classification"}, data={...}).run()

    List items are dicts as in model.yaml or Pass instances (their classes are registered on the way)."""

    def __init__(
        self,
        run: RunConfig | list[Any],
        *,
        use_cache: bool = True,
        from_pass: str | None = None,
        until: str | None = None,
        progress: bool = True,
        nproc: int = 1,
        lookup_only: bool = False,
        **config: Any,
    ):
        if not isinstance(run, RunConfig):
            run = _config_from_passes(run, config)
        elif config:
            raise TypeError(f"Pipeline(RunConfig) takes no config keywords; got {sorted(config)}")
        self.run_config = run
        self.use_cache = use_cache
        self.from_pass = from_pass
        self.until = until
        self.progress_enabled = progress
        if nproc < 1:
            raise ConfigError(f"--nproc {nproc}: the number of training processes must be at least 1")
        self.nproc = nproc
        self.lookup_only = lookup_only  # `compress run --check-only` (compress/check.py): a cache miss raises NotCached
        self.labels = run.pass_labels()
        for flag, value in (("--from", from_pass), ("--until", until)):
            if value is not None and value not in self.labels:
                raise ConfigError(f"{flag} {value}: no such pass; the passes are {', '.join(self.labels)}")
        self.cache = run.cache_path
        self.output = run.output_dir

    # ------------------------------------------------------------------ entry
    def run(self) -> RunResult:
        run = self.run_config
        file = str(run.source) if run.source else "<config>"
        passes = check_pipeline(run, file)

        self.output.mkdir(parents=True, exist_ok=True)
        (self.cache / "tmp").mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        log_path = self.output / "compress.log"
        handler = logging.FileHandler(log_path, mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger("compress")
        root.addHandler(handler)
        root.setLevel(min(root.level or logging.INFO, logging.INFO))

        data = DataProvider(run)
        records: list[StepRecord] = []
        started = time.time()
        artifact: Artifact | None = None
        exit_code, error = EXIT_OK, None
        try:
            with Progress(self.progress_enabled) as progress:
                artifact = self._load_teacher(data)
                stop = False
                force = not self.use_cache
                for label, spec, p in zip(self.labels, run.passes, passes):
                    rec = StepRecord(label, p.type, p.version, p.config.model_dump(mode="json"))
                    records.append(rec)
                    if stop:
                        rec.status = "skipped"
                        continue
                    if label == self.from_pass:
                        force = True
                    artifact = self._step(artifact, p, rec, data, progress, force)
                    if label == self.until:
                        stop = True
        except KeyboardInterrupt:
            exit_code, error = EXIT_INTERRUPTED, "interrupted; rerun the same command to resume from the cache"
        except InputError as err:
            exit_code, error = EXIT_INPUT, str(err)
        except PassFailed as err:
            exit_code, error = EXIT_INTERNAL, f"{err} (log: {log_path})"
        except CompressError as err:
            exit_code, error = err.exit_code, str(err)
        except Exception as err:  # an internal error: name the pass and where the traceback went
            failing = next((r.label for r in reversed(records) if r.status == "failed"), "load")
            log.error("internal error in pass '%s':\n%s", failing, traceback.format_exc())
            exit_code = EXIT_INTERNAL
            error = f"internal error in pass '{failing}': {type(err).__name__}: {err} (traceback in {log_path})"
        finally:
            root.removeHandler(handler)
            handler.close()

        from compress.report.render import build_report
        from compress.report.write import write_outputs

        partial = any(r.status == "skipped" for r in records)  # --until: unmeasured gates are skipped, not failed
        gates = evaluate_gates(run, artifact, partial=partial) if artifact is not None and exit_code == EXIT_OK else []
        if exit_code == EXIT_OK and any(g["passed"] is False for g in gates):
            failed = [g["name"] for g in gates if g["passed"] is False]
            exit_code = EXIT_GATE
            error = gate_error(gates)
            log.info("gates failed: %s", failed)
        report = build_report(run, records, gates, artifact, exit_code, error, started)
        if exit_code in (EXIT_OK, EXIT_GATE) or artifact is not None:
            write_outputs(self.output, report, artifact, records)
        return RunResult(exit_code, self.output, report, artifact, error)

    # ------------------------------------------------------------------ steps
    def _clean_tmp(self) -> None:
        """Remove what killed runs left in tmp/; an entry of a run still alive (another process sharing this cache,
        named `<key>-<pid>-<uuid>` by _commit) is left alone."""
        for leftover in (self.cache / "tmp").iterdir():
            if not _owner_alive(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)

    def _commit(self, key: str, build: Any) -> Artifact:
        """Build a cache entry in tmp/ and rename it into place; nothing partial survives a failure."""
        tmp = self.cache / "tmp" / f"{key[:24]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final = self.cache / key
        tmp.mkdir(parents=True)
        try:
            art: Artifact = build(tmp)
            art = _rebase(art, tmp, final)
            art.key = key
            art.save(tmp, self.cache)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            return art
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load_teacher(self, data: DataProvider) -> Artifact:
        """Step 0: resolve `model` into a local HF folder in the cache (the teacher, and the first student)."""
        from compress.models.loading import load_model, load_preprocessor, load_python_factory, resolve_source
        from compress.models.loading import save_model

        run = self.run_config
        kind, source = resolve_source(run.model.path, run.base_dir)
        if kind in ("folder", "config"):
            source_fp = _hash_path(Path(source))
        elif kind == "python":
            module = __import__(source.split(":")[0], fromlist=["_"])
            source_fp = _hash_path(Path(module.__file__)) if getattr(module, "__file__", None) else source
        else:
            source_fp = f"{source}@{run.model.revision}"
        label2id = data.label2id() if get_task(run.model.task).has_classes else None
        key = stable_hash(
            {
                "stage": "load",
                "version": LOAD_VERSION,
                "model": run.model.model_dump(mode="json"),
                "source": source_fp,
                "labels": sorted(map(str, label2id)) if label2id else None,
            }
        )
        cached = Artifact.load(self.cache / key, self.cache) if self.use_cache else None
        if cached is not None:
            log.info("load: cached (%s)", key[:12])
            return cached
        if self.lookup_only:
            raise NotCached("load", key, self.cache)

        def build(out: Path) -> Artifact:
            import torch

            torch.manual_seed(run.seed)  # a new task head is randomly initialised: same seed, same head
            if kind == "python":
                model, pre = load_python_factory(source)
            elif kind == "config":  # random weights from a config file (training from scratch)
                from compress.models.scratch import build_from_config

                model, pre = build_from_config(Path(source), run.model.task, run.model.tokenizer, run.base_dir)
            else:
                model = load_model(
                    source,
                    run.model.task,
                    label2id={str(k): v for k, v in label2id.items()} if label2id else None,
                    revision=run.model.revision,
                    trust_remote_code=run.model.trust_remote_code,
                )
                pre = load_preprocessor(run.model.tokenizer or source, run.model.revision)
            folder = save_model(model, pre, out / "model")
            if kind == "folder":
                from compress.embed.hooks import copy_st_files

                copy_st_files(source, folder)
            return Artifact(task=run.model.task, model_dir=folder, teacher_dir=folder)

        log.info("load: %s (%s)", run.model.path, kind)
        return self._commit(key, build)

    def _step(
        self, artifact: Artifact, p: Pass, rec: StepRecord, data: DataProvider, progress: Progress, force: bool
    ) -> Artifact:
        run = self.run_config
        fields = {
            "input": artifact.key,
            "type": p.type,
            "version": p.version,
            "config": rec.config,
            "data": data.fingerprint(p.uses_data),
            "target": run.target.model_dump(mode="json") if getattr(p, "uses_target", False) else None,
            "seed": run.seed,
            "label": rec.label,
        }
        reads = p.reads_from_run(run)
        if reads is not None:  # only then: the keys of passes reading nothing else stay as they were
            fields["reads"] = reads
        if run.target.edge is not None and getattr(p, "uses_edge", False):  # only then: server keys stay as they were
            from compress.onnx.edge import profile

            fields["edge"] = profile(run)
        key = stable_hash(fields)
        rec.key = key
        if not force:
            cached = Artifact.load(self.cache / key, self.cache)
            if cached is not None:
                rec.status = "cached"
                hist = next((h for h in reversed(cached.history) if h.get("key") == key), {})
                rec.duration_s = hist.get("duration_s", 0.0)
                rec.metrics = cached.metrics.get(rec.label, {})
                rec.events = hist.get("events", [])
                log.info("%s: cached (%s)", rec.label, key[:12])
                return cached
        if self.lookup_only:
            raise NotCached(rec.label, key, self.cache)

        work = self.cache / "work" / key
        work.mkdir(parents=True, exist_ok=True)
        seed = int(stable_hash([run.seed, rec.label])[:8], 16)
        log.info("%s: running (%s)", rec.label, key[:12])
        t0 = time.time()
        ctx_holder: dict[str, PassContext] = {}

        def build(out: Path) -> Artifact:
            ctx = PassContext(
                run=run, label=rec.label, out_dir=out, work_dir=work, seed=seed, data=data, progress=progress,
                nproc=self.nproc,
            )
            ctx_holder["ctx"] = ctx
            ctx.seed_everything()
            new = p.run(artifact, ctx)
            rec.duration_s = round(time.time() - t0, 3)
            rec.metrics = {**new.metrics.get(rec.label, {}), **ctx.metrics}
            rec.events = ctx.events
            new = new.replace()
            new.metrics[rec.label] = rec.metrics
            new.history.append(
                {"label": rec.label, "type": p.type, "key": key, "duration_s": rec.duration_s, "events": ctx.events}
            )
            return new

        try:
            new = self._commit(key, build)
        except BaseException as err:
            rec.status = "failed"
            rec.duration_s = round(time.time() - t0, 3)
            rec.error = f"{type(err).__name__}: {err}"
            if "ctx" in ctx_holder:
                rec.events = ctx_holder["ctx"].events
            raise
        shutil.rmtree(work, ignore_errors=True)
        rec.status = "ran"
        log.info("%s: done in %.1fs", rec.label, rec.duration_s)
        return new


def _config_from_passes(passes: list[Any], config: dict[str, Any]) -> RunConfig:
    from compress.config import parse_config
    from compress.registry import register

    entries: list[dict[str, Any]] = []
    for item in passes:
        if isinstance(item, Pass):
            register(type(item))
            entries.append({"type": item.type, **item.config.model_dump(mode="json", exclude_unset=True)})
        elif isinstance(item, dict):
            entries.append(dict(item))
        else:
            raise ConfigError(f"Pipeline: pass entries are dicts or Pass instances, not {type(item).__name__}")
    return parse_config({**config, "passes": entries}, file="Pipeline(...)")


# ---------------------------------------------------------------------------------------- checks
def check_pipeline(run: RunConfig, file: str) -> list[Pass]:
    """The run's passes, built from their typed configs, once every check that needs no model holds: each
    pass's config and `validate`, the order from the passes' declared contracts, and that each gate is measured.
    `compress validate` and `compress run` (before anything starts) both run it."""
    typed = validate_pass_configs(run, file)
    passes: list[Pass] = [get_pass(spec.type)(cfg) for spec, cfg in zip(run.passes, typed)]
    for i, p in enumerate(passes):
        problem = p.validate(run)
        if problem:
            raise ConfigError(f"{file}: passes[{i}] ({p.type}): {problem}")
    check_order(passes, run.pass_labels(), file, all_passes())
    if run.target.edge is not None or run.gates.min_ep_coverage or run.gates.max_ep_partitions:
        from compress.onnx.edge import check_profile

        check_profile(run, file)  # fixed shapes, known EP names (docs/edge.md)
    check_gates_measurable(run, passes, file)
    return passes


# ---------------------------------------------------------------------------------------- gates
def check_gates_measurable(run: RunConfig, passes: list[Pass], file: str) -> None:
    g = run.gates
    made = {kind for p in passes for kind in p.produces}
    needs_eval = [n for n in ("max_quality_drop", "max_latency_ms", "min_latency_x", "min_size_x", "min_fidelity",
                              "min_retrieval_agreement",
                              "max_perplexity_increase", "min_top1_agreement", "min_ep_coverage", "max_ep_partitions")
                  if getattr(g, n) is not None]
    if needs_eval and Kind.EVALUATION not in made:
        raise ConfigError(
            f"{file}: gates.{needs_eval[0]}: nothing measures it; add {{type: evaluate}} to passes or remove the gate"
        )
    for name in ("min_latency_x", "min_size_x"):
        off = [p for p in passes if p.type == "evaluate" and not getattr(p.config, "teacher_baselines", True)]
        if getattr(g, name) is not None and off:
            raise ConfigError(f"{file}: gates.{name}: needs the teacher's ONNX baseline; set teacher_baselines: true "
                              f"on the evaluate pass or remove the gate")
    if g.max_size_mb is not None and Kind.ONNX not in made:
        raise ConfigError(f"{file}: gates.max_size_mb: no ONNX student is made; add {{type: export}} to passes")


def evaluate_gates(run: RunConfig, artifact: Artifact, partial: bool = False) -> list[dict[str, Any]]:
    """Verdicts of the configured gates on the final student (the primary int8 model, else fp32). A gate
    nothing measured fails, unless the run was `partial` (stopped by --until): then its verdict is None."""
    g = run.gates
    ev = artifact.evaluation
    final = artifact.shipped()
    variant = artifact.shipped_name()
    stats = ev.models.get(final.name, {}) if ev is not None and final is not None else {}
    out: list[dict[str, Any]] = []

    def gate(name: str, limit: float, value: float | None, ok: bool | None, detail: str) -> None:
        out.append({"name": name, "limit": limit, "value": value, "passed": ok, "detail": detail, "variant": variant})

    if g.max_quality_drop is not None:
        drop = stats.get("quality_drop")
        gate(
            "max_quality_drop",
            g.max_quality_drop,
            drop,
            None if drop is None else drop <= g.max_quality_drop,
            f"{ev.main_metric if ev else 'quality'} drop {drop if drop is None else round(drop, 4)} "
            f"vs limit {g.max_quality_drop}",
        )
    if g.max_latency_ms is not None:
        lat = stats.get("latency_p50_ms")
        gate("max_latency_ms", g.max_latency_ms, lat, None if lat is None else lat <= g.max_latency_ms,
             f"p50 {lat if lat is None else round(lat, 3)} ms vs limit {g.max_latency_ms} ms")
    for name, key, what in (("min_latency_x", "latency_x", "p50 speedup"), ("min_size_x", "size_x", "size reduction")):
        limit = getattr(g, name)
        if limit is not None:
            x = stats.get(key)
            gate(name, limit, x, None if x is None else x >= limit,
                 f"{what} over the fp32 ORT teacher {'not measured' if x is None else f'{x:.2f}x'} vs minimum {limit:g}x")
    if g.max_size_mb is not None:
        size = stats.get("size_mb")
        if size is None and final is not None:
            from compress.onnx.runtime import onnx_size_mb

            size = onnx_size_mb(final.path)
        gate("max_size_mb", g.max_size_mb, size, None if size is None else size <= g.max_size_mb,
             f"{size if size is None else round(size, 2)} MB vs limit {g.max_size_mb} MB")
    if g.min_fidelity is not None:
        fid = stats.get("fidelity")
        gate("min_fidelity", g.min_fidelity, fid, None if fid is None else fid >= g.min_fidelity,
             f"fidelity {fid if fid is None else round(fid, 4)} vs minimum {g.min_fidelity}")
    if g.min_retrieval_agreement is not None:
        ra = stats.get("retrieval_agreement")
        gate("min_retrieval_agreement", g.min_retrieval_agreement, ra,
             None if ra is None else ra >= g.min_retrieval_agreement,
             f"retrieval agreement {ra if ra is None else round(ra, 4)} vs minimum {g.min_retrieval_agreement}")
    if g.max_perplexity_increase is not None:  # causal-lm, quantized vs fp32 student (compress.passes.evaluate)
        inc = stats.get("perplexity_increase")
        gate("max_perplexity_increase", g.max_perplexity_increase, inc,
             None if inc is None else inc <= g.max_perplexity_increase,
             f"perplexity +{inc if inc is None else round(100 * inc, 2)}% over fp32 vs limit "
             f"{100 * g.max_perplexity_increase:g}%")
    if g.min_top1_agreement is not None:
        agr = stats.get("top1_agreement_fp32")
        gate("min_top1_agreement", g.min_top1_agreement, agr, None if agr is None else agr >= g.min_top1_agreement,
             f"top-1 agreement with fp32 {agr if agr is None else round(agr, 4)} vs minimum {g.min_top1_agreement}")
    if g.min_ep_coverage or g.max_ep_partitions:
        from compress.onnx.edge import ep_gates

        out += ep_gates(g, ev, final, artifact.fp32_onnx())
    for item in out:
        if item["passed"] is None:  # configured but not measured: a failure, unless the run stopped early
            item["passed"] = None if partial else False
            item["detail"] += " (not measured: the run stopped early)" if partial else " (not measured)"
    return out


def gate_error(gates: list[dict[str, Any]]) -> str | None:
    """The run's error line when gates failed (None when none did)."""
    failed = [f"{g['name']} ({g['detail']})" for g in gates if g["passed"] is False]
    return "gate(s) failed: " + ", ".join(failed) if failed else None


def run(config: RunConfig | str | Path, overrides: list[str] | None = None, **kwargs: Any) -> RunResult:
    """Python API: run a config (a RunConfig or the path of a model.yaml)."""
    from compress.config import load_config

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    return Pipeline(cfg, **kwargs).run()


__all__ = ["Pipeline", "RunResult", "run", "evaluate_gates", "PassConfig", "GateFailed"]
