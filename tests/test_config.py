"""Config loading and its error messages: every bad input is exit code 2, one line naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.config import load_config
from tests.conftest import make_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def _edit(path: Path, fn) -> Path:
    raw = yaml.safe_load(path.read_text())
    fn(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def good(tmp_path, tiny_bert_dir, data_dir) -> Path:
    return make_config(tmp_path, tiny_bert_dir, data_dir)


def test_valid_config_validates(capsys, good):
    code, err = run_cli(capsys, "validate", str(good))
    assert code == 0, err


BAD_CASES = [
    # (edit of the raw yaml, words the one-line error must contain)
    (lambda r: r["passes"][0].update(epochs="abc"), ["passes[0].epochs", "expected a number"]),
    (lambda r: r["passes"][1].update(type="exprot"), ["passes[1].type", "unknown pass 'exprot'", "export"]),
    (lambda r: r["passes"][0].update(learning_rate=1), ["passes[0].learning_rate", "unknown field", "allowed here:", "lr"]),
    (lambda r: r["model"].update(pth="x"), ["model.pth", "unknown field", "allowed here:", "path, pooling, revision"]),
    (lambda r: r["passes"].insert(1, {"type": "distill", "weights": {"kd": 1}}),
     ["passes[1].weights.kd", "allowed here:", "attention, attention_output, ce, contrastive, embedding, embedding_mse, hidden, logit"]),
    (lambda r: r["model"].update(task="translation"), ["model.task", "sequence-classification"]),
    (lambda r: r.pop("model"), ["model", "required"]),
    (lambda r: r.update(gates={"max_latency_ms": -1}), ["gates.max_latency_ms", "greater than 0"]),
    (lambda r: r.update(gates={"max_size_mb": "big"}), ["gates.max_size_mb", "expected a number"]),
    (lambda r: r["model"].update(path="/nonexistent/folder/model"), ["model.path", "does not exist"]),
    (lambda r: r["data"]["train"].update(path="/nonexistent/train.jsonl"), ["data.train", "train.jsonl"]),
    (lambda r: r["model"].update(path="${COMPRESS_TEST_UNSET_VAR}"), ["model.path", "COMPRESS_TEST_UNSET_VAR", "not set"]),
    (lambda r: r.update(passes=[]), ["passes", "at least 1"]),
    (lambda r: r.update(passes=[{"type": "export"}, {"type": "export", "name": "export"}, {"type": "evaluate", "name": "export"}]), ["passes[1].name", "twice"]),
    (lambda r: r.update(passes=[{"type": "finetune"}], gates={"max_quality_drop": 0.01}), ["gates.max_quality_drop", "evaluate"]),
    (lambda r: r["passes"][2].update(methods=["dynamic"], primary="static"), ["passes[2]", "primary"]),
    (lambda r: r["target"].update(threads="many"), ["target.threads", "expected an integer"]),
]


@pytest.mark.parametrize("edit,words", BAD_CASES, ids=[w[0] for _, w in BAD_CASES])
def test_bad_config_exit_2_names_field(capsys, good, edit, words):
    _edit(good, edit)
    for cmd in ("validate", "run"):
        code, err = run_cli(capsys, cmd, str(good), "-q") if cmd == "run" else run_cli(capsys, cmd, str(good))
        assert code == 2, (cmd, err)
        line = " ".join(err.split())
        assert "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err
        for w in words:
            assert w in line, (w, line)


def test_missing_file_and_bad_yaml(capsys, tmp_path):
    code, err = run_cli(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err and "not found" in err
    bad = _write(tmp_path, "name: x\npasses: [\n  {type: export\n")
    code, err = run_cli(capsys, "validate", str(bad))
    assert code == 2 and "invalid YAML" in err and "line" in err
    code, err = run_cli(capsys, "validate", str(_write(tmp_path, "- just\n- a list\n")))
    assert code == 2 and "mapping at the top level" in err


def test_set_overrides_and_env(tmp_path, good, monkeypatch):
    cfg = load_config(good, ["passes.0.epochs=2", "target.threads=2", "name=renamed"])
    assert cfg.passes[0].options()["epochs"] == 2 and cfg.target.threads == 2 and cfg.name == "renamed"
    monkeypatch.setenv("COMPRESS_TEST_BS", "7")
    _edit(good, lambda r: r["target"].update(batch_size="${COMPRESS_TEST_BS}", seq_len="${COMPRESS_UNSET_X:-48}"))
    cfg = load_config(good)
    assert cfg.target.batch_size == 7 and cfg.target.seq_len == 48


@pytest.mark.parametrize("assignment,words", [
    ("passes.9.epochs=1", ["passes.9", "not an index"]),
    ("noequals", ["KEY=VALUE"]),
    ("name.first=1", ["'name' is a value"]),
])
def test_bad_set(capsys, good, assignment, words):
    code, err = run_cli(capsys, "validate", str(good), "--set", assignment)
    assert code == 2
    for w in words:
        assert w in err


def test_profile_applies_its_settings_before_set(tmp_path, good):
    _edit(good, lambda r: r.update(profiles={"full": {"passes.0.epochs": 3, "data.train.limit": 40, "name": "long"}}))
    plain = load_config(good)
    assert plain.name != "long" and plain.passes[0].options().get("epochs") != 3  # no profile: the file as written
    full = load_config(good, profile="full")
    assert full.passes[0].options()["epochs"] == 3 and full.data.train.limit == 40 and full.name == "long"
    assert load_config(good, ["passes.0.epochs=5"], profile="full").passes[0].options()["epochs"] == 5  # --set wins


@pytest.mark.parametrize("profiles,argv,words", [
    ({"full": {"passes.0.epochs": 3}}, ["--profile", "fast"], ["--profile fast", "its profiles: full"]),
    (None, ["--profile", "full"], ["--profile full", "profiles: none"]),
    ({"full": {"passes.9.epochs": 3}}, ["--profile", "full"], ["profiles.full.passes.9.epochs", "not an index"]),
    (["passes.0.epochs=3"], [], ["profiles: expected a mapping"]),
])
def test_bad_profile(capsys, good, profiles, argv, words):
    if profiles is not None:
        _edit(good, lambda r: r.update(profiles=profiles))
    code, err = run_cli(capsys, "validate", str(good), *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err


def test_from_until_unknown_pass(capsys, good):
    code, err = run_cli(capsys, "run", str(good), "-q", "--from", "distil")
    assert code == 2 and "--from distil" in err and "finetune" in err


def test_passes_lists_fields(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    for word in ("finetune", "export", "ptq", "evaluate", "epochs", "calibration_examples", "Peak learning rate"):
        assert word in out
