"""The search's latency measurement (compress.search.latency): the one export -> (int8) -> ORT timing the prune
pass uses too, and the load guard of the persisted latency cache. The decisions (noisy or clean, persisted or
not, stale or trusted) are driven by scripted probe times; the measurements themselves are real ORT sessions."""
from __future__ import annotations

import json

import pytest

from compress.config import Target
from compress.search.latency import (CACHE_FILE, LatencyCache, guarded_measure, judge, measure, probe,
                                     probe_graph)
from tests.conftest import save_tiny_bert


def _probes(*p50s: float, fastest: float = 0.9):
    """Scripted probe timings: (p50, fastest run) pairs, the fastest run always `fastest` (the baseline)."""
    it = iter(p50s)
    return lambda: (next(it), fastest)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny BERT measured once at int8 and once at fp32 (real export, quantization and ORT timing)."""
    from transformers import BertForSequenceClassification

    root = tmp_path_factory.mktemp("lat")
    model = BertForSequenceClassification.from_pretrained(save_tiny_bert(root / "bert", layers=1, seed=0), num_labels=2)
    target = Target(batch_size=1, seq_len=16, threads=1, warmup=1, runs=5)
    int8 = measure(model.eval(), "sequence-classification", target, root / "int8")
    fp32 = measure(model, "sequence-classification", target, root / "fp32", precision="fp32")
    return root, target, int8, fp32


def test_measure_at_both_precisions(tiny_export):
    root, _, int8, fp32 = tiny_export
    assert int8["p50_ms"] > 0 and int8["int8_mb"] is not None and int8["int8_mb"] < int8["fp32_mb"]
    assert (root / "int8" / "model.int8.onnx").is_file()
    assert fp32["p50_ms"] > 0 and fp32["int8_mb"] is None and not (root / "fp32" / "model.int8.onnx").exists()


def test_judge():
    assert judge(1.0, 1.29, baseline_ms=1.0, tolerance=0.3) is None
    assert "(after)" in judge(1.0, 1.5, baseline_ms=1.0, tolerance=0.3)
    assert "(before)" in judge(2.0, 1.0, baseline_ms=1.0, tolerance=0.3)


def test_guard_persists_clean_measurements_only(tiny_export, tmp_path):
    from compress.onnx.runtime import measure_latency
    from compress.tasks import get_task

    root, target, _, _ = tiny_export
    inputs = get_task("sequence-classification").synthetic_inputs(
        __import__("transformers").BertConfig(vocab_size=30522), batch_size=1, seq_len=16)

    def real() -> dict:  # a real ORT timing of the exported int8 graph
        return measure_latency(root / "int8" / "model.int8.onnx", inputs, threads=1, warmup=1, runs=5)

    cache = LatencyCache(tmp_path, tolerance=0.3, probe_key="k")
    clean = guarded_measure(real, _probes(1.0, 1.1), cache)  # both probes within 30 % of the fastest run, 0.9
    assert clean["noisy"] is None and clean["attempts"] == 1 and clean["probe_ms"] == 1.1 and clean["p50_ms"] > 0
    assert clean["baseline_ms"] == 0.9 and "loaded_p50_ms" not in clean
    cache.put("a", clean)

    # loaded during every attempt: noisy after 1 + retries attempts; the fastest single run stands in for the p50
    # (the loaded p50 is kept beside it), and the caller must not persist it
    noisy = guarded_measure(real, _probes(1.0, 2.0, 1.8, 1.0, 1.0, 3.0), cache, retries=2)
    assert noisy["noisy"] is not None and "baseline 0.900 ms" in noisy["noisy"] and noisy["attempts"] == 3
    assert noisy["p50_ms"] == noisy["min_ms"] <= noisy["loaded_p50_ms"]
    # loaded at first, then quiet: the second attempt is clean and its own p50 is kept
    retried = guarded_measure(real, _probes(3.0, 3.0, 1.0, 1.05), cache, retries=2)
    assert retried["noisy"] is None and retried["attempts"] == 2 and retried["p50_ms"] >= retried["min_ms"]

    again = LatencyCache(tmp_path, tolerance=0.3, probe_key="k")  # from disk: the baseline and the clean entry
    assert again.baseline() == 0.9 and again.get("a")["p50_ms"] == clean["p50_ms"] and again.hits == 1


def test_cache_does_not_trust_entries_measured_under_load(tmp_path):
    cache = LatencyCache(tmp_path, tolerance=0.3, probe_key="k")
    cache.see_probe(2.0)  # the first probes ran on a loaded host: baseline 2.0
    cache.put("loaded", {"p50_ms": 9.0, "probe_ms": 2.1, "probe_key": "k"})
    cache.put("other-probe", {"p50_ms": 9.0, "probe_ms": 2.1, "probe_key": "a smaller reference graph"})
    assert cache.get("other-probe") is None and cache.stale == 1  # timed against another probe: not comparable
    assert cache.get("loaded") is not None
    cache.see_probe(1.0)  # the host was later seen quieter: that entry was measured under load
    assert cache.get("loaded") is None and cache.stale == 2
    # an entry written before the guard (no probe) is not trusted either; without a guard everything is
    old = json.loads((tmp_path / CACHE_FILE).read_text())
    old["old"] = {"p50_ms": 5.0}
    (tmp_path / CACHE_FILE).write_text(json.dumps(old))
    assert LatencyCache(tmp_path, probe_key="k").get("old") is None
    assert LatencyCache(tmp_path).get("old") == {"p50_ms": 5.0}


def test_probe_times_a_real_reference_graph(tmp_path):
    target = Target(threads=1)
    p50, fastest = probe(target, tmp_path, runs=5)
    path = probe_graph(tmp_path)
    assert p50 >= fastest > 0 and path.is_file()
    mtime = path.stat().st_mtime_ns
    assert probe(target, tmp_path, runs=3)[0] > 0 and path.stat().st_mtime_ns == mtime  # built once, reused
