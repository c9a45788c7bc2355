"""`compress passes` in a pipe (plain text, nothing cut), on a terminal (rich tables that fold, never cut), and
`compress passes TYPE` (one pass in full); an unknown type is exit 2 naming the known ones."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

from compress.cli import main
from compress.describe import field_rows
from compress.registry import all_passes
from tests.conftest import one_line_error


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "compress.cli", *args]


def _every_field_in(text: str, name: str, cls: type) -> None:
    for r in field_rows(cls.Config):
        assert f"    {r.name}: {r.type}" in text, (name, r.name)
        if r.description:
            assert r.description in text, (name, r.name)  # whole, on one line


def test_piped_listing_is_plain_text_with_every_field_whole():
    proc = subprocess.run(_cli("passes"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "…" not in out and "┃" not in out and "\x1b[" not in out  # no cut cells, no table, no colour codes
    heads = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert heads == [f"{name} (version {cls.version})" for name, cls in all_passes().items()]  # one block each
    for name, cls in all_passes().items():
        _every_field_in(out, name, cls)
    assert "    teacher_quantization: 'none' | '8bit' | '4bit' = 'none'\n" in out


def test_piped_listing_survives_a_reader_that_leaves():
    """`compress passes | head -1`: the reader closes the pipe early; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{' '.join(_cli('passes'))} | head -1", shell=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.stdout.strip().endswith(")") and len(proc.stdout.splitlines()) == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_terminal_listing_folds_instead_of_cutting():
    """On a terminal (a pty, 80 columns) the tables wrap long cells; no field name is cut with an ellipsis."""
    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="80", TERM="xterm")
    proc = subprocess.Popen(_cli("passes"), stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 1 << 16)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    os.close(leader)
    out = b"".join(chunks).decode()
    assert "┃" in out  # the rich tables of a terminal
    assert "…" not in out  # folded, not cut
    assert "compress passes TYPE" in out


def test_one_pass_in_full(capsys):
    from compress.passes.distill import Distill, DistillConfig

    assert main(["passes", "distill"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"distill (version {Distill.version})\n")
    assert Distill.__doc__.strip().splitlines()[0] in out and DistillConfig.__doc__.strip() in out
    assert "consumes: a PyTorch student, a teacher" in out and "produces: a PyTorch student" in out
    assert "reads data: train, eval" in out
    _every_field_in(out, "distill", Distill)
    assert "    temperature: float = 2.0  (gt=0)\n" in out
    assert "    student_layers: int | None = None  (gt=0)\n" in out
    # nested config models are expanded, with the defaults their parent's default holds (ScheduleConfig's own
    # default kind is 'optima'; distill's schedule defaults to a uniform one)
    assert "    schedule.kind: 'optima' | 'uniform' | 'round-robin' = 'uniform'\n" in out
    assert "    weights.logit: float = 1.0  (ge=0)\n" in out
    assert "search (version" not in out  # only the pass asked for


def test_unknown_pass_type_is_exit_2_listing_the_known_ones(capsys):
    assert main(["passes", "nope"]) == 2
    line = one_line_error(capsys)
    assert "no such pass type" in line and "nope" in line
    assert all(name in line for name in all_passes())


def test_a_registered_third_party_pass_in_full(capsys):
    """A pass without docstrings does not borrow Pass's or PassConfig's; required fields say so."""
    from pydantic import Field

    from compress.passes.base import Pass, PassConfig
    from compress.registry import register, unregister

    class MineConfig(PassConfig):
        strength: float = Field(description="How strong.", ge=0)
        names: list[str] = Field(default_factory=list, description="Which names.")

    class Mine(Pass):
        type = "test-mine"
        Config = MineConfig
        version = "7"

    register(Mine)
    try:
        assert main(["passes", "test-mine"]) == 0
    finally:
        unregister("test-mine")
    out = capsys.readouterr().out
    assert out.startswith("test-mine (version 7)\n  (no description)\n")
    assert Pass.__doc__.split(".")[0] not in out and PassConfig.__doc__.split(":")[0] not in out
    assert "contract: none declared" in out
    assert "    strength: float (required)  (ge=0)\n        How strong.\n" in out
    assert "    names: list[str] = []\n        Which names.\n" in out
