"""What the fused kernel costs an NVIDIA SM, read from the compiler without a GPU.

`kernel_usage` compiles `compress.kernels.kd_loss._kd_loss_kernel` ahead of time for a CUDA target (default
sm_90, the H100/H200) and runs the ``ptxas`` that triton ships with ``-v`` over its PTX: registers per
thread, spill stores and loads, shared memory. From those, `occupancy` estimates the resident warps per SM.
Spills and low occupancy are what make a memory-bound row kernel slow, so this is how its launch
parameters (block size, warps) are chosen and guarded on a machine that has no GPU; the times themselves
come from ``benchmarks/kd_loss.py`` on a GPU.

Imports triton; do not import it with ``TRITON_INTERPRET=1`` set (the interpreter replaces the compiler).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: Register file and limits of an SM on sm_80 .. sm_90 (A100, H100, H200).
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are given to a warp in units of 256


@dataclass(frozen=True)
class KernelUsage:
    """ptxas' resource report for one compiled variant of the kernel."""

    kind: str
    block: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # shared memory triton allocates for the block's reductions

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def warps_per_sm(self) -> int:
        return occupancy(self.registers, self.num_warps)


def occupancy(registers: int, num_warps: int) -> int:
    """Resident warps per SM that the register file allows (shared memory is not the limit for this
    kernel: its reductions use a few hundred bytes)."""
    per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    blocks = min(REGISTERS_PER_SM // (per_warp * num_warps), MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps)
    return blocks * num_warps


_PTR = {"S": "*{dt}", "T": "*{dt}", "G": "*{dt}", "LABELS": "*i64", "VMASK": "*i8", "LOSS": "*fp32",
        "NVALID": "*fp32", "STATE": "*fp32"}
_INT = {"stride_s": "i64", "stride_t": "i64", "stride_g": "i64", "n_cols": "i32", "ignore_index": "i32"}
_USAGE = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
    r".*?Used (?P<regs>\d+) registers", re.S)


def kernel_usage(kind: str, *, block: int, num_warps: int, dtype: str = "bf16", arch: int = 90,
                 labels: bool = True, vocab_mask: bool = False, mix: bool = False,
                 phase: int | None = None) -> KernelUsage:
    """Compile one variant of the fused loss kernel for ``sm_<arch>`` and return ptxas' report.

    ``kind`` is a name of `compress.kernels.KERNEL_KINDS`; ``dtype`` the logits' triton type (bf16, fp16,
    fp32); ``labels``, ``vocab_mask`` and ``mix`` switch the kernel's optional inputs (ignore_index rows, a
    masked vocabulary, TAID's interpolated target) on, as the losses do when they are given. ``phase``
    compiles that phase of the column-chunk kernel (`_kd_cols_kernel`, the LM-head path) instead of the
    row kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from compress.kernels import KERNEL_KINDS
    from compress.kernels import kd_loss as K

    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; one of {sorted(KERNEL_KINDS)}")
    fn = K._kd_loss_kernel if phase is None else K._kd_cols_kernel
    names = fn.arg_names
    const = {"KIND": KERNEL_KINDS[kind], "HAS_LABELS": labels, "HAS_MIX": mix, "HAS_VMASK": vocab_mask,
             "WRITE_GRAD": True, "BLOCK": block, "FAST_LOG": True}
    if phase is not None:
        const["PHASE"] = phase
    sig = {n: "constexpr" if n in const else _PTR.get(n, _INT.get(n, "fp32")).format(dt=dtype) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    ptxas = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run([ptxas.path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(ptx), "-o",
                               str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on the {kind} kernel: {proc.stderr.strip()[-500:]}")
    match = _USAGE.search(proc.stderr)
    if match is None:
        raise RuntimeError(f"could not read ptxas' resource report: {proc.stderr.strip()[-500:]}")
    return KernelUsage(kind=kind, block=block, num_warps=num_warps, registers=int(match["regs"]),
                       spill_stores=int(match["st"]), spill_loads=int(match["ld"]),
                       shared_bytes=int(getattr(compiled.metadata, "shared", 0) or 0))


__all__ = ["KernelUsage", "kernel_usage", "occupancy"]
