"""Data-parallel training on one host: who this process is under torchrun, and how to launch torchrun.

Under torchrun (RANK / WORLD_SIZE in the environment, with one process too: `torchrun --nproc_per_node 1 -m
compress.cli run ...` trains in a group of one) the `Trainer` joins the process group (gloo on CPU, nccl on
CUDA) and wraps what it trains in `DistributedDataParallel`; see compress/train/trainer.py. A pass that
trains runs itself in N processes through `compress.train.launch.run_training`."""
from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys

import torch

from compress.errors import InputError

log = logging.getLogger(__name__)


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when this process runs under torchrun (any number of processes, one
    included: torchrun sets RANK and WORLD_SIZE), else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))


def is_main_process() -> bool:
    """True outside torchrun and on rank 0: the process that writes files and reports."""
    env = distributed_env()
    return env is None or env[0] == 0


def launch_distributed(nproc: int, argv: list[str]) -> int:
    """Run `argv` in `nproc` processes on this host under torchrun (`torch.distributed.run --standalone`) and
    return its exit code. `argv` is what would follow `python`: a script and its arguments, or
    `["-m", "module", ...]`. The children see RANK/WORLD_SIZE, so the trainers they build shard the data;
    a CLI must not relaunch itself when `distributed_env()` is set."""
    if nproc < 1:
        raise InputError(f"--nproc {nproc}: the number of processes must be at least 1")
    if not argv:
        raise InputError("launch_distributed: no command to run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd, env=env)


def init_process_group(device: torch.device) -> bool:
    """Join the torchrun process group if needed (nccl on CUDA, else gloo); True when this call created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    atexit.register(_destroy_process_group)
    return True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
