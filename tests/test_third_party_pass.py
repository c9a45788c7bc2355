"""The third-party pass of docs/extending.md, installed as a real plug-in: its code block becomes a module,
a dist-info folder on sys.path declares its entry point in the `compress.passes` group, and the registry's
own discovery (importlib.metadata) finds it; then a pipeline runs it."""
from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from compress import registry
from compress.cli import main

DOC = Path(__file__).parent.parent / "docs" / "extending.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """my_passes.py and my_passes-0.1.dist-info (METADATA, entry_points.txt from the doc's TOML) on sys.path,
    with a fresh registry that loads the plug-ins again."""
    site = tmp_path / "site"
    (site / "my_passes-0.1.dist-info").mkdir(parents=True)
    (site / "my_passes.py").write_text(_blocks("python")[0])
    (site / "my_passes-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-passes\nVersion: 0.1\n")
    groups = tomllib.loads(_blocks("toml")[0])["project"]["entry-points"]  # what pip writes from it:
    (site / "my_passes-0.1.dist-info" / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items())
        for group, eps in groups.items()))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    monkeypatch.setattr(registry, "_loaded", False)
    yield
    sys.modules.pop("my_passes", None)


def test_the_documented_pass_is_found_through_its_entry_point_and_runs(plugin, tmp_path, tiny_bert_dir, data_dir,
                                                                       capsys):
    cls = registry.get_pass("cosine-kd")
    assert cls.__module__ == "my_passes" and cls.__name__ == "CosineKD"
    assert main(["passes"]) == 0
    assert "cosine-kd" in capsys.readouterr().out

    curves = {}
    for cosine in (0.0, 1.0):
        out = tmp_path / f"out-{cosine}"
        cfg = {
            "name": "plugin", "output": str(out),
            "model": {"path": str(tiny_bert_dir), "task": "sequence-classification", "max_length": 16},
            "data": {"train": {"path": str(data_dir / "train.jsonl")}, "eval": {"path": str(data_dir / "eval.jsonl")}},
            "passes": [{"type": "cosine-kd", "student_layers": 1, "steps": 3, "batch_size": 16, "lr": 1e-3,
                        "seed": 1, "cosine": cosine, "weights": {"logit": 1.0, "hidden": 1.0}},
                       {"type": "export"}],
            "target": {"threads": 1},
        }
        path = tmp_path / f"m-{cosine}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        code = main(["run", str(path), "-q"])
        rep = json.loads((out / "report.json").read_text())
        assert code == 0, rep.get("error")
        metrics = rep["passes"][0]["metrics"]
        assert metrics["steps"] == 3 and len(metrics["loss_curve"]) == 3
        assert (out / "model" / "config.json").is_file() or any(out.rglob("*.onnx"))
        curves[cosine] = metrics["loss_curve"]
    # same seed, same student: the first loss differs by the custom term, 1 - cos, in (0, 2]
    extra = curves[1.0][0] - curves[0.0][0]
    assert 0 < extra <= 2, curves
