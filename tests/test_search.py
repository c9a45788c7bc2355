"""The search (compress.search, passes/search.py) on tiny random models: inheritance reproduces the teacher at its own
shape on every family and slices the most important units otherwise (through compress.prune); the space's bad
inputs are one-line InputErrors; DisWOT's terms; aging evolution beats random search on a synthetic score; the
latency model; and the pass in a real pipeline (search -> distill): constraints respected, the latency cache hit
by a second run, a budget nobody meets exits 2 naming it and the smallest value measured."""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch

from compress.errors import InputError
from compress.models import get_adapter
from compress.prune import count_params, score_units
from compress.prune.shrink import shrink
from compress.search import evolve
from compress.search.student import build_student, plan_for
from compress.search.latency import LatencyCache, LatencyModel, cache_key
from compress.search.score import DisWOT, params_score, remap_ids
from compress.search.space import Candidate, Space, SpaceConfig, TeacherShape
from tests.conftest import make_config, save_tiny_bert
from tests.test_adapters import FAMILIES, _build, _inputs


# ---------------------------------------------------------------------------------------------- inheritance
@pytest.mark.parametrize("family", FAMILIES)
def test_inheritance_reproduces_the_teacher_at_its_shape(family):
    teacher = _build(family).eval()
    shape = TeacherShape.of(teacher)
    student, plan = build_student(teacher, shape.candidate(), score_units(teacher, "magnitude"))
    x = _inputs(family)
    with torch.no_grad():
        assert torch.equal(teacher(**x).logits, student.eval()(**x).logits)
    assert plan.layers is None and not plan.heads and not plan.ffn and plan.hidden is None
    rand, _ = build_student(teacher, shape.candidate(), score_units(teacher, "magnitude"), init="random", seed=1)
    with torch.no_grad():
        assert not torch.allclose(teacher(**x).logits, rand.eval()(**x).logits)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_inheritance_keeps_the_most_important_units(family):
    teacher = _build(family).eval()
    a = get_adapter(teacher)
    scores = score_units(teacher, "magnitude")
    grouped = family == "llama"
    cand = Candidate(layers=2, hidden=a.hidden_size - 8, heads=2, kv_heads=1 if grouped else 2, ffn=a.intermediate_size // 2)
    plan = plan_for(teacher, cand, scores, layers="uniform")
    assert plan.layers == [1, 2]  # uniform: the teacher side of the uniform layer map (always the last)
    for i in plan.layers:
        top_ffn = sorted(torch.topk(scores.ffn[i], cand.ffn).indices.tolist())
        assert plan.ffn[i] == top_ffn
        assert len(plan.heads[i]) == 2
        if grouped:  # both query heads of one key/value group
            assert plan.heads[i][0] // 2 == plan.heads[i][1] // 2
        else:
            assert plan.heads[i] == sorted(torch.topk(scores.heads[i], 2).indices.tolist())
    assert plan.hidden == sorted(torch.topk(scores.hidden, cand.hidden).indices.tolist())
    student, _ = build_student(teacher, cand, scores)
    sliced = shrink(teacher, plan)  # the one slicing: identical to the pruning code's result
    for (n1, p1), (n2, p2) in zip(student.state_dict().items(), sliced.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    sa = get_adapter(student)
    assert (sa.num_layers, sa.hidden_size, sa.intermediate_size) == (2, cand.hidden, cand.ffn)
    by_importance = plan_for(teacher, cand, scores, layers="importance").layers
    assert by_importance is not None and len(by_importance) == 2


# ---------------------------------------------------------------------------------------------- space
def _bert_shape() -> TeacherShape:
    return TeacherShape(family="bert", layers=6, hidden=384, heads=12, kv_heads=12, ffn=1536, head_dim=32, grouped=False)


@pytest.mark.parametrize("space, message", [
    (SpaceConfig(layers=[]), "search.space.layers: the list is empty"),
    (SpaceConfig(hidden=[384, 256], heads=[12]), "hidden 256 is not divisible by heads 12"),
    (SpaceConfig(layers=[3, 8]), "search.space.layers: 8 is outside 1..6"),
    (SpaceConfig(kv_heads=[4]), "has no separate key/value heads"),
])
def test_space_bad_ranges_are_one_line_errors(space, message):
    with pytest.raises(InputError) as err:
        Space.from_config(space, _bert_shape())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_space_gqa_rules_and_mutation():
    llama = TeacherShape(family="llama", layers=4, hidden=64, heads=8, kv_heads=4, ffn=128, head_dim=8, grouped=True)
    with pytest.raises(InputError, match="heads 4 is not a multiple of kv_heads 3"):
        Space.from_config(SpaceConfig(heads=[4], kv_heads=[3]), llama)
    with pytest.raises(InputError, match="more than the teacher's 2"):
        Space.from_config(SpaceConfig(heads=[8], kv_heads=[2]), llama)
    space = Space.from_config(SpaceConfig(layers=[1, 2, 4], heads=[4, 8], kv_heads=[4], ffn=[64, 128]), llama)
    assert space.size == 12
    rng = random.Random(0)
    c = space.sample(rng)
    for _ in range(50):
        m = space.mutate(c, rng)
        diff = [k for k, v in m.to_dict().items() if v != c.to_dict()[k]]
        assert len(diff) == 1  # exactly one dimension changes
        c = m
    bert = Space.from_config(SpaceConfig(heads=[6, 12]), _bert_shape())
    assert all(c.kv_heads == c.heads for c in bert.all())


# ---------------------------------------------------------------------------------------------- search
def _synthetic_space() -> Space:
    teacher = TeacherShape(family="llama", layers=12, hidden=1024, heads=16, kv_heads=1, ffn=4096, head_dim=64, grouped=True)
    cfg = SpaceConfig(layers=list(range(1, 13)), hidden=list(range(64, 1025, 64)), heads=[1, 2, 4, 8, 16],
                      kv_heads=[1], ffn=list(range(256, 4097, 256)))
    return Space.from_config(cfg, teacher)


def _synthetic_evaluate(cand: Candidate) -> evolve.Trial:
    """A smooth synthetic score (peak at a middle shape) with a params-like constraint."""
    cost = cand.layers * (cand.hidden * cand.ffn / 1e5)
    if cost > 250:
        return evolve.Trial(cand, feasible=False, reason="cost")
    score = -((cand.layers - 7) ** 2 + ((cand.hidden - 640) / 64) ** 2 + ((cand.ffn - 2304) / 256) ** 2
              + 4 * (cand.heads != 8))
    return evolve.Trial(cand, feasible=True, score=float(score), latency_ms=cost)


def test_evolution_beats_random_search_on_a_synthetic_score():
    space = _synthetic_space()
    evo, rnd = [], []
    for seed in range(8):
        e = evolve.aging_evolution(space, _synthetic_evaluate, population=10, sample=3, iterations=120, seed=seed)
        r = evolve.random_search(space, _synthetic_evaluate, iterations=120, seed=seed)
        evo.append(evolve.best(e.distinct()).score)
        rnd.append(evolve.best(r.distinct()).score)
        assert all(t.feasible for t in e.distinct() if t.score is not None)
    assert statistics.mean(evo) > statistics.mean(rnd)
    assert sum(a >= b for a, b in zip(evo, rnd)) >= 6
    again = evolve.aging_evolution(space, _synthetic_evaluate, population=10, sample=3, iterations=120, seed=0)
    assert [t.candidate for t in again.history] == [
        t.candidate for t in evolve.aging_evolution(space, _synthetic_evaluate, population=10, sample=3,
                                                    iterations=120, seed=0).history]  # seeded


def test_pareto_front():
    mk = lambda s, lat: evolve.Trial(Candidate(1, 8, 1, 1, int(lat * 10)), True, score=s, latency_ms=lat)  # noqa: E731
    trials = [mk(-3, 1), mk(-2, 2), mk(-2.5, 3), mk(-1, 4), mk(-1, 5)]
    assert [(t.score, t.latency_ms) for t in evolve.pareto_front(trials)] == [(-3, 1), (-2, 2), (-1, 4)]


# ---------------------------------------------------------------------------------------------- scores
def test_diswot_terms(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3).eval()
    batch = {"input_ids": torch.randint(5, 1000, (6, 10)), "attention_mask": torch.ones(6, 10, dtype=torch.long)}
    batch["attention_mask"][2, -3:] = 0
    d = DisWOT(teacher, batch, "sequence-classification")
    same = d(teacher)
    assert same.terms == {"relation": 0.0, "semantic": 0.0} and same.score == 0.0
    scores = score_units(teacher, "magnitude")
    small, _ = build_student(teacher, Candidate(1, 32, 2, 2, 16), scores)
    rand, _ = build_student(teacher, Candidate(1, 32, 2, 2, 16), scores, init="random", seed=3)
    s_small, s_rand = d(small), d(rand)
    assert s_small.terms["relation"] > 0 and s_small.terms["semantic"] > 0
    assert s_small.score == pytest.approx(-(s_small.terms["relation"] + s_small.terms["semantic"]))
    assert s_rand.score != s_small.score
    assert params_score(small).score < params_score(teacher).score
    feat = DisWOT(teacher.bert, batch, "feature-extraction")  # no class logits: the relation term alone
    assert set(feat(teacher.bert).terms) == {"relation"}


def test_kd_proxy_trains_a_copy_of_a_frozen_slice(tiny_bert_dir):
    from transformers import BertForSequenceClassification

    from compress.search.score import kd_score

    torch.manual_seed(0)
    teacher = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()
    with torch.no_grad():
        teacher.classifier.weight.mul_(100)  # confident teacher logits: something to distil
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, _ = build_student(teacher, Candidate(1, 32, 2, 2, 32), score_units(teacher, "magnitude"), init="random")
    before = [p.clone() for p in student.parameters()]
    batch = {"input_ids": torch.randint(5, 1000, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}
    res = kd_score(student, teacher, [batch], batch, "sequence-classification", steps=5, lr=1e-3, seed=0)
    assert res.terms["kd_loss"] < res.terms["kd_loss_init"] and res.score == -res.terms["kd_loss"]
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))  # the candidate itself is untouched


def test_remap_ids_for_a_trimmed_vocabulary():
    batch = {"input_ids": torch.tensor([[101, 7, 2000, 102]])}
    out = remap_ids(batch, [0, 7, 100, 101, 102])
    assert out["input_ids"].tolist() == [[3, 1, 5, 4]]  # 2000 was dropped: the shared extra id len(kept)


# ---------------------------------------------------------------------------------------------- latency
def test_latency_model_fits_and_reports_its_error():
    lm = LatencyModel(head_dim=8, seq_len=16, batch=1, min_points=4)
    from compress.search.latency import features

    truth = lambda s: 0.05 + 0.3 * features(s, 8, 16, 1)[1] + 0.1 * s["layers"]  # noqa: E731  (in the model's span)
    shapes = [dict(layers=n, hidden=32, heads=4, kv_heads=4, ffn=f) for n in (1, 2, 3) for f in (32, 64)]
    for s in shapes[:4]:
        assert lm.predict(s) is None or len(lm.ys) >= 4
        lm.add(s, truth(s), lm.predict(s))
    for s in shapes[4:]:
        p = lm.predict(s)
        assert p is not None
        lm.add(s, truth(s), p)
    err = lm.error()
    assert err["checked"] == 2 and err["mean_abs_rel_error"] < 0.5
    # leave-one-out over the 6 measured shapes: each predicted from a fit on the 5 others (near zero: the truth
    # is in the model's span); with too few points there is no loo entry
    assert err["measured"] == 6 and err["loo_points"] == 6 and err["loo_mean_abs_rel_error"] < 0.01
    few = LatencyModel(head_dim=8, seq_len=16, batch=1, min_points=4)
    few.add(shapes[0], 1.0, None)
    assert few.error() == {"checked": 0, "measured": 1, "noisy_skipped": 0, "coef": None}
    # a measurement taken under load (the load guard's verdict) is neither fitted nor checked
    lm.add(dict(layers=4, hidden=32, heads=4, kv_heads=4, ffn=64), 50.0, lm.predict(shapes[0]), noisy=True)
    assert lm.error()["checked"] == 2 and lm.error()["measured"] == 6 and lm.error()["noisy_skipped"] == 1


def test_latency_cache_persists_and_keys_on_target(tmp_path):
    shape = Candidate(1, 32, 4, 4, 64).to_dict()
    k1 = cache_key(shape, {"threads": 1}, {"torch": "x"})
    assert k1 != cache_key(shape, {"threads": 2}, {"torch": "x"}) != cache_key(shape, {"threads": 1}, {"torch": "y"})
    c = LatencyCache(tmp_path)
    assert c.get(k1) is None
    c.put(k1, {"p50_ms": 1.5})
    again = LatencyCache(tmp_path)
    assert again.get(k1) == {"p50_ms": 1.5} and again.hits == 1


# ---------------------------------------------------------------------------------------------- the pass
def _run(cfg: Path, *args: str, command: str = "run") -> int:
    from compress.cli import main

    try:
        return main([command, str(cfg), *args]) or 0
    except SystemExit as e:
        return int(e.code or 0)


SPACE = {"layers": [1, 2], "heads": [2, 4], "ffn": [32, 64]}


def test_search_then_distill_respects_budgets_and_hits_the_latency_cache(tmp_path, data_dir):
    from transformers import BertForSequenceClassification

    teacher = save_tiny_bert(tmp_path / "bert", layers=2, seed=0)
    model = BertForSequenceClassification.from_pretrained(teacher, num_labels=2)
    one_layer = count_params(model, plan_for(model, Candidate(1, 32, 4, 4, 64), score_units(model, "magnitude")))
    # every 2-layer shape is over the params budget: rejected before it is exported or timed
    search = {"type": "search", "space": SPACE, "max_params": one_layer, "iterations": 10, "algorithm": "random",
              "batch_size": 8, "measure_runs": 3, "latency_model": False,
              "latency_tolerance": 100.0}  # the load guard probes, but never rejects: the cache test stays deterministic
    passes = [search, {"type": "distill", "epochs": 1, "batch_size": 16, "lr": 1e-3, "weights": {"hidden": 1.0}}]
    cfg = make_config(tmp_path, teacher, data_dir, passes=passes)
    assert _run(cfg) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    m = report["passes"][0]["metrics"]
    trials = m["trials"]
    assert any(not t["feasible"] and t["reason"].startswith("params") for t in trials)
    assert all(t["latency_ms"] is None for t in trials if t["layers"] == 2)  # rejected before measuring
    assert all(t["params"] <= one_layer and t["layers"] == 1 for t in trials if t["feasible"])
    assert m["chosen_params"] <= one_layer and m["chosen"] in {t["shape"] for t in trials if t["feasible"]}
    assert m["latency_probe_baseline_ms"] > 0 and m["latency_noisy"] == [] and "load guard: 0 of" in m["why"]
    measured = [t for t in trials if t["latency_ms"] is not None]
    assert m["latency_cache_misses"] == len(measured) and m["latency_cache_hits"] == 0
    assert (tmp_path / "out" / "pareto-search.png").is_file() and f"chose `{m['chosen']}`" in (tmp_path / "out" / "report.md").read_text()
    d = report["passes"][1]["metrics"]  # distill trained the searched student, not a fresh copy of the teacher
    assert d["student_source"] == "artifact" and d["student_params"] == m["chosen_params"]
    assert d["student_layers"] == m["chosen_shape"]["layers"]

    search2 = {**search, "score": "params"}  # a new search (another cache key) on the same target: every shape cached
    cfg = make_config(tmp_path, teacher, data_dir, passes=[search2])
    assert _run(cfg) == 0
    m2 = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["metrics"]
    assert m2["latency_cache_misses"] == 0 and m2["latency_cache_hits"] == len(measured)
    assert m2["chosen_params"] == max(t["params"] for t in m2["trials"] if t["feasible"])  # the params baseline


def test_a_budget_nobody_meets_exits_2_naming_it(tmp_path, data_dir, capsys):
    teacher = save_tiny_bert(tmp_path / "bert", layers=2, seed=0)
    search = {"type": "search", "space": {"layers": [1], "ffn": [64]}, "max_size_mb": 0.01, "iterations": 2,
              "batch_size": 8, "measure_runs": 3}
    cfg = make_config(tmp_path, teacher, data_dir, passes=[search])
    assert _run(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_size_mb 0.01: no candidate meets it (smallest measured: " in err


def test_min_speedup_budgets_relative_to_the_teacher_timed_in_the_run(tmp_path, data_dir, capsys):
    """min_speedup: the teacher is exported and timed on the target in the same run (cached like a shape), and
    every chosen shape's p50 is at most the teacher's / min_speedup; a speedup nobody reaches names min_speedup."""
    # 8 layers against 1: the int8 students are several times faster than the teacher's int8, with room for noise
    teacher = save_tiny_bert(tmp_path / "bert", layers=8, seed=0)
    search = {"type": "search", "space": {"layers": [1], "ffn": [32, 64]}, "min_speedup": 1.2,
              "speedup_over": "int8", "iterations": 4, "algorithm": "random", "batch_size": 8, "measure_runs": 5,
              "latency_model": False, "latency_tolerance": 100.0}
    cfg = make_config(tmp_path, teacher, data_dir, passes=[search])
    assert _run(cfg) == 0
    m = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["metrics"]
    assert m["teacher_latency_ms"] > 0 and m["speedup_over"] == "int8"
    assert m["budget_latency_ms"] == pytest.approx(m["teacher_latency_ms"] / 1.2)
    assert m["budget_latency_from"].startswith("min_speedup 1.2 (teacher int8 p50 ")
    for t in m["trials"]:
        assert t["feasible"] == (t["latency_ms"] <= m["budget_latency_ms"]), t
    assert m["chosen_latency_ms"] <= m["budget_latency_ms"] and "lower p50 than the teacher (int8)" in m["why"]
    misses = m["latency_cache_misses"]
    assert misses == len({t["shape"] for t in m["trials"]}) + 1  # the shapes and the teacher, once each

    cfg = make_config(tmp_path, teacher, data_dir, passes=[{**search, "min_speedup": 1000.0}])
    assert _run(cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "min_speedup 1000 (teacher int8 p50 " in err and "lower min_speedup or add smaller values" in err
    # the second run found the teacher's timing in the cache: its budget is the same teacher p50 / 1000
    assert f"{m['teacher_latency_ms']:.3f} ms / 1000" in err


def test_search_config_errors(tmp_path, tiny_bert_dir, data_dir, capsys):
    passes = [{"type": "search", "space": {"layers": [1]}}, {"type": "distill", "student_layers": 1}]
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=passes)
    assert _run(cfg, command="validate") == 2
    assert "student_layers: the student comes from the search pass" in capsys.readouterr().err
    cfg = make_config(tmp_path, tiny_bert_dir, data_dir, passes=[{"type": "search", "space": {"hidden": [32, 30], "heads": [4]}}])
    assert _run(cfg) == 2
    assert "hidden 30 is not divisible by heads 4" in capsys.readouterr().err


def test_search_with_a_trimmed_vocabulary_then_distill(tmp_path, data_dir):
    """A trimmed searched student carries the id map (vocab_kept.json) as the prune pass's does, so distill feeds
    the untrimmed teacher its own ids; the run goes on through export and evaluate."""
    from transformers import AutoTokenizer

    from compress.models.loading import load_model
    from compress.prune.idmap import load_id_map, teacher_ids

    teacher = save_tiny_bert(tmp_path / "bert", layers=2, seed=0)
    search = {"type": "search", "space": {"layers": [1], "heads": [2], "ffn": [32], "trim_vocab": [True]},
              "iterations": 1, "batch_size": 8, "measure_runs": 3}
    cfg = make_config(tmp_path, teacher, data_dir, passes=[search])
    assert _run(cfg, command="validate") == 0  # no longer refused with a distill pass after it (checked below)
    assert _run(cfg) == 0
    m = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["metrics"]
    assert m["chosen"] == "L1-H32-A2-KV2-F32-vocab"
    folder = tmp_path / "out" / "model"
    student = load_model(str(folder), "sequence-classification")
    rows = student.get_input_embeddings().weight.shape[0]
    assert rows < 1000 and m["chosen_params"] == sum(p.numel() for p in student.parameters())
    tok = AutoTokenizer.from_pretrained(folder)
    id_map = load_id_map(folder)
    assert id_map is not None and len(id_map) == rows
    t_tok = AutoTokenizer.from_pretrained(teacher)
    text = json.loads((data_dir / "train.jsonl").read_text().splitlines()[0])["text"]
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert int(ids.max()) < rows  # the saved tokenizer numbers tokens as the trimmed embedding does
    # a training text maps back to exactly the teacher's own tokenization
    assert teacher_ids(ids, id_map).tolist() == t_tok(text, return_tensors="pt")["input_ids"].tolist()
    unk = teacher_ids(torch.tensor([rows - 1]), id_map)  # the extra row (dropped tokens) is the teacher's [UNK]
    assert int(unk) == t_tok.unk_token_id

    passes = [search, {"type": "distill", "steps": 3, "batch_size": 8, "lr": 1e-3, "weights": {"hidden": 1.0}},
              {"type": "export"}, {"type": "evaluate", "batch_size": 16}]
    cfg = make_config(tmp_path, teacher, data_dir, passes=passes)
    assert _run(cfg) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    d = report["passes"][1]["metrics"]
    assert d["student_source"] == "artifact" and d["student_params"] == m["chosen_params"]
    assert all(abs(v) < 1e6 for v in d["loss_curve"])
    # distill loaded the map (it hands it on only then) and the exported graph takes the trimmed ids
    assert load_id_map(tmp_path / "out" / "model").tolist() == id_map.tolist()
    assert report["evaluation"]["teacher"]["accuracy"] is not None
