"""Which student layers are distilled at each step: OPTIMA's module-wise adaptive schedule and two baselines.

OPTIMA (DESIGN.md, Algorithms): the student's layers are split into modules (the arms). Training runs in
rounds of `interval` steps. At the start of a round the scheduler draws, for every arm, a sample from a
Gaussian posterior over the arm's mean reward given its *recent* rewards, and the arm(s) with the largest
samples are distilled during the round (their layer losses, plus the logit loss which is always on). At
the end of the round the trainer reports a reward: the relative decrease of a reference loss that does not
depend on the arm, measured on a fixed held-out batch (`relative_decrease`).

Rewards drift as training goes on, so the posterior only trusts recent rounds: either the last `window`
rounds (sliding-window Thompson sampling) or every round weighted by `discount ** age` (discounted Thompson
sampling). Per arm, with weights w_s over the rounds s that pulled it, n = sum w_s and S = sum w_s r_s:

    precision = 1 / prior_std^2 + n / noise^2
    mean      = (prior_mean / prior_std^2 + S / noise^2) / precision
    sample    ~ N(mean, 1 / precision)

`noise` is `noise_std` if given, else estimated from the same weighted rewards (pooled within-arm standard
deviation), falling back to `prior_std` until there is enough data.

Use from a training loop::

    sched = make_scheduler(cfg, num_layers)
    for step in range(steps):
        active = sched.active_layers(step)          # layer losses of these student layers are on
        ...
        if (step + 1) % sched.interval == 0:
            sched.update(relative_decrease(prev_ref, new_ref))
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from compress.errors import InputError

log = logging.getLogger(__name__)

_EPS = 1e-12


class ScheduleConfig(BaseModel):
    """Module-wise distillation schedule (OPTIMA) or a fixed baseline."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["optima", "uniform", "round-robin"] = Field(
        "optima",
        description="optima: Thompson-sampling bandit over modules. uniform: every layer every step. "
        "round-robin: modules in turn, one round each.",
    )
    modules: int | list[list[int]] = Field(
        3,
        description="The arms: a number of contiguous, near-equal groups of student layers, or explicit groups "
        "of 1-based layer indices (disjoint, covering every layer).",
    )
    interval: int = Field(50, ge=1, description="Steps per round (Delta): how long a chosen module is distilled.")
    window: int | None = Field(
        10, ge=1, description="Sliding window W: only the last W rounds inform the posterior. Unset it to use `discount`."
    )
    discount: float | None = Field(
        None, gt=0, le=1, description="Discount gamma: a reward observed k rounds ago weighs gamma**k (instead of `window`)."
    )
    arms_per_round: int = Field(1, ge=1, description="How many modules are distilled in each round.")
    prior_mean: float = Field(0.0, description="Prior mean of an arm's reward.")
    prior_std: float = Field(1.0, gt=0, description="Prior standard deviation of an arm's mean reward.")
    noise_std: float | None = Field(
        None, gt=0, description="Standard deviation of one reward observation; default: estimated from recent rewards."
    )
    seed: int = Field(0, description="Seed of the scheduler's own random generator.")

    @model_validator(mode="before")
    @classmethod
    def _window_or_discount(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("discount") is not None:
            if data.get("window") is not None:
                raise ValueError("give either `window` or `discount`, not both (set window: null to use discount)")
            data = {**data, "window": None}
        return data


def make_modules(num_layers: int, modules: int | list[list[int]]) -> list[list[int]]:
    """The arms as lists of 1-based student layers. An integer k splits 1..num_layers into k contiguous
    groups whose sizes differ by at most one (the first groups take the extra layers); explicit groups are
    checked: non-empty, layers in 1..num_layers, disjoint, every layer covered."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise InputError(f"schedule: the student has {num_layers!r} layers; it needs at least 1")
    if isinstance(modules, bool):
        raise InputError(f"schedule.modules: {modules!r} is not a number of modules or a list of layer groups")
    if isinstance(modules, int):
        if not 1 <= modules <= num_layers:
            raise InputError(
                f"schedule.modules: {modules} modules for a student of {num_layers} layers; use 1..{num_layers}"
            )
        base, extra = divmod(num_layers, modules)
        out, start = [], 1
        for g in range(modules):
            size = base + (1 if g < extra else 0)
            out.append(list(range(start, start + size)))
            start += size
        return out
    if not isinstance(modules, (list, tuple)) or not modules:
        raise InputError("schedule.modules: give a number of modules or a non-empty list of layer groups")
    seen: dict[int, int] = {}
    out = []
    for g, group in enumerate(modules):
        if not isinstance(group, (list, tuple)) or not group:
            raise InputError(f"schedule.modules[{g}]: each module must be a non-empty list of layer indices")
        for layer in group:
            if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= num_layers:
                raise InputError(
                    f"schedule.modules[{g}]: layer {layer!r} is out of range; valid layers are 1..{num_layers}"
                )
            if layer in seen:
                raise InputError(f"schedule.modules[{g}]: layer {layer} is already in modules[{seen[layer]}]")
            seen[layer] = g
        out.append(sorted(group))
    missing = [layer for layer in range(1, num_layers + 1) if layer not in seen]
    if missing:
        raise InputError(f"schedule.modules: layers {missing} are in no module; every layer 1..{num_layers} needs one")
    return out


def relative_decrease(prev_loss: float, new_loss: float) -> float:
    """Reward of a round: (prev - new) / prev, with the denominator kept away from zero (|prev| >= 1e-12)."""
    prev, new = float(prev_loss), float(new_loss)
    if not (math.isfinite(prev) and math.isfinite(new)):
        raise ValueError(f"relative_decrease: losses must be finite, got prev={prev}, new={new}")
    denom = max(abs(prev), _EPS)
    return (prev - new) / denom


class Scheduler:
    """Base: rounds of `interval` steps; each round distils the layers of the arms chosen for it.

    `history` holds one dict per round: {"round", "step" (its first step), "arms", "reward"} (reward is None
    until `update`)."""

    kind: ClassVar[str] = "base"

    def __init__(self, modules: list[list[int]], interval: int, seed: int = 0, arms_per_round: int = 1):
        if interval < 1:
            raise InputError(f"schedule.interval: {interval} steps per round; use 1 or more")
        if not 1 <= arms_per_round <= len(modules):
            raise InputError(
                f"schedule.arms_per_round: {arms_per_round} arms for {len(modules)} modules; use 1..{len(modules)}"
            )
        self.modules = [list(m) for m in modules]
        self.interval = interval
        self.arms_per_round = arms_per_round
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.history: list[dict[str, Any]] = []

    @property
    def num_arms(self) -> int:
        return len(self.modules)

    def layers_of(self, arms: list[int]) -> set[int]:
        return {layer for a in arms for layer in self.modules[a]}

    def _choose(self, round_index: int) -> tuple[list[int], dict[str, Any]]:  # pragma: no cover - interface
        raise NotImplementedError

    def _round(self, step: int) -> dict[str, Any]:
        if step < 0:
            raise ValueError(f"schedule: step {step} is negative")
        r = step // self.interval
        if self.history and r <= self.history[-1]["round"]:
            for entry in reversed(self.history):
                if entry["round"] == r:
                    return entry
            raise ValueError(f"schedule: step {step} falls in round {r}, which was never scheduled")
        arms, extra = self._choose(r)
        entry = {"round": r, "step": r * self.interval, "arms": [int(a) for a in arms], "reward": None, **extra}
        self.history.append(entry)
        log.debug("schedule round %d: arms %s", r, entry["arms"])
        return entry

    def active_layers(self, step: int) -> set[int]:
        """Student layers whose layer losses are on at `step` (picks the arms when a new round starts)."""
        return self.layers_of(self._round(step)["arms"])

    def current_arms(self, step: int) -> list[int]:
        return list(self._round(step)["arms"])

    def update(self, reward: float) -> None:
        """The reward of the round in progress (the latest scheduled one); call once, at its end."""
        if not self.history:
            raise RuntimeError("schedule: update() before any round was scheduled; call active_layers(step) first")
        entry = self.history[-1]
        if entry["reward"] is not None:
            raise RuntimeError(f"schedule: round {entry['round']} already has its reward")
        reward = float(reward)
        if not math.isfinite(reward):
            raise ValueError(f"schedule: reward {reward} of round {entry['round']} is not finite")
        entry["reward"] = reward

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with the same future choices (JSON-serialisable)."""
        return {
            "kind": self.kind,
            "modules": copy.deepcopy(self.modules),
            "interval": self.interval,
            "arms_per_round": self.arms_per_round,
            "history": copy.deepcopy(self.history),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("kind", "modules", "interval", "arms_per_round"):
            mine = self.kind if key == "kind" else getattr(self, key)
            if state.get(key) != mine:
                raise InputError(
                    f"schedule: the saved state has {key}={state.get(key)!r} but this run has {mine!r}; "
                    "resume with the same schedule config or start the pass afresh"
                )
        self.history = copy.deepcopy(state["history"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])


class UniformScheduler(Scheduler):
    """Every module every round: all layer losses always on (the non-adaptive baseline)."""

    kind = "uniform"

    def __init__(self, modules: list[list[int]], interval: int, seed: int = 0, arms_per_round: int | None = None):
        super().__init__(modules, interval, seed, arms_per_round=len(modules))

    def _choose(self, round_index: int) -> tuple[list[int], dict[str, Any]]:
        return list(range(self.num_arms)), {}


class RoundRobinScheduler(Scheduler):
    """Modules in turn: round r distils arms r*k .. r*k+k-1 (mod the number of modules), k = arms_per_round."""

    kind = "round-robin"

    def _choose(self, round_index: int) -> tuple[list[int], dict[str, Any]]:
        n = len(self.history)  # rounds scheduled so far: skipped step ranges do not skip modules
        k = self.arms_per_round
        return sorted({(n * k + i) % self.num_arms for i in range(k)}), {}


class OptimaScheduler(Scheduler):
    """OPTIMA: nonstationary Gaussian Thompson sampling over modules (sliding window or discount)."""

    kind = "optima"

    def __init__(
        self,
        modules: list[list[int]],
        interval: int,
        *,
        window: int | None = 10,
        discount: float | None = None,
        arms_per_round: int = 1,
        prior_mean: float = 0.0,
        prior_std: float = 1.0,
        noise_std: float | None = None,
        seed: int = 0,
    ):
        super().__init__(modules, interval, seed, arms_per_round=arms_per_round)
        if window is not None and discount is not None:
            raise InputError("schedule: give either window or discount, not both")
        if window is not None and window < 1:
            raise InputError(f"schedule.window: {window}; use 1 or more rounds")
        if discount is not None and not 0 < discount <= 1:
            raise InputError(f"schedule.discount: {discount}; use a value in (0, 1]")
        if prior_std <= 0:
            raise InputError(f"schedule.prior_std: {prior_std}; use a positive number")
        if noise_std is not None and noise_std <= 0:
            raise InputError(f"schedule.noise_std: {noise_std}; use a positive number or leave it unset")
        self.window = window
        self.discount = discount
        self.prior_mean = prior_mean
        self.prior_std = prior_std
        self.noise_std = noise_std

    def _weighted_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per arm: n = sum w, S = sum w r, Q = sum w r^2 over the rewarded rounds that pulled it."""
        n = np.zeros(self.num_arms)
        s = np.zeros(self.num_arms)
        q = np.zeros(self.num_arms)
        past = self.history
        if self.window is not None:
            past = past[-self.window :]
        elif self.discount is not None and self.discount < 1.0:
            # rounds older than this weigh less than 1e-12: leave them out
            past = past[-(int(math.log(1e-12) / math.log(self.discount)) + 1) :]
        age0 = len(self.history)
        for pos, entry in enumerate(past, start=age0 - len(past)):
            r = entry["reward"]
            if r is None:
                continue
            w = self.discount ** (age0 - 1 - pos) if self.discount is not None else 1.0
            for a in entry["arms"]:
                n[a] += w
                s[a] += w * r
                q[a] += w * r * r
        return n, s, q

    def noise(self, n: np.ndarray, s: np.ndarray, q: np.ndarray) -> float:
        """The observation noise: `noise_std`, else the pooled within-arm std of the weighted rewards
        (at least 1e-6 * prior_std), else `prior_std` while fewer than one degree of freedom is available."""
        if self.noise_std is not None:
            return self.noise_std
        seen = n > 0
        dof = float(n[seen].sum() - seen.sum())
        if dof < 1.0:
            return self.prior_std
        ss = float(np.sum(q[seen] - s[seen] ** 2 / n[seen]))
        return max(math.sqrt(max(ss, 0.0) / dof), 1e-6 * self.prior_std)

    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of each arm's posterior over its mean reward, now."""
        n, s, q = self._weighted_stats()
        sigma2 = self.noise(n, s, q) ** 2
        tau2 = self.prior_std**2
        precision = 1.0 / tau2 + n / sigma2
        mean = (self.prior_mean / tau2 + s / sigma2) / precision
        return mean, 1.0 / np.sqrt(precision)

    def _choose(self, round_index: int) -> tuple[list[int], dict[str, Any]]:
        mean, std = self.posterior()
        samples = self.rng.normal(mean, std)
        # largest samples first; a stable sort keeps the lower arm on (measure-zero) ties
        order = np.argsort(-samples, kind="stable")
        arms = sorted(int(a) for a in order[: self.arms_per_round])
        return arms, {"samples": [float(x) for x in samples]}


def make_scheduler(cfg: ScheduleConfig, num_layers: int) -> Scheduler:
    """The scheduler `cfg` describes, for a student of `num_layers` layers."""
    modules = make_modules(num_layers, cfg.modules)
    if cfg.arms_per_round > len(modules):
        raise InputError(
            f"schedule.arms_per_round: {cfg.arms_per_round} arms for {len(modules)} modules; use 1..{len(modules)}"
        )
    if cfg.kind == "uniform":
        return UniformScheduler(modules, cfg.interval, cfg.seed)
    if cfg.kind == "round-robin":
        return RoundRobinScheduler(modules, cfg.interval, cfg.seed, arms_per_round=cfg.arms_per_round)
    return OptimaScheduler(
        modules,
        cfg.interval,
        window=cfg.window,
        discount=cfg.discount,
        arms_per_round=cfg.arms_per_round,
        prior_mean=cfg.prior_mean,
        prior_std=cfg.prior_std,
        noise_std=cfg.noise_std,
        seed=cfg.seed,
    )


def plot_schedule(history: list[dict[str, Any]], path: Path, title: str = "OPTIMA schedule") -> Path:
    """PNG of the schedule: the arm(s) chosen per round (top) and the reward per round (bottom).
    Written atomically (compress.report.render.save_figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from compress.report.figures import save_figure

    path = Path(path)
    fig = Figure(figsize=(9, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_arm, ax_rew = fig.subplots(2, 1, sharex=True)
    xs = [e["round"] for e in history for _ in e["arms"]]
    ys = [a for e in history for a in e["arms"]]
    if history:
        ax_arm.scatter(xs, ys, s=60, marker="s", c=ys, cmap="viridis", vmin=0, vmax=max(max(ys), 1), zorder=3)
        arms_seen = sorted(set(ys))
        counts = {a: ys.count(a) for a in arms_seen}
        ax_arm.set_yticks(arms_seen, [f"module {a} ({counts[a]}x)" for a in arms_seen])
        ax_arm.set_ylim(min(arms_seen) - 0.6, max(arms_seen) + 0.6)
        ax_arm.grid(axis="y", alpha=0.3)
        rewarded = [(e["round"], e["reward"]) for e in history if e.get("reward") is not None]
        if rewarded:
            rx, ry = zip(*rewarded)
            ax_rew.plot(rx, ry, marker="o", ms=4, lw=1)
            ax_rew.axhline(0.0, color="grey", lw=0.5)
            ax_rew.grid(alpha=0.3)
    else:
        ax_arm.text(0.5, 0.5, "no rounds", ha="center", va="center", transform=ax_arm.transAxes)
    ax_arm.set_ylabel("module trained")
    ax_rew.set_ylabel("reward")
    ax_rew.set_xlabel("round")
    ax_arm.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
