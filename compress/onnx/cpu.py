"""What the CPU running ONNX Runtime can do, where it changes how int8 models should be made."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def int8_saturates(cpuinfo: str | None = None) -> bool:
    """True on x86 CPUs without VNNI (AVX2 / AVX-512 before Cascade Lake, AMD before Zen 4): ORT's u8 x s8 kernels
    (`vpmaddubsw`) add pairs of products in int16, which saturates when activations and weights are both near
    their range's ends. ORT's own advice is 7-bit weights there (`reduce_range`). Read from /proc/cpuinfo's flags
    (`cpuinfo`: its text, for tests); False on other architectures and where the flags cannot be read."""
    if cpuinfo is None:
        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            return False
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if not flags:
        return False
    return not any(f in flags for f in VNNI_FLAGS)


def resolve_reduce_range(value: bool | str | None) -> bool:
    """A `reduce_range` setting (True, False, or "auto" / None: `int8_saturates()`) as the bool to quantize with."""
    return int8_saturates() if value in ("auto", None) else bool(value)


def reduce_range_key(value: bool | str | None) -> dict[str, bool] | None:
    """For a pass's `reads_from_run`: with reduce_range auto the choice depends on this CPU, so it enters the cache
    key (a model made for a CPU with VNNI is not reused where 7-bit weights are needed, nor the reverse)."""
    return {"reduce_range_auto": int8_saturates()} if value in ("auto", None) else None
