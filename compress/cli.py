"""`compress run | validate | passes | bench | report | generate`.

Exit codes: 0 ok; 1 internal error (pass named, log path given); 2 bad input (one line, no traceback);
3 a gate failed (artifacts and report still written); 130 interrupted (rerun resumes from the cache)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from compress.errors import CompressError, InputError


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> int:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True)
    return code


# ---------------------------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from compress.config import load_config
    from compress.pipeline import Pipeline

    cfg = load_config(args.config, args.set, profile=args.profile)
    if args.check_only:
        return cmd_check_only(args, cfg)
    result = Pipeline(
        cfg, use_cache=not args.no_cache, from_pass=args.from_pass, until=args.until, progress=not args.quiet,
        nproc=args.nproc or 1,
    ).run()
    con = _console()
    if not args.quiet:
        _print_summary(con, result.report)
    if result.exit_code == 0:
        con.print(f"[green]ok[/]: outputs in {result.output_dir}")
    elif result.exit_code == 3:
        _console(stderr=True).print(f"[bold red]gate failed:[/] {result.error}; outputs still in {result.output_dir}")
    else:
        return _fail(result.error or "failed", result.exit_code)
    return result.exit_code


def cmd_check_only(args: argparse.Namespace, cfg: Any) -> int:
    """`compress run --check-only`: the gates on the cached artifacts (compress/check.py); 0, 3, or 2."""
    from compress.check import check_only, refuse_run_flags

    refuse_run_flags(args)
    result = check_only(cfg)
    con = _console()
    for g in result.gates:
        con.print(f"gate {g['name']}: {'[green]pass[/]' if g['passed'] else '[red]FAIL[/]'} ({g['detail']})")
    if result.exit_code == 0:
        con.print(f"[green]ok[/]: every gate holds; report rewritten in {result.output_dir}")
    else:
        _console(stderr=True).print(f"[bold red]gate failed:[/] {result.error}; report rewritten in {result.output_dir}")
    return result.exit_code


def _print_summary(con: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    from compress.report.render import shipped_variant

    t = Table(title=f"compress: {report['name']}", show_lines=False)
    for col in ("pass", "status", "seconds"):
        t.add_column(col)
    for p in report["passes"]:
        t.add_row(p["label"], p["status"], f"{p['duration_s']:.1f}")
    con.print(t)
    ev = report.get("evaluation")
    if ev:
        m = Table(title="students in ONNX Runtime")
        for col in ("model", ev.get("main_metric", "quality"), "fidelity", "p50 ms", "p90 ms", "MB"):
            m.add_column(col)
        teacher = ev.get("teacher", {})
        m.add_row("teacher (torch)", _num(teacher.get("quality")), "1", "-", "-", _num(teacher.get("size_mb")))
        variants = ev.get("variants", {})
        shipped = shipped_variant(variants)
        for name, s in variants.items():
            if "alias_of" in s:
                continue
            m.add_row(f"{name} (shipped)" if name == shipped else name, _num(s.get("quality")), _num(s.get("fidelity")), _num(s.get("latency_p50_ms")),
                      _num(s.get("latency_p90_ms")), _num(s.get("size_mb")))
        con.print(m)
    for g in report.get("gates", []):
        verdict = "skipped" if g["passed"] is None else ("[green]pass[/]" if g["passed"] else "[red]FAIL[/]")
        con.print(f"gate {g['name']}: {verdict} ({g['detail']})")


def _num(v: Any) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


# ---------------------------------------------------------------------------------------------- others
def cmd_validate(args: argparse.Namespace) -> int:
    from compress.config import load_config
    from compress.models.loading import resolve_source
    from compress.pipeline import Pipeline, check_pipeline

    cfg = load_config(args.config, args.set, profile=args.profile)
    resolve_source(cfg.model.path, cfg.base_dir)
    check_pipeline(cfg, str(args.config))
    for split in ("train", "eval", "calibration"):
        spec = getattr(cfg.data, split)
        if spec is not None and not spec.path.startswith(("package:", "python:")):
            p = cfg.resolve(spec.path)
            if not p.exists():
                raise InputError(f"{args.config}: data.{split}.path: {p} does not exist; fix the path")
    Pipeline(cfg)  # checks --from/--until style invariants of the pass list
    _console().print(f"[green]valid[/]: {args.config} ({len(cfg.passes)} passes: {', '.join(cfg.pass_labels())})")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    """Every pass (a rich table each on a terminal; plain text, nothing cut, in a pipe or a file), or one in full."""
    from compress.describe import contract_lines, describe, field_rows, find_pass, summary
    from compress.registry import all_passes

    if args.type or not sys.stdout.isatty():
        text = describe(find_pass(args.type), full=True) if args.type else "\n".join(map(describe, all_passes().values()))
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # `compress passes | head`: the reader left; not an error
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from rich.table import Table

    con = _console()
    for name, cls in all_passes().items():
        contract = "; ".join(contract_lines(cls))
        t = Table(title=f"[bold]{name}[/] (v{cls.version}) {summary(cls)}" + (f"\n  {contract}" if contract else ""),
                  title_justify="left", expand=False)
        for col in ("field", "type", "default", "description"):
            t.add_column(col, overflow="fold")
        for r in field_rows(cls.Config):
            t.add_row(r.name, r.type, r.default + (f" ({r.constraints})" if r.constraints else ""), r.description)
        con.print(t)
    con.print("`compress passes TYPE` prints one pass in full.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from compress.onnx.runtime import make_session, measure_latency, onnx_size_mb
    from compress.tasks import synthetic_inputs

    path = Path(args.model)
    if not path.is_file():
        raise InputError(f"{path}: ONNX file not found")
    sess = make_session(path, provider=args.provider, threads=args.threads)
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    if "pixel_values" in shapes:  # an image model: channels and side from the graph where it fixes them
        _, chans, side = (list(shapes["pixel_values"]) + [None] * 4)[:3]
        inputs = synthetic_inputs("image", batch_size=args.batch_size, channels=chans if isinstance(chans, int) else 3,
                                  image_size=side if isinstance(side, int) else 224)
    else:
        inputs = synthetic_inputs("text", batch_size=args.batch_size, seq_len=args.seq_len)
    stats = measure_latency(path, inputs, provider=args.provider, threads=args.threads, warmup=args.warmup, runs=args.runs)
    stats["size_mb"] = onnx_size_mb(path)
    if args.json:
        print(json.dumps(stats))
    else:
        _console().print(
            f"{path.name}: p50 {stats['p50_ms']:.3f} ms, p90 {stats['p90_ms']:.3f} ms over {stats['runs']} runs "
            f"(batch {args.batch_size}, seq {args.seq_len}, {args.provider}), {stats['size_mb']:.2f} MB"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from compress.report.write import render_outputs

    run_dir = Path(args.run_dir)
    f = run_dir / "report.json"
    if not f.is_file():
        raise InputError(f"{f}: no report.json here; pass the output folder of a `compress run`")
    try:
        report = json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{f}: not valid JSON ({err.msg} at line {err.lineno})") from None
    render_outputs(run_dir, report)
    _print_summary(_console(), report)
    _console().print(f"re-rendered {run_dir / 'report.md'}, {run_dir / 'report.html'} and {run_dir / 'junit.xml'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from compress.generate import generate_text

    text = generate_text(args.dir, args.prompt, variant=args.variant, max_new_tokens=args.max_new_tokens,
                         do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         seed=args.seed, threads=args.threads)
    print(f"{args.prompt}{'' if text.startswith(' ') else ' '}{text}" if args.echo else text)
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compress", description="Turn a transformer into a compact, verified ONNX student.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the pipeline of a model.yaml")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. passes.0.epochs=2")
    r.add_argument("--profile", metavar="NAME", help="apply the config's `profiles: {NAME: ...}` settings (e.g. full)")
    r.add_argument("--no-cache", action="store_true", help="rerun every pass, ignoring cached results")
    r.add_argument("--from", dest="from_pass", metavar="PASS", help="rerun from this pass on (earlier ones may be cached)")
    r.add_argument("--until", metavar="PASS", help="stop after this pass")
    r.add_argument("--nproc", type=int, default=None, help="training processes (torchrun DDP) for training passes")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    r.add_argument("--check-only", action="store_true",
                   help="re-evaluate the gates on the cached artifacts of an earlier run and rewrite the report's "
                   "gate section; trains and exports nothing (exit 0 pass, 3 a gate failed, 2 nothing cached)")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a model.yaml's schema and paths (fast, loads no model)")
    v.add_argument("config")
    v.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--profile", metavar="NAME", help="apply the config's `profiles: {NAME: ...}` settings")
    v.set_defaults(func=cmd_validate)

    p = sub.add_parser("passes", help="list every registered pass with its config fields, or one pass in full")
    p.add_argument("type", nargs="?", default=None, help="a pass type: print its description, contract, version and "
                   "every config field (type, default, description)")
    p.set_defaults(func=cmd_passes)

    b = sub.add_parser("bench", help="ONNX Runtime latency of an .onnx file")
    b.add_argument("model")
    b.add_argument("--batch-size", type=int, default=1)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--provider", default="CPUExecutionProvider")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--json", action="store_true", help="print the numbers as JSON")
    b.set_defaults(func=cmd_bench)

    rep = sub.add_parser("report", help="re-render report.md and junit.xml from a run folder's report.json")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)
    g = sub.add_parser("generate", help="continue a prompt with an exported decoder (KV cache) in ONNX Runtime")
    g.add_argument("dir", help="output folder of a run (its shipped decoder and model/ tokenizer), or an .onnx file")
    g.add_argument("prompt")
    g.add_argument("--variant", default=None, help="which ONNX file, e.g. int4, int8-dynamic, fp32 (default: the shipped one)")
    g.add_argument("--max-new-tokens", type=int, default=30)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    g.set_defaults(func=cmd_generate)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # the run's INFO lines go to compress.log; stderr stays quiet
        handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.func(args))
    except CompressError as err:
        return _fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
