"""Distillation loss on logits, forward + backward: eager PyTorch reference vs our fused Triton kernel vs
Liger-Kernel (when `liger_kernel` is installed), side by side: time (median of CUDA-event timings) and peak
GPU memory above the inputs, with ratios.

    python benchmarks/kd_loss.py                 # V in {32k, 128k, 256k} x tokens in {4k, 16k}, bf16
    python benchmarks/kd_loss.py --quick         # a small sweep (a minute)
    python benchmarks/kd_loss.py --fused-linear  # through the LM head: fused_linear_kd vs LigerFusedLinearJSD
    python benchmarks/kd_loss.py --tune          # our kernel only, at every (block, warps): time vs the default
    python benchmarks/kd_loss.py --static        # no GPU: registers, spills and occupancy per (block, warps)

Needs a CUDA GPU (except --static); see benchmarks/README.md for the targets.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "taid")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Cell:
    """One implementation at one shape: median ms, peak MiB above the inputs, or why it has no number."""

    ms: float | None = None
    peak_mib: float | None = None
    note: str = ""


@dataclass
class Row:
    vocab: int
    tokens: int
    loss: str = "forward_kl"
    cells: dict[str, Cell] = field(default_factory=dict)
    max_abs_diff: float | None = None  # |loss_kernel - loss_eager|


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=(*LOSSES, "all"), nargs="+", default=["forward_kl"],
                   help="which logit losses (default forward_kl; all: every one, TAID at t=--taid-t included)")
    p.add_argument("--taid-t", type=float, default=0.4, help="TAID's interpolation t")
    p.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000, 256_000], help="vocabulary sizes")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384], help="rows (batch x sequence)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype (default bf16)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5, help="JSD beta")
    p.add_argument("--alpha", type=float, default=0.1, help="skew losses' alpha")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of rows labelled ignore_index")
    p.add_argument("--fused-linear", action="store_true",
                   help="benchmark through the LM head (fused_linear_kd) instead of on logits")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size for --fused-linear")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="small sweep: V in {32k, 128k}, tokens 4k, 5 iterations")
    p.add_argument("--impls", nargs="+", default=["eager", "ours", "kernel", "liger"],
                   choices=["eager", "ours", "kernel", "liger"],
                   help="kernel: our kernel alone (default launch, gradient buffer allocated once), on logits")
    p.add_argument("--variants", nargs="+", default=None, metavar="STRATEGY:CHUNK",
                   help="--fused-linear: also time ours cut these ways, e.g. vocab:4096 rows:128 (strategy, and "
                        "columns or rows per chunk); default: the library's choice only")
    p.add_argument("--profile", action="store_true",
                   help="profile a few steps of our logits path (torch.profiler): where the time around the "
                        "kernel goes")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    p.add_argument("--tune", action="store_true",
                   help="time only our kernel at every --blocks x --warps, next to the default launch")
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: ptxas' registers, spills and resident warps per SM for every --blocks x "
                        "--warps and loss kind, compiled for --arch")
    p.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="for --tune/--static")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32], help="for --tune/--static")
    p.add_argument("--arch", type=int, default=90, help="compute capability for --static (90 = H100/H200)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of every code path at tiny sizes under TRITON_INTERPRET=1 (no timing)")
    args = p.parse_args(argv)
    if "all" in args.loss:
        args.loss = list(LOSSES)
    if args.quick:
        args.vocab = [32_000, 128_000]
        args.tokens = [4096]
        args.iters = min(args.iters, 5)
        args.warmup = min(args.warmup, 2)
    return args


def liger_module() -> Any | None:
    """The liger_kernel.transformers module, or None when Liger-Kernel is not installed."""
    try:
        import liger_kernel.transformers as liger  # type: ignore[import-not-found]
    except Exception:
        return None
    return liger


def liger_beta(loss: str, beta: float) -> float | None:
    """Liger's generalised JSD covers forward KL (beta 0), reverse KL (beta 1) and JSD; not the skew losses."""
    return {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}.get(loss)


def device_name(args: argparse.Namespace) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter: a dry run, no timing)"


def measure(step: Callable[[], None], warmup: int, iters: int) -> Cell:
    """Median time of `step` (forward + backward) and its peak memory above what was allocated before; on the
    CPU (a dry run of the script under the Triton interpreter) only that it runs."""
    if not torch.cuda.is_available():
        try:
            step()
        except Exception as exc:
            return Cell(note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}")
        return Cell(ms=0.0, peak_mib=0.0)
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return Cell(ms=statistics.median(times), peak_mib=peak)
    except torch.cuda.OutOfMemoryError:
        return Cell(note="OOM")
    except Exception as exc:  # an implementation that cannot run this case: say why, keep going
        return Cell(note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}")
    finally:
        torch.cuda.empty_cache()


def loss_kwargs(loss: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"jsd": {"beta": args.beta}, "skew_kl": {"alpha": args.alpha}, "skew_reverse_kl": {"alpha": args.alpha},
            "taid": {"t": args.taid_t}}.get(loss, {})


def logit_steps(args: argparse.Namespace, loss: str, teacher: torch.Tensor,
                labels: torch.Tensor | None) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """loss(student_logits) closures, one per implementation (each returns the loss; the caller backprops)."""
    from compress.distill import losses as L

    fn = getattr(L, loss)
    kw = loss_kwargs(loss, args)
    tau = args.temperature

    def eager(x: torch.Tensor) -> torch.Tensor:
        return fn(x, teacher, temperature=tau, labels=labels, use_kernel=False, **kw)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return fn(x, teacher, temperature=tau, labels=labels, use_kernel=True, **kw)

    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": eager, "ours": ours}
    liger = liger_module()
    beta = liger_beta(loss, args.beta)
    if liger is not None and beta is not None:
        jsd = liger.LigerJSD(beta=beta, ignore_index=-100)

        def liger_step(x: torch.Tensor) -> torch.Tensor:
            # Liger takes log-probabilities: the log_softmax of both sides is part of its cost here, as our
            # API takes raw logits. Temperature by scaling the logits; tau^2 as in our convention.
            log_q = torch.log_softmax(x / tau, dim=-1)
            log_p = torch.log_softmax(teacher / tau, dim=-1)
            return jsd(log_q, log_p, labels) * (tau * tau)

        out["liger"] = liger_step
    return out


def kernel_alone(args: argparse.Namespace, loss: str, student: torch.Tensor, teacher: torch.Tensor,
                 labels: torch.Tensor | None) -> Callable[[], None]:
    """Our kernel launched directly at its default launch on a gradient buffer allocated once: the floor the
    API path (checks, allocation, autograd) is measured against."""
    from compress.distill.losses import _resolve_kind
    from compress.kernels import KERNEL_KINDS
    from compress.kernels.kd_loss import kd_loss_rows

    name, c_t, c_s = _resolve_kind("forward_kl" if loss == "taid" else loss, args.beta, args.alpha, "--loss")
    grad = torch.empty_like(student)
    n_valid: torch.Tensor | float = float(student.shape[0])
    if labels is not None:
        n_valid = (labels != -100).sum().clamp_min(1).float().reshape(1)
    mix = args.taid_t if loss == "taid" else None
    return lambda: kd_loss_rows(student, teacher, kind=KERNEL_KINDS[name], n_valid=n_valid, grad=grad,
                                temperature=args.temperature, c_teacher=c_t, c_student=c_s, mix=mix, labels=labels)


def fused_linear_steps(args: argparse.Namespace, loss: str, hidden_s: torch.Tensor, weight_s: torch.Tensor,
                       hidden_t: torch.Tensor, weight_t: torch.Tensor,
                       labels: torch.Tensor | None) -> dict[str, Callable[..., torch.Tensor]]:
    """eager, liger and ours (one column per --strategies x --chunks, else the library's default)."""
    from compress.distill import losses as L

    kw = dict(kind=loss, beta=args.beta, alpha=args.alpha, taid_t=args.taid_t, temperature=args.temperature,
              labels=labels)
    out: dict[str, Callable[..., torch.Tensor]] = {
        "eager": lambda h, w: L.fused_linear_kd(h, w, (hidden_t, weight_t), use_kernel=False, **kw),
    }
    variants: list[tuple[str | None, int | None]] = [(None, None)]
    for spec in args.variants or []:
        strategy, _, chunk = spec.partition(":")
        variants.append((strategy, int(chunk) if chunk else None))
    for strategy, chunk in variants:
        name = "ours" if strategy is None else f"ours {strategy}" + (f" {chunk}" if chunk else "")

        def ours(h: torch.Tensor, w: torch.Tensor, strategy: str | None = strategy, chunk: int | None = chunk):
            return L.fused_linear_kd(h, w, (hidden_t, weight_t), use_kernel=True, strategy=strategy or "auto",
                                     chunk_size=chunk, **kw)

        out[name] = ours
    liger = liger_module()
    beta = liger_beta(loss, args.beta)
    if liger is not None and beta is not None and hasattr(liger, "LigerFusedLinearJSD"):
        try:
            mod = liger.LigerFusedLinearJSD(jsd_beta=beta, ignore_index=-100, temperature=args.temperature)
        except TypeError:  # older releases have no ignore_index
            mod = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=args.temperature)

        def liger_step(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return mod(h, w, hidden_t, weight_t, labels)  # shift_labels has no default (0.8.x); None = all rows

        out["liger"] = liger_step
    return out


def run_case(args: argparse.Namespace, loss: str, vocab: int, tokens: int) -> Row:
    dtype = DTYPES[args.dtype]
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    row = Row(vocab=vocab, tokens=tokens, loss=loss)
    labels = None
    if args.ignore_frac > 0:
        labels = torch.randint(0, vocab, (tokens,), device=dev, generator=gen)
        labels[torch.rand(tokens, device=dev, generator=gen) < args.ignore_frac] = -100
    losses: dict[str, torch.Tensor] = {}
    if args.fused_linear:
        h = args.hidden
        hs = torch.randn(tokens, h, device=dev, dtype=dtype, generator=gen)
        ws = (torch.randn(vocab, h, device=dev, dtype=dtype, generator=gen) * h**-0.5)
        ht = torch.randn(tokens, h, device=dev, dtype=dtype, generator=gen)
        wt = (torch.randn(vocab, h, device=dev, dtype=dtype, generator=gen) * h**-0.5)
        steps = fused_linear_steps(args, loss, hs, ws, ht, wt, labels)
        names = [n for n in steps if n.startswith("ours")] + [n for n in args.impls if n in ("eager", "liger")]

        def leaves() -> tuple[torch.Tensor, ...]:
            return hs.detach().requires_grad_(), ws.detach().requires_grad_()
    else:
        student = torch.randn(tokens, vocab, device=dev, dtype=dtype, generator=gen) * 2
        teacher = torch.randn(tokens, vocab, device=dev, dtype=dtype, generator=gen) * 2
        steps = logit_steps(args, loss, teacher, labels)
        names = list(args.impls)

        def leaves() -> tuple[torch.Tensor, ...]:
            return (student.detach().requires_grad_(),)
    for name in names:
        if name == "kernel":
            if not args.fused_linear:
                row.cells[name] = measure(kernel_alone(args, loss, student, teacher, labels), args.warmup, args.iters)
            continue
        if name not in steps:
            row.cells[name] = Cell(note="n/a")
            continue

        def step(fn: Callable[..., torch.Tensor] = steps[name], name: str = name) -> None:
            value = fn(*leaves())
            value.backward()
            losses[name] = value.detach()

        row.cells[name] = measure(step, args.warmup, args.iters)
    ours = [v for k, v in losses.items() if k.startswith("ours")]
    if "eager" in losses and ours:
        row.max_abs_diff = max(abs(float(losses["eager"]) - float(v)) for v in ours)
    return row


def _fmt(cell: Cell | None, what: str) -> str:
    if cell is None:
        return "-"
    if cell.note:
        return cell.note
    value = cell.ms if what == "ms" else cell.peak_mib
    return f"{value:.2f}" if what == "ms" else f"{value:.0f}"


def _ratio(num: Cell | None, den: Cell | None, what: str) -> str:
    if num is None or den is None or num.note or den.note:
        return "-"
    a = num.ms if what == "ms" else num.peak_mib
    b = den.ms if what == "ms" else den.peak_mib
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def render(rows: list[Row], args: argparse.Namespace) -> str:
    what = f"fused-linear hidden={args.hidden}" if args.fused_linear else "on logits"
    title = (f"kd_loss benchmark {what}: dtype={args.dtype} tau={args.temperature}; "
             f"device={device_name(args)}; speed-ups > 1 mean ours is faster")
    if args.fused_linear:
        return "\n".join([title, *_fused_table(rows)])
    head = ["loss", "V", "tokens", "eager ms", "ours ms", "kernel ms", "liger ms", "eager/ours", "liger/ours",
            "ours/kernel", "eager MiB", "ours MiB", "liger MiB", "ours/liger mem", "|dloss|"]
    lines = []
    for r in rows:
        e, o, k, g = (r.cells.get(n) for n in ("eager", "ours", "kernel", "liger"))
        lines.append([
            r.loss, f"{r.vocab:,}", f"{r.tokens:,}", _fmt(e, "ms"), _fmt(o, "ms"), _fmt(k, "ms"), _fmt(g, "ms"),
            _ratio(e, o, "ms"), _ratio(g, o, "ms"), _ratio(o, k, "ms"),
            _fmt(e, "mem"), _fmt(o, "mem"), _fmt(g, "mem"), _ratio(o, g, "mem"),
            "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}",
        ])
    return "\n".join([title, *_table(head, lines)])


def _fused_table(rows: list[Row]) -> list[str]:
    """One line per implementation (each of ours' strategy x chunk variants), ratios against eager and Liger."""
    head = ["loss", "V", "tokens", "impl", "ms", "MiB", "eager/this", "liger/this", "this/liger mem"]
    lines = []
    for r in rows:
        e, g = r.cells.get("eager"), r.cells.get("liger")
        for name, cell in r.cells.items():
            lines.append([r.loss, f"{r.vocab:,}", f"{r.tokens:,}", name, _fmt(cell, "ms"), _fmt(cell, "mem"),
                          _ratio(e, cell, "ms"), _ratio(g, cell, "ms"), _ratio(cell, g, "mem")])
    return _table(head, lines)


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(str(line[i])) for line in [head, *lines]) for i in range(len(head))]
    out = ["  ".join(str(c).rjust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).rjust(w) for c, w in zip(line, widths)) for line in lines]
    return out


def static_report(args: argparse.Namespace) -> str:
    """ptxas' resource report of every (block, warps) variant, per loss kind (no GPU needed)."""
    from compress.kernels import KERNEL_KINDS
    from compress.kernels.aot import kernel_usage
    from compress.kernels.kd_loss import MAX_BLOCK_GPU, default_num_warps

    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[args.dtype]
    labels = args.ignore_frac > 0
    head = ["block", "warps", *(f"{k} regs/spill/warps" for k in KERNEL_KINDS)]
    lines = []
    for block in args.blocks:
        for warps in args.warps:
            if block < 32 * warps:
                continue
            cells = []
            for kind in KERNEL_KINDS:
                u = kernel_usage(kind, block=block, num_warps=warps, dtype=dtype, arch=args.arch, labels=labels)
                cells.append(f"{u.registers}/{u.spills}B/{u.warps_per_sm}")
            default = block == MAX_BLOCK_GPU and warps == default_num_warps(block)
            lines.append([f"{block}{'*' if default else ''}", str(warps), *cells])
            print(f"compiled block={block} warps={warps}", file=sys.stderr, flush=True)
    return "\n".join([f"kd_loss kernel resources on sm_{args.arch} ({args.dtype} logits, labels={labels}): "
                      "registers per thread / spilled bytes / resident warps per SM (of 64); * = the default",
                      *_table(head, lines)])


def tune(args: argparse.Namespace) -> str:
    """Our kernel alone at every (block, warps), forward + backward, time relative to the default launch."""
    from compress.distill.losses import _resolve_kind
    from compress.kernels import KERNEL_KINDS
    from compress.kernels.kd_loss import _pick_block, default_num_warps, kd_loss_rows

    dtype = DTYPES[args.dtype]
    dev = torch.device(args.device)
    head = ["loss", "V", "tokens", "block", "warps", "ms", "default/this"]
    lines: list[list[str]] = []
    for loss, vocab in ((loss, vocab) for loss in args.loss for vocab in args.vocab):
        name, c_t, c_s = _resolve_kind("forward_kl" if loss == "taid" else loss, args.beta, args.alpha, "--loss")
        kind = KERNEL_KINDS[name]
        for tokens in args.tokens:
            gen = torch.Generator(device=dev).manual_seed(0)
            s = torch.randn(tokens, vocab, device=dev, dtype=dtype, generator=gen) * 2
            t = torch.randn(tokens, vocab, device=dev, dtype=dtype, generator=gen) * 2
            g = torch.empty_like(s)
            n_valid = torch.tensor([float(tokens)], device=dev)

            def launch(block: int | None, warps: int | None) -> Cell:
                return measure(lambda: kd_loss_rows(s, t, kind=kind, n_valid=n_valid, grad=g,
                                                    temperature=args.temperature, c_teacher=c_t, c_student=c_s,
                                                    block_size=block, num_warps=warps),
                               args.warmup, args.iters)

            base = launch(None, None)
            b0 = _pick_block(vocab, None)
            lines.append([loss, f"{vocab:,}", f"{tokens:,}", f"{b0} (default)", str(default_num_warps(b0)),
                          _fmt(base, "ms"), "1.00x"])
            for block in args.blocks:
                for warps in args.warps:
                    if block < 32 * warps:
                        continue
                    cell = launch(block, warps)
                    lines.append([loss, f"{vocab:,}", f"{tokens:,}", str(block), str(warps), _fmt(cell, "ms"),
                                  _ratio(base, cell, "ms")])
            print(f"tuned {loss} V={vocab} tokens={tokens}", file=sys.stderr, flush=True)
            del s, t, g
    return "\n".join([f"kd_loss kernel launch sweep: dtype={args.dtype}; "
                      f"device={device_name(args)}; default/this > 1 means this launch is faster",
                      *_table(head, lines)])


def profile(args: argparse.Namespace) -> str:
    """torch.profiler over a few steps of our logits path (first --loss, --vocab and --tokens): the CUDA
    kernels with their time, and the wall time of a step next to the kernel's own."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    loss, vocab, tokens = args.loss[0], args.vocab[0], args.tokens[0]
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    student = torch.randn(tokens, vocab, device=dev, dtype=DTYPES[args.dtype], generator=gen) * 2
    teacher = torch.randn(tokens, vocab, device=dev, dtype=DTYPES[args.dtype], generator=gen) * 2
    ours = logit_steps(args, loss, teacher, None)["ours"]

    def step() -> None:
        ours(student.detach().requires_grad_()).backward()

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        step()
    sync()
    with torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(5):
            step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20)
    return f"profile of 5 steps of ours: loss={loss} V={vocab} tokens={tokens} dtype={args.dtype}\n{table}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.static:
        try:
            print(static_report(args))
        except ImportError as exc:
            print(f"kd_loss benchmark --static: needs triton with its NVIDIA backend ({exc})", file=sys.stderr)
            return 2
        return 0
    if args.device == "cpu":
        from compress.kernels import interpreter_enabled

        if not interpreter_enabled():
            print("kd_loss benchmark --device cpu: set TRITON_INTERPRET=1 (the kernels then run on the CPU)",
                  file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("kd_loss benchmark: no CUDA GPU here (torch.cuda.is_available() is False); it measures GPU "
              "kernels, so nothing was measured. Run it on a machine with an NVIDIA GPU and triton.",
              file=sys.stderr)
        return 2
    from compress.kernels import triton_installed

    if not triton_installed():
        print("kd_loss benchmark: triton is not installed (`pip install triton`); nothing was measured.",
              file=sys.stderr)
        return 2
    if args.tune:
        print(tune(args))
        return 0
    if "liger" in args.impls and liger_module() is None:
        print("note: liger_kernel is not installed; its columns read n/a (`pip install liger-kernel`).",
              file=sys.stderr)
    if args.profile:
        print(profile(args))
        return 0
    rows = []
    for loss in args.loss:
        for vocab in args.vocab:
            for tokens in args.tokens:
                rows.append(run_case(args, loss, vocab, tokens))
                print(f"done {loss} V={vocab} tokens={tokens}", file=sys.stderr, flush=True)
    print(render(rows, args))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
