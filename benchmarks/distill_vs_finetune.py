"""Does distillation beat plain fine-tuning of the same student? One run, side by side.

Runs a config (default: configs/minilm-distill.yaml, the distilled 3-layer student) twice, sharing one cache so the teacher
is fine-tuned once:
  distill   : the config as written (logit KD + hidden-state losses + CE, OPTIMA schedule)
  finetune  : the same `distill` pass with only the hard-label CE loss on: the same inherited student,
              the same data, steps and learning rate, but no teacher signal
and prints the students' quality in ONNX Runtime next to the teacher's.

    python benchmarks/distill_vs_finetune.py [CONFIG] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from compress.config import load_config
    from compress.pipeline import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs" / "minilm-distill.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--work", default=None, help="folder for the two runs and their shared cache (default: a temp dir)")
    ap.add_argument("--cache", default=None, help="cache folder to share (e.g. a finished demo's exports/<name>/.cache, "
                    "so its fine-tuned teacher is reused); default: <work>/cache")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="distill-vs-finetune-"))
    base = load_config(args.config, args.set)
    idx = next((i for i, p in enumerate(base.passes) if p.type == "distill"), None)
    if idx is None:
        print(f"{args.config} has no distill pass to compare", file=sys.stderr)
        return 2
    plain = [f"passes.{idx}.weights={{logit: 0, hidden: 0, attention: 0, attention_output: 0, relation: 0, ce: 1}}",
             f"passes.{idx}.schedule={{kind: uniform}}"]
    runs = {"distill": [], "finetune": plain}
    reports = {}
    for name, extra in runs.items():
        cfg = load_config(args.config, [*args.set, *extra, f"output={work / name}", f"cache_dir={Path(args.cache).resolve() if args.cache else work / 'cache'}",
                                        "gates={}"])
        result = Pipeline(cfg, progress=True).run()
        if result.exit_code not in (0, 3):
            print(f"{name}: run failed: {result.error}", file=sys.stderr)
            return result.exit_code
        reports[name] = result.report

    ev0 = reports["distill"]["evaluation"]
    metric = ev0["main_metric"]
    table = Table(title=f"distill vs plain fine-tuning of the same student ({base.name}, {ev0['examples']} eval examples)")
    for col in ("student", "variant", metric, "f1_macro", "fidelity to teacher", "size MB", "params"):
        table.add_column(col)
    t = ev0["teacher"]
    table.add_row("teacher", "PyTorch", f"{t['quality']:.4f}", f"{t.get('f1_macro', float('nan')):.4f}", "1", "-", str(t["params"]))
    for name, rep in reports.items():
        for variant in ("fp32", "int8"):
            s = rep["evaluation"]["variants"].get(variant)
            if s:
                table.add_row(name, variant, f"{s['quality']:.4f}", f"{s.get('f1_macro', float('nan')):.4f}",
                              f"{s['fidelity']:.4f}", f"{s['size_mb']:.1f}", str(s["params"]))
    con = Console()
    con.print(table)
    d = reports["distill"]["evaluation"]["variants"]["fp32"]["quality"]
    f = reports["finetune"]["evaluation"]["variants"]["fp32"]["quality"]
    con.print(f"distill - finetune ({metric}, fp32): {d - f:+.4f}   outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
