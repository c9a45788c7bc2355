"""Search strategies over a `compress.search.space.Space`, sharing one evaluation function and one record per
proposal (`Trial`): aging evolution (Real et al. 2019: a population of the last `population` feasible
candidates; each iteration takes the best of `sample` random members and mutates one dimension; the oldest
member dies) and random search. Both stop after `iterations` proposals or `time_budget_s`, are seeded, and
evaluate a shape once (a repeated proposal reuses its trial). `pareto_front` keeps the feasible trials no other
beats on both score (higher) and measured latency (lower); `plot_pareto` draws them with the chosen point."""
from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.search.space import Candidate, Space

ALGORITHMS = ("evolution", "random")


@dataclass
class Trial:
    """One evaluated candidate: feasible (met every constraint and was scored) or rejected (`reason`)."""

    candidate: Candidate
    feasible: bool
    score: float | None = None
    terms: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    params: int | None = None
    latency_ms: float | None = None
    predicted_ms: float | None = None
    size_mb: float | None = None
    cached: bool = False
    noisy: str | None = None  # the load guard's reason when the latency was measured under load (not cached)

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.candidate.key(), **self.candidate.to_dict(), "feasible": self.feasible,
                "score": self.score, "terms": dict(self.terms), "reason": self.reason, "params": self.params,
                "latency_ms": self.latency_ms, "predicted_ms": self.predicted_ms, "size_mb": self.size_mb,
                "cached": self.cached, "latency_noisy": self.noisy}


Evaluate = Callable[[Candidate], Trial]


class Memo:
    """`evaluate` called once per distinct shape; `history` lists every proposal in order."""

    def __init__(self, evaluate: Evaluate):
        self.evaluate = evaluate
        self.seen: dict[Candidate, Trial] = {}
        self.history: list[Trial] = []

    def __call__(self, cand: Candidate) -> Trial:
        trial = self.seen.get(cand)
        if trial is None:
            trial = self.seen[cand] = self.evaluate(cand)
        self.history.append(trial)
        return trial

    def distinct(self) -> list[Trial]:
        return list(self.seen.values())


def _time_left(start: float, budget: float | None) -> bool:
    return budget is None or time.monotonic() - start < budget


def aging_evolution(space: Space, evaluate: Evaluate, *, population: int, sample: int, iterations: int,
                    seed: int, time_budget_s: float | None = None) -> Memo:
    rng = random.Random(seed)
    memo = Memo(evaluate)
    pop: deque[Trial] = deque()
    start = time.monotonic()
    while len(memo.history) < iterations and _time_left(start, time_budget_s):
        if len(pop) < population:  # filling the population: random shapes
            trial = memo(space.sample(rng))
        else:
            contenders = rng.sample(list(pop), min(sample, len(pop)))
            parent = max(contenders, key=lambda t: t.score)  # type: ignore[arg-type,return-value]
            trial = memo(space.mutate(parent.candidate, rng))
        if trial.feasible:
            pop.append(trial)
            if len(pop) > population:
                pop.popleft()
    return memo


def random_search(space: Space, evaluate: Evaluate, *, iterations: int, seed: int,
                  time_budget_s: float | None = None) -> Memo:
    rng = random.Random(seed)
    memo = Memo(evaluate)
    start = time.monotonic()
    while len(memo.history) < iterations and _time_left(start, time_budget_s):
        memo(space.sample(rng))
    return memo


def search(algorithm: str, space: Space, evaluate: Evaluate, *, population: int, sample: int, iterations: int,
           seed: int, time_budget_s: float | None = None) -> Memo:
    if algorithm == "evolution":
        return aging_evolution(space, evaluate, population=population, sample=sample, iterations=iterations,
                               seed=seed, time_budget_s=time_budget_s)
    return random_search(space, evaluate, iterations=iterations, seed=seed, time_budget_s=time_budget_s)


def best(trials: list[Trial]) -> Trial | None:
    ok = [t for t in trials if t.feasible and t.score is not None]
    return max(ok, key=lambda t: (t.score, -(t.latency_ms or 0.0))) if ok else None


def pareto_front(trials: list[Trial]) -> list[Trial]:
    """Feasible trials not dominated in (score higher, latency lower), by increasing latency."""
    ok = [t for t in trials if t.feasible and t.score is not None and t.latency_ms is not None]
    front = [t for t in ok if not any(
        (o.score >= t.score and o.latency_ms <= t.latency_ms) and (o.score > t.score or o.latency_ms < t.latency_ms)  # type: ignore[operator]
        for o in ok)]
    return sorted(front, key=lambda t: t.latency_ms)  # type: ignore[arg-type,return-value]


def plot_pareto(trials: list[dict[str, Any]], chosen: str | None, path: Path, *, title: str,
                budget_ms: float | None = None, score_name: str = "score") -> Path:
    """Score vs measured p50 latency of every feasible trial (dicts of `Trial.to_dict`), the Pareto front as a
    line, the chosen shape marked, the latency budget as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.report.figures import save_figure

    ok = [t for t in trials if t.get("feasible") and t.get("latency_ms") is not None and t.get("score") is not None]
    front = [t for t in trials if t.get("pareto")]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.scatter([t["latency_ms"] for t in ok], [t["score"] for t in ok], s=18, color="#8da0cb", label="feasible")
    rejected = [t["latency_ms"] for t in trials if not t.get("feasible") and t.get("latency_ms") is not None]
    if rejected:  # over a budget: measured but never scored, drawn as ticks on the x axis
        ax.plot(rejected, [0.0] * len(rejected), "|", color="#999999", ms=12, transform=ax.get_xaxis_transform(),
                label="rejected (measured, not scored)")
    if front:
        front = sorted(front, key=lambda t: t["latency_ms"])
        ax.plot([t["latency_ms"] for t in front], [t["score"] for t in front], "-o", color="#fc8d62", ms=5,
                label="Pareto front")
    for t in ok:
        if t["shape"] == chosen:
            ax.scatter([t["latency_ms"]], [t["score"]], s=140, marker="*", color="#e41a1c", zorder=5,
                       label=f"chosen {chosen}")
    if budget_ms is not None:
        ax.axvline(budget_ms, color="k", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("int8 p50 latency on target (ms)")
    ax.set_ylabel(score_name)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
