"""The one training loop every training pass shares (finetune, distill; prune and qat to come).

The trainer knows nothing about distillation: the pass hands it a loss callback
`loss_fn(student, batch, step) -> StepOutput` and a batch source `train_batches(epoch) -> Iterable[dict]`.
It owns what every pass needs the same way:

- AdamW (no weight decay on biases and norm weights) over the student and `extra_modules` (projection
  layers and the like); linear warm-up then linear, cosine or constant learning rate;
- extra `ParamGroup`s with their own lr, weight decay and schedule, optionally trained by gradient *ascent*
  (Lagrange multipliers) or left out of the clipping (mask log_alphas, learnable quantisation scales);
- `StepHook`s called at the start of each step, after its backward passes and after the optimizer step
  (clamp log_alphas or scales, ramp a target, adapt TAID's t, reward a bandit);
- gradient accumulation, gradient clipping, bf16 autocast on CUDA, seeding (torch, random, numpy);
- resumable checkpoints, written atomically (a temp dir renamed into place) every `checkpoint_every` steps
  and at the end: student, extra modules, optimizer, lr scheduler, RNG states, data position, loss curve and
  `extra_state` (any object with `state_dict`/`load_state_dict`, such as the OPTIMA scheduler). A trainer
  built on a folder that holds a checkpoint resumes from it, and the resumed run ends with the same weights
  as an uninterrupted one;
- a NaN/inf loss (or gradient norm) stops the run with `PassFailed`, naming the step and the loss terms;
- data parallelism under torchrun (compress/train/distributed.py; a pass launches itself with
  compress/train/launch.py).

Steps are numbered from 1: `loss_fn`, the hooks, the logs and the errors all name the optimizer step
being made (the first is step 1); a checkpoint of step k holds the state after k steps.

Distributed training. When the process runs under torchrun (RANK / WORLD_SIZE in the environment, with
one process too: `torchrun --nproc_per_node 1 -m compress.cli run ...` trains in a group of one), the
trainer joins the process group (gloo on CPU, nccl on CUDA) and wraps the student and the
extra modules, under one root module whose forward is `loss_fn`, in `DistributedDataParallel`: DDP
synchronises their weights from rank 0 and all-reduces the gradients in buckets while the backward pass
still runs (skipped on the micro-batches before the last one of a gradient accumulation, `no_sync`). It is
built with `find_unused_parameters=True`, because distillation routinely leaves parameters without
gradients (an unused pooler, the modules OPTIMA does not pick, hidden-state-only losses); a parameter no
rank gave a gradient keeps none, as in a single process. The data is sharded: `train_batches` must yield
the same *global* batches on every rank (it is deterministic per epoch), and each rank takes its contiguous
slice of rows (dim 0 of every tensor). Each rank's loss is weighted by its share of the rows (times the
world size, which DDP's average divides out), so the update is that of single-process training on the
global batch (exactly so for losses that are means over rows). `loss_fn` still gets the plain student
(with its `.config`). Only rank 0 writes checkpoints and reports progress; buffers are synchronised once,
when DDP is built (transformers keep none that train).
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from compress.errors import InputError, PassFailed
from compress.train.distributed import distributed_env, init_process_group

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "trainer_state.pt"
_STEP_PREFIX = "step-"
# changing these does not change the trajectory, so a checkpoint written under other values still resumes
_NON_TRAJECTORY_FIELDS = ("checkpoint_every", "log_every")


class TrainConfig(BaseModel):
    """How the trainer optimises: the knobs every training pass exposes."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    epochs: float | None = Field(1.0, gt=0, description="Passes over the training data (fractions allowed); "
                                 "used when steps is not set.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norm weights).")
    warmup_ratio: float = Field(0.06, ge=0, le=1, description="Fraction of the steps spent in linear warm-up from 0.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up: linear to 0, cosine to 0, or constant.")
    batch_size: int = Field(32, gt=0, description="Examples per micro-batch as the data callback yields them. Under "
                            "torchrun this is the global batch: each process takes 1/world of its rows.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (None: no "
                                        "clipping).")
    bf16: bool = Field(True, description="bf16 autocast for the forward passes (CUDA only; CPU runs in fp32).")
    seed: int = Field(0, description="Seed of torch, random and numpy at the start of training.")
    checkpoint_every: int = Field(200, gt=0, description="Steps between resumable checkpoints (one is also "
                                  "written at the end).")
    log_every: int = Field(10, gt=0, description="Steps between log lines.")
    @model_validator(mode="after")
    def _length(self) -> TrainConfig:
        if self.steps is None and self.epochs is None:
            raise ValueError("set steps or epochs")
        return self

    @classmethod
    def subset(cls, cfg: BaseModel, **update: Any) -> TrainConfig:
        """The trainer's settings out of a pass config that extends TrainConfig (its other fields left out, so
        that they do not count in the checkpoints' fingerprint), with `update` (say, the pass's seed)."""
        return cls(**{**{k: getattr(cfg, k) for k in cls.model_fields}, **update})


@dataclass
class StepOutput:
    """What the loss callback returns: the loss to minimise and its named components, as plain floats, for the
    logs and the NaN errors (every process must return the same term names)."""

    loss: Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """Parameters the trainer optimises with their own settings: a pruning pass's mask log_alphas (own lr, no
    clipping) and Lagrange multipliers (`ascent`: they maximise the loss), a QAT pass's learnable
    quantisation scales. `params` is a module (trained, checkpointed and synchronised under `name`, like
    an extra module) or parameters of the student or of an extra module."""

    name: str
    params: nn.Module | Sequence[nn.Parameter]
    lr: float | None = None  # None: the trainer's lr
    weight_decay: float = 0.0
    ascent: bool = False  # gradient ascent: the optimizer step increases the loss wrt these parameters
    schedule: bool = True  # follow the trainer's warm-up and decay; False: a constant lr
    clip: bool = False  # count them in the global gradient-norm clipping of the student


class StepHook:
    """Called by the trainer around each optimizer step (steps numbered from 1); override what you need.
    A hook with state a resumed run must continue also goes in the trainer's `extra_state`."""

    def on_step_start(self, step: int) -> None:
        """Before the step's first forward pass (ramp a target, anneal a temperature)."""

    def on_after_backward(self, step: int) -> None:
        """The gradients of the step are summed (over micro-batches and processes), not yet clipped, flipped
        for ascent or applied (mask the gradient of removed units)."""

    def on_step_end(self, step: int, out: StepOutput) -> None:
        """After the optimizer step, with the loss and its terms averaged over micro-batches and processes,
        before the step's checkpoint, so what the hook changes is saved (clamp log_alphas or scales,
        adapt TAID, reward a bandit)."""


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


LossFn = Callable[[nn.Module, dict[str, Any], int], StepOutput]
BatchFn = Callable[[int], Iterable[dict[str, Any]]]


# --------------------------------------------------------------------------------------------------------------
# learning rate


def lr_factor(step: int, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index `step`: linear warm-up from 0 over
    `warmup_steps`, then linear or cosine decay to 0 at `total_steps`, or constant."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    raise ValueError(f"unknown scheduler {kind!r}")


# --------------------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Trains `student` (and `extra_modules`) by minimising `loss_fn` over `train_batches`; see the module doc.

    Args:
        student: the model to train; it stays on its device (under torchrun on CUDA it moves to its rank's GPU).
        cfg: the optimisation settings.
        loss_fn: `(student, batch, step) -> StepOutput`; the batch is on the student's device (and is this
            rank's slice under torchrun); `step` is the 1-based optimizer step. Called under bf16 autocast on CUDA.
        train_batches: `epoch -> iterable of batches` (dicts of tensors, batch on dim 0); must give the same
            batches for the same epoch each call (seed any shuffle with the epoch).
        checkpoint_dir: where checkpoints go; a checkpoint already there is resumed. None: no checkpoints.
        extra_modules: trained, checkpointed and (under torchrun) synchronised with the student.
        param_groups: `ParamGroup`s trained with their own optimizer settings (lr, weight decay, gradient
            ascent, schedule, clipping); a group given as a module is trained, checkpointed and synchronised
            like the extra modules, under the group's name.
        extra_state: objects with `state_dict`/`load_state_dict` saved in the checkpoints and restored on resume.
        progress: a compress `Progress` (with `.task(description, total)`) or a callable
            `(step, total_steps, status) -> None`; reported on rank 0 only.
        hooks: `StepHook`s called at the start of each optimizer step, after its backward passes and after
            it (see `StepHook`), in order.
        label: the pass's label: named in logs, on the progress bar and in `PassFailed` errors.
    """

    def __init__(
        self,
        student: nn.Module,
        cfg: TrainConfig,
        *,
        loss_fn: LossFn,
        train_batches: BatchFn,
        checkpoint_dir: Path | None,
        extra_modules: Mapping[str, nn.Module] | None = None,
        param_groups: Sequence[ParamGroup] = (),
        extra_state: Mapping[str, _Stateful] | None = None,
        progress: Any = None,
        hooks: Sequence[StepHook] = (),
        label: str = "train",
    ):
        self.student = student
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.train_batches = train_batches
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.extra_modules = dict(extra_modules or {})
        self.param_groups = list(param_groups)
        self.extra_state = dict(extra_state or {})
        self.progress = progress
        self.hooks = list(hooks)
        self.label = label

        if "student" in self.extra_modules:
            raise ValueError("extra_modules: the name 'student' is reserved")
        for g in self.param_groups:
            if isinstance(g.params, nn.Module):
                if g.name == "student" or g.name in self.extra_modules:
                    raise ValueError(f"param_groups: the name {g.name!r} is taken (student or an extra module)")
                self.extra_modules[g.name] = g.params
        first = next(student.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")

        env = distributed_env()
        self.rank, self.world_size = (env[0], env[1]) if env else (0, 1)
        self.distributed = env is not None
        if self.distributed:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", env[2])  # type: ignore[index]
                torch.cuda.set_device(self.device)
                self.student.to(self.device)
                for m in self.extra_modules.values():
                    m.to(self.device)
            init_process_group(self.device)
        self.is_main = self.rank == 0
        self.ddp = self._wrap_ddp() if self.distributed else None

        self.params = [p for m in self._modules().values() for p in m.parameters() if p.requires_grad]
        groups, self.ascent_params, self.clipped_params = self._optimizer_groups()
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "schedule"} for g in groups],
                                           lr=cfg.lr)

        self.total_steps = cfg.steps if cfg.steps is not None else self._steps_from_epochs()
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        total, warm, kind = self.total_steps, self.warmup_steps, cfg.scheduler
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [
            (lambda s: lr_factor(s, warm, total, kind)) if g["schedule"] else (lambda s: 1.0) for g in groups])

        self.step = 0
        self.loss_curve: list[float] = []
        self.lr_curve: list[float] = []
        self.term_curves: dict[str, list[float | None]] = {}  # per term, its value at each step (None: absent)
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` consumed so far
        self.resumed_from: int | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._resume()

    # ---------------------------------------------------------------------------------------------- setup

    def _modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, **self.extra_modules}

    def _optimizer_groups(self) -> tuple[list[dict[str, Any]], list[Tensor], list[Tensor]]:
        """AdamW's parameter groups: the trained parameters outside every `ParamGroup`, with weight decay on
        matrices only, then one group per `ParamGroup`. Also the parameters whose gradient is flipped
        (ascent) and those that are clipped."""
        if not self.params:
            raise ValueError(f"{self.label}: nothing to train (no parameter requires grad)")
        owned = {id(p) for p in self.params}
        grouped: dict[int, str] = {}
        extra: list[dict[str, Any]] = []
        ascent: list[Tensor] = []
        clipped: list[Tensor] = []
        for g in self.param_groups:
            params = [p for p in (g.params.parameters() if isinstance(g.params, nn.Module) else g.params)
                      if p.requires_grad]
            for p in params:
                if id(p) not in owned:
                    raise ValueError(f"param_groups: group {g.name!r} holds a parameter outside the student, the "
                                     "extra modules and the groups given as modules; pass its module instead")
                if id(p) in grouped:
                    raise ValueError(f"param_groups: a parameter is in both {grouped[id(p)]!r} and {g.name!r}")
                grouped[id(p)] = g.name
            if not params:
                raise ValueError(f"param_groups: group {g.name!r} has no parameter that requires grad")
            extra.append({"params": params, "lr": self.cfg.lr if g.lr is None else g.lr,
                          "weight_decay": g.weight_decay, "schedule": g.schedule})
            ascent += params if g.ascent else []
            clipped += params if g.clip else []
        rest = [p for p in self.params if id(p) not in grouped]
        default = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
                   {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
        default = [{**g, "lr": self.cfg.lr, "schedule": True} for g in default if g["params"]]
        return default + extra, ascent, rest + clipped

    def _wrap_ddp(self) -> nn.Module:
        """`DistributedDataParallel` over every trained module; calling it runs `loss_fn` (see the module doc).
        Building it broadcasts rank 0's weights and buffers to the other ranks."""
        from torch.nn.parallel import DistributedDataParallel

        root = _TrainedModules(self._modules(), self.loss_fn)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer broadcast at each forward: `forward_sync_buffers` from torch 2.13, `broadcast_buffers` before
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel)
                   .parameters else "broadcast_buffers")
        return DistributedDataParallel(root, device_ids=ids, find_unused_parameters=True, **{no_sync: False})

    def _steps_from_epochs(self) -> int:
        batches = self.train_batches(0)
        try:
            n = len(batches)  # type: ignore[arg-type]
        except TypeError:
            n = sum(1 for _ in batches)
        if n == 0:
            raise InputError(f"{self.label}: the training data gives no batches; add examples to data.train")
        assert self.cfg.epochs is not None
        return max(1, math.ceil(self.cfg.epochs * n / self.cfg.grad_accum))

    def _fingerprint(self) -> str:
        cfg = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in _NON_TRAJECTORY_FIELDS}
        cfg["total_steps"] = self.total_steps
        cfg["modules"] = sorted(self.extra_modules)
        cfg["param_groups"] = [[g.name, g.lr, g.weight_decay, g.ascent, g.schedule, g.clip] for g in self.param_groups]
        cfg["extra_state"] = sorted(self.extra_state)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------------- checkpoints

    def _checkpoints(self) -> list[Path]:
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.glob(f"{_STEP_PREFIX}*")
                 if p.is_dir() and (p / CHECKPOINT_FILE).is_file() and p.name[len(_STEP_PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX):]))

    def _resume(self) -> None:
        found = self._checkpoints()
        if not found:
            return
        path = found[-1]
        state = torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        stale = state.get("fingerprint") != self._fingerprint()
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()  # every rank has read it before rank 0 may remove it
        if stale:
            log.warning("%s: checkpoint %s was written under other training settings; starting afresh", self.label,
                        path)
            if self.is_main:
                for p in found:
                    shutil.rmtree(p, ignore_errors=True)
            return
        for name, module in self._modules().items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra_state"][name])
        self.step = int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self.loss_curve = list(state["loss_curve"])
        self.lr_curve = list(state["lr_curve"])
        self.term_curves = {k: list(v) for k, v in state.get("term_curves", {}).items()}
        self._rng_to_restore = state["rng"]
        self.resumed_from = self.step
        log.info("%s: resuming from step %d/%d (%s)", self.label, self.step, self.total_steps, path)

    def save_checkpoint(self) -> Path | None:
        """Write the state after `self.step` steps to checkpoint_dir/step-NNNNNNNN atomically (rank 0 only) and
        remove the older checkpoints. Returns the folder (None on other ranks or without a checkpoint_dir)."""
        if self.checkpoint_dir is None or not self.is_main:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "fingerprint": self._fingerprint(),
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "modules": {name: m.state_dict() for name, m in self._modules().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "extra_state": {name: obj.state_dict() for name, obj in self.extra_state.items()},
            "rng": _rng_state(),
            "loss_curve": list(self.loss_curve),
            "lr_curve": list(self.lr_curve),
            "term_curves": {k: list(v) for k, v in self.term_curves.items()},
            "config": self.cfg.model_dump(mode="json"),
        }
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.checkpoint_dir))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            with open(tmp / CHECKPOINT_FILE, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            final = self.checkpoint_dir / f"{_STEP_PREFIX}{self.step:08d}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self._checkpoints():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in self.checkpoint_dir.glob(".tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        log.debug("%s: checkpoint at step %d -> %s", self.label, self.step, final)
        return final

    # ---------------------------------------------------------------------------------------------- data

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Endless stream of global batches from the saved position, advancing epoch / batch_in_epoch."""
        it = iter(self.train_batches(self.epoch))
        if self.batch_in_epoch:
            skipped = sum(1 for _ in itertools.islice(it, self.batch_in_epoch))
            if skipped < self.batch_in_epoch:
                raise InputError(f"{self.label}: epoch {self.epoch} now gives {skipped} batches, fewer than the "
                                 f"checkpoint consumed ({self.batch_in_epoch}); remove {self.checkpoint_dir}")
        if self._rng_to_restore is not None:  # after the skip: whatever the skip drew from the RNGs is undone
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        while True:
            for batch in it:
                self.batch_in_epoch += 1
                yield batch
            if self.batch_in_epoch == 0:
                raise InputError(f"{self.label}: the training data gives no batches for epoch {self.epoch}")
            self.epoch += 1
            self.batch_in_epoch = 0
            it = iter(self.train_batches(self.epoch))

    def _shard(self, batch: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """This rank's rows of a global batch and its share of them (1.0 in a single process)."""
        rows = _rows(batch)
        if not self.distributed or rows is None:
            return batch, 1.0
        if rows < self.world_size:
            raise InputError(f"{self.label}: a batch of {rows} rows cannot be split over {self.world_size} "
                             f"processes; raise the batch size or use fewer processes")
        lo, hi = self.rank * rows // self.world_size, (self.rank + 1) * rows // self.world_size

        def cut(v: Any) -> Any:
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == rows:
                return v[lo:hi]
            if isinstance(v, dict):
                return {k: cut(x) for k, x in v.items()}
            return v

        return cut(batch), (hi - lo) / rows

    # ---------------------------------------------------------------------------------------------- training

    def train(self) -> dict[str, Any]:
        """Run (or finish) the training. Returns steps, final_loss, loss_curve, lr_curve, term_curves (each
        term's value per step, averaged like the loss; None where a step had no such term) and resumed_from."""
        cfg = self.cfg
        if self.step >= self.total_steps:
            log.info("%s: already trained (%d steps)", self.label, self.step)
            return self._result()
        if self.resumed_from is None:
            _seed_everything(cfg.seed)
        for module in self._modules().values():
            module.train()
        use_autocast = self._autocast
        stream = self._batches()
        with self._progress_task() as report:
            while self.step < self.total_steps:
                step = self.step + 1
                for hook in self.hooks:
                    hook.on_step_start(step)
                loss_sum, terms_sum = 0.0, {}
                for micro in range(cfg.grad_accum):
                    batch, share = self._shard(next(stream))
                    batch = _to_device(batch, self.device)
                    # DDP all-reduces during the backward of the last micro-batch only
                    sync = self.ddp is None or micro == cfg.grad_accum - 1
                    with nullcontext() if sync else self.ddp.no_sync():  # type: ignore[union-attr]
                        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else nullcontext()
                        with ctx:
                            out = (self.loss_fn(self.student, batch, step) if self.ddp is None
                                   else self.ddp(batch, step))
                        weight = share / cfg.grad_accum
                        # DDP averages the gradients over the ranks: the world size undoes that average
                        (out.loss * (weight * self.world_size)).backward()
                    loss_sum += float(out.loss.detach().float()) * weight
                    for k, v in out.terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v) * weight
                loss, terms = self._reduce(loss_sum, terms_sum)
                if not math.isfinite(loss):
                    raise PassFailed(self.label, f"loss became {_fmt(loss)} at step {step} "
                                     f"(terms: {_fmt_terms(terms)})")
                for hook in self.hooks:
                    hook.on_after_backward(step)
                for p in self.ascent_params:  # AdamW descends: the flipped gradient makes it ascend
                    if p.grad is not None:
                        p.grad.neg_()
                grad_norm = self._clip()
                if grad_norm is not None and not math.isfinite(grad_norm):
                    raise PassFailed(self.label, f"gradient norm became {_fmt(grad_norm)} at step {step} "
                                     f"(loss {loss:.4g}; terms: {_fmt_terms(terms)})")
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step = step
                self.loss_curve.append(loss)
                self.lr_curve.append(lr)
                for k in terms.keys() - self.term_curves.keys():
                    self.term_curves[k] = [None] * (step - 1)
                for k, curve in self.term_curves.items():
                    curve.append(terms.get(k))
                if self.is_main and (step % cfg.log_every == 0 or step == self.total_steps or step == 1):
                    log.info("%s: step %d/%d loss %.4g %s lr %.3g%s", self.label, step, self.total_steps, loss,
                             _fmt_terms(terms), lr, f" grad_norm {grad_norm:.3g}" if grad_norm is not None else "")
                report(step, f"loss {loss:.4g}")
                for hook in self.hooks:
                    hook.on_step_end(step, StepOutput(loss=torch.tensor(loss), terms=terms))
                if step % cfg.checkpoint_every == 0 or step == self.total_steps:
                    self.save_checkpoint()
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
        return self._result()

    @property
    def _autocast(self) -> bool:
        """bf16 autocast for the forward passes: asked for, and on CUDA (the CPU trains in fp32)."""
        return self.cfg.bf16 and self.device.type == "cuda"

    def _result(self) -> dict[str, Any]:
        """What was trained and how: the curves, and where (device, autocast dtype, process group backend and
        size) so that a run's report shows which path it took."""
        group = None
        if self.distributed:
            import torch.distributed as dist

            group = f"{dist.get_backend()} x{self.world_size}"
        return {
            "steps": self.step,
            "final_loss": self.loss_curve[-1] if self.loss_curve else None,
            "loss_curve": list(self.loss_curve),
            "lr_curve": list(self.lr_curve),
            "term_curves": {k: list(v) for k, v in self.term_curves.items()},
            "resumed_from": self.resumed_from,
            "device": str(self.device),
            "autocast": "bf16" if self._autocast else None,
            "process_group": group,
        }

    def _reduce(self, loss: float, terms: dict[str, float]) -> tuple[float, dict[str, float]]:
        """Sum the rows-weighted loss and terms over the processes (every rank gets the same numbers, so a
        NaN stops them all)."""
        if not self.distributed:
            return loss, terms
        import torch.distributed as dist

        keys = sorted(terms)
        buf = torch.tensor([loss, *(terms[k] for k in keys)], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(buf)
        values = buf.tolist()
        return values[0], {k: values[i + 1] for i, k in enumerate(keys)}

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _clip(self) -> float | None:
        if self.cfg.max_grad_norm is None:
            return None
        with_grad = [p for p in self.clipped_params if p.grad is not None]
        if not with_grad:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(with_grad, self.cfg.max_grad_norm))

    @contextmanager
    def _progress_task(self) -> Iterator[Callable[[int, str], None]]:
        p = self.progress
        if p is None or not self.is_main:
            yield lambda step, status: None
        elif hasattr(p, "task"):
            with p.task(self.label, self.total_steps) as task:
                task.update(completed=self.step)
                yield lambda step, status: task.update(completed=step, status=status)
        else:
            total = self.total_steps
            yield lambda step, status: p(step, total, status)


class _TrainedModules(nn.Module):
    """The student and the extra modules under one root, whose forward is the pass's loss: what DDP wraps,
    so that it sees every trained parameter and the autograd graph of the whole loss."""

    def __init__(self, modules: Mapping[str, nn.Module], loss_fn: LossFn):
        super().__init__()
        self.parts = nn.ModuleDict(dict(modules))
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any], step: int) -> StepOutput:
        return self.loss_fn(self.parts["student"], batch, step)


def _rows(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.ndim > 0 else None
    if isinstance(batch, dict):
        for v in batch.values():
            n = _rows(v)
            if n is not None:
                return n
    return None


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) else f"{x:.4g}"


def _fmt_terms(terms: Mapping[str, float]) -> str:
    if not terms:
        return "none"
    return ", ".join(f"{k}={_fmt(v)}" for k, v in terms.items())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
