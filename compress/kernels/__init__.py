"""Fused Triton kernels for the distillation losses (the fused twins of `compress.distill.losses`).

This package imports without triton: the kernel modules (`compress.kernels.kd_loss`) are imported lazily,
only when a loss is dispatched to its kernel. Never add a top-level module named `kernels`: that name
belongs to another package that transformers probes.

On a machine without a GPU the kernels still run, slowly, under Triton's interpreter: set the environment
variable ``TRITON_INTERPRET=1`` *before* triton is first imported (the tests do this in a subprocess).
`compress.kernels.aot` compiles them ahead of time for an NVIDIA target, also without a GPU, and reads the
compiler's register and spill report (a guard against spills; the launch parameters themselves come from
the GPU sweep of ``benchmarks/kd_loss.py --tune``, recorded in `kd_loss.default_num_warps`).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

#: Loss kinds the kernel knows, by name; the integer is the kernel's `KIND` constexpr.
KERNEL_KINDS: dict[str, int] = {
    "forward_kl": 0,
    "reverse_kl": 1,
    "jsd": 2,
    "skew_kl": 3,
    "skew_reverse_kl": 4,
}


@functools.lru_cache(maxsize=1)
def triton_installed() -> bool:
    """True when the `triton` package can be imported (it may still lack a driver)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install counts as absent
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on"}


def kernel_usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels can run on these tensors: triton is installed and the tensors are on
    CUDA, or on CPU with the interpreter switched on."""
    if not triton_installed():
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreter_enabled() and all(t.device.type == "cpu" for t in tensors)


__all__ = ["KERNEL_KINDS", "interpreter_enabled", "kernel_usable", "triton_installed"]
