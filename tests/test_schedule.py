"""OPTIMA schedule: modules, the nonstationary Thompson-sampling bandit on synthetic rewards, baselines,
resume through state_dict, the plot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from compress.distill.schedule import (
    OptimaScheduler,
    RoundRobinScheduler,
    ScheduleConfig,
    Scheduler,
    UniformScheduler,
    make_modules,
    make_scheduler,
    plot_schedule,
    relative_decrease,
)
from compress.errors import InputError


# -- modules -----------------------------------------------------------------------------------------


def test_make_modules_even_and_uneven_splits() -> None:
    assert make_modules(12, 3) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert make_modules(7, 3) == [[1, 2, 3], [4, 5], [6, 7]]
    assert make_modules(4, 4) == [[1], [2], [3], [4]]
    assert make_modules(5, 1) == [[1, 2, 3, 4, 5]]
    for n in range(1, 14):
        for k in range(1, n + 1):
            mods = make_modules(n, k)
            assert len(mods) == k
            assert [layer for m in mods for layer in m] == list(range(1, n + 1))  # contiguous, in order, covering
            assert max(map(len, mods)) - min(map(len, mods)) <= 1


def test_make_modules_explicit_and_validation() -> None:
    assert make_modules(6, [[4, 5, 6], [1, 2, 3]]) == [[4, 5, 6], [1, 2, 3]]
    assert make_modules(4, [[2, 1], [3], [4]]) == [[1, 2], [3], [4]]
    with pytest.raises(InputError, match="5 modules for a student of 4 layers"):
        make_modules(4, 5)
    with pytest.raises(InputError, match="0 modules"):
        make_modules(4, 0)
    with pytest.raises(InputError, match=r"modules\[1\]: layer 7 is out of range; valid layers are 1..6"):
        make_modules(6, [[1, 2, 3], [4, 7]])
    with pytest.raises(InputError, match=r"modules\[1\]: layer 3 is already in modules\[0\]"):
        make_modules(6, [[1, 2, 3], [3, 4, 5, 6]])
    with pytest.raises(InputError, match=r"layers \[5, 6\] are in no module"):
        make_modules(6, [[1, 2], [3, 4]])
    with pytest.raises(InputError, match="non-empty"):
        make_modules(6, [[1, 2, 3, 4, 5, 6], []])
    with pytest.raises(InputError, match="at least 1"):
        make_modules(0, 1)


def test_schedule_config_validation() -> None:
    cfg = ScheduleConfig(discount=0.9)
    assert cfg.window is None and cfg.discount == 0.9
    with pytest.raises(ValidationError, match="either `window` or `discount`"):
        ScheduleConfig(window=5, discount=0.9)
    with pytest.raises(ValidationError):
        ScheduleConfig(interval=0)
    with pytest.raises(ValidationError):
        ScheduleConfig(discount=1.5, window=None)
    with pytest.raises(ValidationError):
        ScheduleConfig(kind="greedy")
    with pytest.raises(InputError, match="arms_per_round: 4 arms for 3 modules"):
        make_scheduler(ScheduleConfig(arms_per_round=4), 6)
    assert isinstance(make_scheduler(ScheduleConfig(), 6), OptimaScheduler)
    assert isinstance(make_scheduler(ScheduleConfig(kind="uniform"), 6), UniformScheduler)
    assert isinstance(make_scheduler(ScheduleConfig(kind="round-robin"), 6), RoundRobinScheduler)


def test_relative_decrease() -> None:
    assert relative_decrease(2.0, 1.5) == pytest.approx(0.25)
    assert relative_decrease(1.0, 1.2) == pytest.approx(-0.2)
    assert relative_decrease(0.0, 0.0) == 0.0
    assert np.isfinite(relative_decrease(0.0, 1e-3))
    with pytest.raises(ValueError, match="finite"):
        relative_decrease(1.0, float("nan"))


# -- the bandit on synthetic rewards ----------------------------------------------------------------

PHASE1 = (0.05, 0.02, 0.01)  # arm 0 best
PHASE2 = (0.01, 0.02, 0.05)  # arm 2 best


def _simulate(sched: Scheduler, means_at, rounds: int, noise: float = 0.01, seed: int = 0) -> np.ndarray:
    """Drive `sched` like a trainer would (step by step, reward at the end of each round)."""
    rng = np.random.default_rng(1000 + seed)
    picks = []
    for r in range(rounds):
        for step in range(r * sched.interval, (r + 1) * sched.interval):
            active = sched.active_layers(step)
        arms = sched.history[-1]["arms"]
        assert active == sched.layers_of(arms)
        sched.update(means_at(r)[arms[0]] + noise * rng.normal())
        picks.append(arms[0])
    return np.array(picks)


@pytest.mark.parametrize("kw", [{"window": 10}, {"window": None, "discount": 0.9}], ids=["window", "discount"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optima_tracks_the_best_arm_through_a_switch(kw: dict, seed: int) -> None:
    cfg = ScheduleConfig(modules=3, interval=2, seed=seed, **kw)
    sched = make_scheduler(cfg, 6)
    picks = _simulate(sched, lambda r: PHASE1 if r < 100 else PHASE2, rounds=200, seed=seed)
    assert len(sched.history) == 200 and all(e["reward"] is not None for e in sched.history)
    # most rounds of each phase go to that phase's best arm
    assert (picks[:100] == 0).mean() > 0.7
    assert (picks[100:] == 2).mean() > 0.6
    # after the switch it moves to the new best arm within a few windows
    w = 10
    assert (picks[100 : 100 + 3 * w] == 2).mean() > 0.5
    assert (picks[100 + 3 * w :] == 2).mean() > 0.7
    # and it keeps exploring: the forgotten arms are tried again in each phase
    assert set(picks[:100]) == {0, 1, 2}


def test_optima_stationary_converges() -> None:
    sched = make_scheduler(ScheduleConfig(window=None, seed=0, interval=1), 6)
    picks = _simulate(sched, lambda r: PHASE2, rounds=200)
    assert (picks[100:] == 2).mean() > 0.95
    mean, std = sched.posterior()
    assert int(np.argmax(mean)) == 2
    assert mean[2] == pytest.approx(0.05, abs=0.005)
    assert std[2] < 0.005


def test_without_forgetting_the_switch_is_missed() -> None:
    """The contrast that motivates the window: a bandit that trusts all its past stays on the old best arm."""
    sched = make_scheduler(ScheduleConfig(window=None, seed=0, interval=1), 6)
    picks = _simulate(sched, lambda r: PHASE1 if r < 100 else PHASE2, rounds=130)
    assert (picks[100:130] == 2).mean() < 0.5


def test_optima_arms_per_round_and_fixed_noise() -> None:
    cfg = ScheduleConfig(modules=4, arms_per_round=2, noise_std=0.01, interval=1, seed=3)
    sched = make_scheduler(cfg, 8)
    rng = np.random.default_rng(0)
    means = (0.04, 0.01, 0.0, 0.05)
    for r in range(120):
        arms = sched.current_arms(r)
        assert len(arms) == 2 and len(set(arms)) == 2
        assert sched.active_layers(r) == {layer for a in arms for layer in sched.modules[a]}
        sched.update(sum(means[a] for a in arms) / 2 + 0.005 * rng.normal())
    late = [tuple(e["arms"]) for e in sched.history[60:]]
    assert late.count((0, 3)) / len(late) > 0.6


def test_update_rules() -> None:
    sched = make_scheduler(ScheduleConfig(interval=5), 6)
    with pytest.raises(RuntimeError, match="before any round"):
        sched.update(0.1)
    first = sched.active_layers(0)
    assert sched.active_layers(4) == first  # same round, same layers
    sched.update(0.1)
    with pytest.raises(RuntimeError, match="already has its reward"):
        sched.update(0.2)
    sched.active_layers(5)
    with pytest.raises(ValueError, match="not finite"):
        sched.update(float("inf"))
    assert sched.history[0] | {"samples": None} == {"round": 0, "step": 0, "arms": sched.history[0]["arms"],
                                                    "reward": 0.1, "samples": None}
    assert sched.history[1]["round"] == 1 and sched.history[1]["step"] == 5
    assert sched.active_layers(2) == first  # looking back at an earlier round gives its layers


# -- baselines --------------------------------------------------------------------------------------


def test_uniform_returns_all_layers() -> None:
    sched = make_scheduler(ScheduleConfig(kind="uniform", modules=[[1, 2], [3], [4, 5]], interval=3), 5)
    for step in range(12):
        assert sched.active_layers(step) == {1, 2, 3, 4, 5}
        if step % 3 == 2:
            sched.update(0.01)
    assert [e["arms"] for e in sched.history] == [[0, 1, 2]] * 4


def test_round_robin_cycles() -> None:
    sched = make_scheduler(ScheduleConfig(kind="round-robin", modules=3, interval=2), 6)
    seen = []
    for step in range(14):
        seen.append(sched.active_layers(step))
        if step % 2 == 1:
            sched.update(0.0)
    expected = [{1, 2}, {1, 2}, {3, 4}, {3, 4}, {5, 6}, {5, 6}] * 2 + [{1, 2}, {1, 2}]
    assert seen == expected
    two = make_scheduler(ScheduleConfig(kind="round-robin", modules=3, arms_per_round=2, interval=1), 3)
    assert [two.current_arms(s) for s in range(4)] == [[0, 1], [0, 2], [1, 2], [0, 1]]


# -- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"window": 4}, {"window": None, "discount": 0.8}])
def test_state_dict_round_trip_gives_identical_future_choices(tmp_path: Path, kw: dict) -> None:
    cfg = ScheduleConfig(modules=4, interval=3, seed=7, **kw)
    means = lambda r: (0.02, 0.03, 0.01, 0.025)  # noqa: E731
    a = make_scheduler(cfg, 8)
    _simulate(a, means, rounds=15, seed=5)
    a.active_layers(15 * 3)  # resume mid-round: round 15 picked, not yet rewarded
    state = a.state_dict()
    (tmp_path / "state.json").write_text(json.dumps(state))  # the state survives JSON
    b = make_scheduler(cfg, 8)
    b.load_state_dict(json.loads((tmp_path / "state.json").read_text()))
    assert b.history == a.history
    assert b.active_layers(15 * 3 + 1) == a.active_layers(15 * 3 + 1)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    for r in range(15, 40):
        for s, rng in ((a, rng_a), (b, rng_b)):
            arms = s.current_arms(r * 3)
            s.update(means(r)[arms[0]] + 0.01 * rng.normal())
    assert [e["arms"] for e in a.history] == [e["arms"] for e in b.history]
    assert a.history == b.history
    # a fresh scheduler with another seed chooses differently: the state, not luck, made them agree
    c = make_scheduler(cfg.model_copy(update={"seed": 8}), 8)
    _simulate(c, means, rounds=40, seed=5)
    assert [e["arms"] for e in c.history] != [e["arms"] for e in a.history]


def test_load_state_dict_rejects_another_config() -> None:
    a = make_scheduler(ScheduleConfig(modules=3), 6)
    b = make_scheduler(ScheduleConfig(modules=2), 6)
    with pytest.raises(InputError, match="saved state has modules"):
        b.load_state_dict(a.state_dict())
    rr = make_scheduler(ScheduleConfig(kind="round-robin", modules=3), 6)
    with pytest.raises(InputError, match="saved state has kind='optima'"):
        rr.load_state_dict(a.state_dict())


# -- plot -------------------------------------------------------------------------------------------


def test_plot_schedule_writes_png(tmp_path: Path) -> None:
    sched = make_scheduler(ScheduleConfig(interval=1, seed=0), 6)
    _simulate(sched, lambda r: PHASE1 if r < 20 else PHASE2, rounds=40)
    out = plot_schedule(sched.history, tmp_path / "plots" / "schedule.png")
    assert out == tmp_path / "plots" / "schedule.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [p.name for p in out.parent.iterdir()] == ["schedule.png"]  # no temp file left behind
    empty = plot_schedule([], tmp_path / "empty.png")
    assert empty.stat().st_size > 0


def test_optima_picks_the_arm_whose_loss_drops() -> None:
    """The loop of the distill pass on a simulated student: distilling arm 2 lowers the reference loss by 5% a
    round, the others by 1% (arm 0) or raise it by 1% (arm 1); the reward is `relative_decrease` of the loss.
    With the reward's sign right the bandit spends most rounds on arm 2."""
    gain = {0: 0.01, 1: -0.01, 2: 0.05}
    sched = OptimaScheduler(make_modules(6, 3), interval=1, window=8, seed=0)
    loss, pulls = 10.0, []
    for step in range(60):
        arm = sched.current_arms(step)[0]
        new = loss * (1 - gain[arm])
        sched.update(relative_decrease(loss, new))
        loss = new
        pulls.append(arm)
    assert pulls[20:].count(2) >= 30, pulls
    assert relative_decrease(10.0, 9.0) == pytest.approx(0.1) and relative_decrease(10.0, 11.0) == pytest.approx(-0.1)


# -- OPTIMA's posterior against a hand computation (issue 17, mutation triage) --------------------------


def _posterior_by_hand(history: list[dict], num_arms: int, *, window: int | None, discount: float | None,
                       prior_mean: float, prior_std: float, noise_std: float | None) -> tuple[list[float], list[float]]:
    """Normal-normal conjugate posterior per arm, written out with loops: the last `window` rounds (or every
    round, weighted discount**age, age 0 = the latest round), the pooled within-arm noise estimate."""
    rounds = history[-window:] if window is not None else history
    n, s, q = [0.0] * num_arms, [0.0] * num_arms, [0.0] * num_arms
    for i, entry in enumerate(rounds):
        if entry["reward"] is None:
            continue
        age = len(rounds) - 1 - i
        w = discount**age if discount is not None else 1.0
        for a in entry["arms"]:
            n[a] += w
            s[a] += w * entry["reward"]
            q[a] += w * entry["reward"] ** 2
    if noise_std is not None:
        sigma = noise_std
    else:
        seen = [a for a in range(num_arms) if n[a] > 0]
        dof = sum(n[a] for a in seen) - len(seen)
        if dof < 1.0:
            sigma = prior_std
        else:
            ss = sum(q[a] - s[a] ** 2 / n[a] for a in seen)
            sigma = max((max(ss, 0.0) / dof) ** 0.5, 1e-6 * prior_std)
    means, stds = [], []
    for a in range(num_arms):
        precision = 1 / prior_std**2 + n[a] / sigma**2
        means.append((prior_mean / prior_std**2 + s[a] / sigma**2) / precision)
        stds.append(precision**-0.5)
    return means, stds


def _with_history(sched: OptimaScheduler, rounds: list[tuple[list[int], float | None]]) -> OptimaScheduler:
    sched.history = [{"round": i, "step": i * sched.interval, "arms": arms, "reward": r}
                     for i, (arms, r) in enumerate(rounds)]
    return sched


@pytest.mark.parametrize("opts", [
    dict(window=None, discount=0.7, prior_mean=0.3, prior_std=2.0, noise_std=None),
    dict(window=3, discount=None, prior_mean=-0.2, prior_std=0.5, noise_std=0.4),
    dict(window=None, discount=1.0, prior_mean=0.0, prior_std=1.5, noise_std=None),
])
def test_optima_posterior_matches_a_hand_computation(opts: dict) -> None:
    rounds = [([0, 1], 0.5), ([1, 2], -0.1), ([0, 2], None), ([2, 3], 0.8), ([0, 3], 0.2), ([1, 3], 0.45)]
    sched = _with_history(OptimaScheduler([[1], [2], [3], [4]], 5, arms_per_round=2, **opts), rounds)
    mean, std = sched.posterior()
    want_mean, want_std = _posterior_by_hand(sched.history, 4, **opts)
    assert mean == pytest.approx(want_mean, rel=1e-12) and std == pytest.approx(want_std, rel=1e-12)


def test_optima_posterior_long_discounted_history_and_noise_edges() -> None:
    # 50 rounds at discount 0.5: rounds older than 1e-12 are cut off, the others keep their true ages
    rng = np.random.default_rng(7)
    rounds = [([int(a)], float(rng.normal(0.3 * a, 0.2))) for a in rng.integers(0, 3, 50)]
    sched = _with_history(OptimaScheduler([[1], [2], [3]], 2, window=None, discount=0.5, prior_std=1.3), rounds)
    want = _posterior_by_hand(sched.history, 3, window=None, discount=0.5, prior_mean=0.0, prior_std=1.3, noise_std=None)
    assert list(sched.posterior()[0]) == pytest.approx(want[0], rel=1e-9)
    assert list(sched.posterior()[1]) == pytest.approx(want[1], rel=1e-9)
    # exactly one degree of freedom: the pooled estimate is used (not the prior)
    one_dof = _with_history(OptimaScheduler([[1], [2]], 2, window=5, prior_std=3.0), [([0], 0.1), ([0], 0.7)])
    assert one_dof.noise(*one_dof._weighted_stats()) == pytest.approx((0.18 / 1) ** 0.5)
    # identical rewards: the noise floor is 1e-6 * prior_std
    flat = _with_history(OptimaScheduler([[1], [2]], 2, window=5, prior_std=3.0), [([0], 0.4)] * 3)
    assert flat.noise(*flat._weighted_stats()) == pytest.approx(3e-6)
    # the defaults: window 10, prior N(0, 1), estimated noise, seed 0
    many = [([i % 2], 0.1 * i) for i in range(14)]
    default = _with_history(OptimaScheduler([[1], [2]], 2), many)
    want = _posterior_by_hand(default.history, 2, window=10, discount=None, prior_mean=0.0, prior_std=1.0, noise_std=None)
    assert list(default.posterior()[0]) == pytest.approx(want[0], rel=1e-12)
    same_seed = OptimaScheduler([[1], [2]], 2, seed=0)
    assert [default.rng.normal() for _ in range(3)] == [same_seed.rng.normal() for _ in range(3)]


def test_optima_and_make_scheduler_arguments() -> None:
    OptimaScheduler([[1]], 1, window=1)
    OptimaScheduler([[1]], 1, window=None, discount=1.0)
    for bad in (dict(window=0), dict(window=None, discount=0.0), dict(window=None, discount=1.5),
                dict(prior_std=0.0), dict(noise_std=0.0)):
        with pytest.raises(InputError, match="^schedule"):
            OptimaScheduler([[1]], 1, **bad)
    cfg = ScheduleConfig(kind="optima", modules=2, prior_mean=0.4, prior_std=2.5, noise_std=0.3, seed=5,
                         arms_per_round=2)
    sched = make_scheduler(cfg, 4)
    assert (sched.prior_mean, sched.prior_std, sched.noise_std, sched.arms_per_round) == (0.4, 2.5, 0.3, 2)
    # the seed reaches every kind's generator: the same config gives the same state
    for kind in ("optima", "uniform", "round-robin"):
        c = ScheduleConfig(kind=kind, modules=2, seed=11)
        assert make_scheduler(c, 4).state_dict() == make_scheduler(c, 4).state_dict()
        assert make_scheduler(c, 4).state_dict()["rng"] != make_scheduler(ScheduleConfig(kind=kind, modules=2), 4).state_dict()["rng"]


def test_schedule_state_is_a_copy_both_ways() -> None:
    sched = OptimaScheduler([[1], [2]], 2, seed=3)
    sched.active_layers(0)
    sched.update(0.5)
    state = sched.state_dict()
    state["history"][0]["arms"].append(7)
    state["modules"][0].append(9)
    state["rng"]["state"]["state"] = 1
    assert sched.history[0]["arms"] != state["history"][0]["arms"] and sched.modules == [[1], [2]]
    assert sched.state_dict()["rng"] != state["rng"]
    fresh = OptimaScheduler([[1], [2]], 2, seed=3)
    saved = sched.state_dict()
    fresh.load_state_dict(saved)
    saved["history"][0]["reward"] = 99.0
    saved["rng"]["state"]["state"] = 2
    assert fresh.history[0]["reward"] == 0.5 and fresh.state_dict()["rng"] == sched.state_dict()["rng"]


def test_make_modules_rejects_bad_types_and_gaps() -> None:
    for layers, modules in ((2.5, 2), (4, []), (3, [[1, 2.0], [3]]), (3, [[2, 3]])):
        with pytest.raises(InputError, match="^schedule"):
            make_modules(layers, modules)
    assert make_scheduler(ScheduleConfig(kind="round-robin", modules=2, arms_per_round=2), 4).arms_per_round == 2
