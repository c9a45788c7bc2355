"""Resume after a kill: `compress run` of a distill pass is killed with SIGKILL in the middle of training (after
the checkpoint of step 4, at the start of step 6), run again, and ends exactly as a run that was never
interrupted: the same loss curve, TAID's t, OPTIMA rounds and rewards, and the same student weights, bit for
bit. The student has dropout and the data is reshuffled each epoch, so the RNG states, the data position,
the optimizer, the LR schedule, the projections and the bandit's and TAID's state must all come back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from tests.conftest import minilm_path, sentiment_rows, write_jsonl

KILLER = Path(__file__).parent / "kill_at_step.py"


def _config(tmp_path: Path, model_dir: Path, out: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    write_jsonl(data / "train.jsonl", sentiment_rows(40, seed=1))
    write_jsonl(data / "eval.jsonl", sentiment_rows(8, seed=2))
    cfg = {
        "name": "killed", "output": str(out),
        "model": {"path": str(model_dir), "task": "sequence-classification", "max_length": 16},
        "data": {"train": {"path": str(data / "train.jsonl")}, "eval": {"path": str(data / "eval.jsonl")}},
        "passes": [{"type": "distill", "student_layers": 2, "steps": 10, "batch_size": 8, "lr": 1e-3,
                    "checkpoint_every": 4, "logit_loss": "taid", "temperature": 2.0,
                    "weights": {"logit": 1.0, "hidden": 1.0, "attention": 0.5},
                    "schedule": {"kind": "optima", "modules": 2, "interval": 2, "window": 3}}],
        "target": {"threads": 1},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _compress(config: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("KILL_AT_STEP", None)
    if kill_at is not None:
        env["KILL_AT_STEP"] = str(kill_at)
    return subprocess.run([sys.executable, str(KILLER), "run", str(config), "-q"], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).parent.parent)


def _outcome(out: Path) -> tuple[dict, list, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    rep = json.loads((out / "report.json").read_text())
    art = json.loads((out / ".cache" / rep["passes"][0]["cache_key"] / "artifact.json").read_text())
    events = [{k: v for k, v in e.items() if k != "time"}
              for e in next(h for h in art["history"] if h["label"] == "distill")["events"]]
    return rep["passes"][0]["metrics"], events, load_file(out / "model" / "model.safetensors")


def test_a_run_killed_mid_training_resumes_to_the_same_result(tmp_path: Path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    model_dir = tmp_path / "bert4"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.1)
              ).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(model_dir)

    straight = _compress(_config(tmp_path, model_dir, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed_cfg = _config(tmp_path, model_dir, tmp_path / "killed")
    killed = _compress(killed_cfg, kill_at=6)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])  # SIGKILL: nothing ran after it
    assert not (tmp_path / "killed" / "report.json").exists()
    ckpts = sorted(p.name for p in (tmp_path / "killed" / ".cache" / "work").glob("*/ckpt/step-*"))
    assert ckpts == ["step-00000004"]

    resumed = _compress(killed_cfg)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    m_straight, ev_straight, w_straight = _outcome(tmp_path / "straight")
    m_resumed, ev_resumed, w_resumed = _outcome(tmp_path / "killed")
    assert m_straight["resumed_from"] is None and m_resumed["resumed_from"] == 4
    assert len(m_resumed["loss_curve"]) == 10
    assert m_resumed["loss_curve"] == m_straight["loss_curve"]
    assert m_resumed["taid_t"] == m_straight["taid_t"] and len(m_resumed["taid_t"]) == 10
    rounds = [e for e in ev_resumed if e["event"] == "schedule_round"]
    assert len(rounds) == 5 and rounds == [e for e in ev_straight if e["event"] == "schedule_round"]
    assert w_resumed.keys() == w_straight.keys()
    assert all(torch.equal(w_resumed[k], w_straight[k]) for k in w_straight)
