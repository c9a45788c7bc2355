"""`compress run --check-only`: re-gate a finished run without training or exporting anything.

The gates are evaluated on the artifact the config's passes *would* produce: the engine replays the run's
cache keys in lookup-only mode (`Pipeline(lookup_only=True)`: the same keys as a real run, a miss raises
`NotCached` instead of building), so an edited gate is checked against the right models, and an edited pass,
data file or target (a new key) is exit 2 naming the pass that has no cached result. Reading the verdicts'
inputs from the run folder's report.json instead would trust whatever run wrote that folder last.

The run folder's report keeps everything but its gate verdicts, status, exit code and error, which are
replaced; report.json, report.md and junit.xml are each rewritten atomically (temp file + rename). The cache
gains no entry and no ONNX file is copied."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.config import RunConfig
from compress.errors import InputError, NotCached

log = logging.getLogger(__name__)

STATUS = {0: "passed", 3: "gate_failed"}


@dataclass
class CheckResult:
    exit_code: int  # 0 every gate holds, 3 a gate failed
    output_dir: Path
    report: dict[str, Any]
    gates: list[dict[str, Any]]
    error: str | None = None


def _rerun_hint(run: RunConfig) -> str:
    return f"run `compress run {run.source or '<config>'}` without --check-only (cached passes are reused)"


def _read_report(run: RunConfig) -> dict[str, Any]:
    f = run.output_dir / "report.json"
    if not f.is_file():
        raise InputError(f"{run.output_dir}: no report.json in the run folder (never written, or removed); "
                         f"{_rerun_hint(run)} to write it")
    try:
        report = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{f}: not a readable report ({err}); {_rerun_hint(run)} to rewrite it") from None
    if not isinstance(report, dict) or not isinstance(report.get("passes"), list):
        raise InputError(f"{f}: not a compress report (no `passes` list); {_rerun_hint(run)} to rewrite it")
    return report


def lookup(run: RunConfig) -> tuple[Any, list[tuple[str, str]]]:
    """The final artifact of `run`'s passes from the cache, and each pass's (label, cache key); builds nothing.
    InputError (exit 2) naming the first pass without a cached result."""
    from compress.passes.base import DataProvider, Progress
    from compress.pipeline import Pipeline, check_pipeline
    from compress.report.records import StepRecord

    file = str(run.source) if run.source else "<config>"
    passes = check_pipeline(run, file)
    cache = run.cache_path
    if not cache.is_dir():
        raise InputError(f"{file}: no cache at {cache} (this config never ran here, or its cache was removed); "
                         f"{_rerun_hint(run)}")
    pipe = Pipeline(run, progress=False, lookup_only=True)
    data = DataProvider(run)
    keys: list[tuple[str, str]] = []
    try:
        artifact = pipe._load_teacher(data)
        for i, (label, p) in enumerate(zip(pipe.labels, passes)):
            rec = StepRecord(label, p.type, p.version, p.config.model_dump(mode="json"))
            try:
                artifact = pipe._step(artifact, p, rec, data, Progress(False), force=False)
            except NotCached as err:
                raise InputError(f"{file}: passes[{i}] ({label}): no cached result for the current config in "
                                 f"{cache} (its config, data, target or an earlier pass changed, or the cache "
                                 f"entry was removed); {_rerun_hint(run)}") from err
            keys.append((label, rec.key or ""))
    except NotCached as err:  # the load step: model.path, the model's files or the labels changed
        raise InputError(f"{file}: model: no cached teacher for the current model and labels in {cache}; "
                         f"{_rerun_hint(run)}") from err
    return artifact, keys


def check_only(run: RunConfig) -> CheckResult:
    """Evaluate `run`'s gates on its cached artifacts and rewrite the gate section of its run folder's report."""
    from compress.pipeline import EXIT_GATE, EXIT_OK, evaluate_gates, gate_error

    report = _read_report(run)
    artifact, keys = lookup(run)
    written = [(p.get("label"), p.get("cache_key")) for p in report["passes"]]
    if written != keys:
        stale = next(((a, b) for a, b in zip(written, keys) if a != b), None)
        where = (f"pass '{stale[1][0]}' has key {str(stale[0][1])[:12]} there, {stale[1][1][:12]} for this config"
                 if stale else f"{len(written)} passes there, {len(keys)} in this config")
        raise InputError(f"{run.output_dir / 'report.json'}: written by another run ({where}); "
                         f"{_rerun_hint(run)} to rewrite the run folder")

    gates = evaluate_gates(run, artifact)
    error = gate_error(gates)
    code = EXIT_GATE if error else EXIT_OK
    report = dict(report, gates=gates, exit_code=code, status=STATUS[code], error=error,
                  gates_checked={"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "by": "compress run --check-only",
                                 "config": str(run.source) if run.source else None})
    write_gate_section(run.output_dir, report)
    log.info("check-only: %s", error or "every gate holds")
    return CheckResult(code, run.output_dir, report, gates, error)


def write_gate_section(out: Path, report: dict[str, Any]) -> None:
    """report.json, then report.md, report.html and junit.xml from it (compress.report.write.render_outputs),
    each through a temp file and a rename."""
    from compress.report.render import _atomic_write
    from compress.report.write import render_outputs

    _atomic_write(out / "report.json", json.dumps(report, indent=2, default=str))
    render_outputs(out, report)


def refuse_run_flags(args: Any) -> None:
    """--check-only builds nothing, so the flags that choose what to rebuild or how make no sense with it."""
    for flag, value in (("--no-cache", args.no_cache), ("--from", args.from_pass), ("--until", args.until),
                        ("--nproc", args.nproc)):
        if value:
            raise InputError(f"--check-only does not combine with {flag}: it re-gates the cached artifacts and "
                             "builds nothing; drop one of the two")
