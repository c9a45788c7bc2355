"""The GitHub Actions example (examples/github-actions/compress.yml) and docs/ci.md against the real CLI and
repository: the workflow parses, every `compress` command it and the doc run parses with the CLI's own parser,
the paths it caches, publishes and uploads are the ones the config's run writes, and installs go through
constraints.txt with the CPU torch."""
from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from compress.cli import build_parser
from compress.config import load_config

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "github-actions" / "compress.yml"


@pytest.fixture(scope="module")
def wf() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(wf: dict) -> list[dict]:
    (job,) = wf["jobs"].values()
    return job["steps"]


def _step(wf: dict, uses: str) -> dict:
    found = [s for s in _steps(wf) if s.get("uses", "").startswith(uses + "@")]
    assert len(found) == 1, uses
    return found[0]


def _expand(text: str, env: dict[str, str], check_only: bool) -> str:
    """The shell line as GitHub would run it: `${{ }}` expressions of this workflow, then $VAR / "$VAR"."""
    text = text.replace("${{ inputs.check_only && '--check-only' || '' }}", "--check-only" if check_only else "")
    text = re.sub(r"\$\{\{\s*env\.(\w+)\s*\}\}", lambda m: env[m.group(1)], text)
    assert "${{" not in text, text  # an expression this test does not know
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def _compress_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if re.match(r"\s*compress\s", line)]


def test_workflow_parses_and_runs_real_commands(wf):
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in on and on["workflow_dispatch"]["inputs"]["check_only"]["type"] == "boolean"
    env = wf["env"]
    parser = build_parser()
    commands = []
    for step in _steps(wf):
        for line in _compress_lines(step.get("run", "")):
            for check_only in (False, True):
                args = parser.parse_args(shlex.split(_expand(line, env, check_only))[1:])  # SystemExit on a bad flag
                commands.append((args.command, getattr(args, "check_only", None)))
    assert ("validate", None) in commands and ("run", False) in commands and ("run", True) in commands
    # `compress` is the console script the install step puts on PATH
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["compress"] == "compress.cli:main"


def test_installs_go_through_constraints_with_cpu_torch(wf):
    install = next(s["run"] for s in _steps(wf) if "pip install" in s.get("run", ""))
    pip_lines = [line.strip() for line in install.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert pip_lines and all("-c constraints.txt" in line for line in pip_lines)
    torch_line = next(line for line in pip_lines if re.search(r"\btorch\b", line))
    assert "download.pytorch.org/whl/cpu" in torch_line
    assert re.search(r"^torch==\S+", (ROOT / "constraints.txt").read_text(), re.M)  # pinned there
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r'-e "\.\[(\w+)\]"', install):
        assert extra in extras


def test_paths_are_the_ones_the_run_writes(wf, monkeypatch):
    env = wf["env"]
    config = ROOT / env["CONFIG"]
    assert config.is_file()
    monkeypatch.chdir(ROOT)  # the job runs in the checkout's root
    run = load_config(config)
    run_dir = (ROOT / env["RUN_DIR"]).resolve()
    assert run.output_dir.resolve() == run_dir
    assert run_dir in run.cache_path.resolve().parents  # caching RUN_DIR keeps the pass cache and report.json

    restore, save = _step(wf, "actions/cache/restore"), _step(wf, "actions/cache/save")
    assert restore["with"]["path"] == save["with"]["path"] == "${{ env.RUN_DIR }}"
    assert restore["with"]["key"] == save["with"]["key"]
    key = restore["with"]["key"]
    assert "hashFiles(env.CONFIG" in key and "'data/**'" in key
    for prefix in restore["with"]["restore-keys"].splitlines():
        assert key.startswith(prefix)
    assert save["if"] == "always()"  # a failed gate still keeps the trained passes

    junit = _step(wf, "mikepenz/action-junit-report")
    assert junit["if"] == "always()" and _expand(junit["with"]["report_paths"], env, False) == f"{env['RUN_DIR']}/junit.xml"
    upload = _step(wf, "actions/upload-artifact")
    assert upload["if"] == "always()"
    paths = [_expand(p, env, False) for p in upload["with"]["path"].splitlines()]
    assert paths == [env["RUN_DIR"], f"!{env['RUN_DIR']}/.cache"]
    assert wf["permissions"]["checks"] == "write"


def test_every_compress_command_in_docs_ci_parses():
    doc = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", doc, re.S)
    lines = [line.split("  #")[0] for b in blocks for line in _compress_lines(b)]
    assert len(lines) >= 3
    parser = build_parser()
    for line in lines:
        parser.parse_args(shlex.split(line)[1:])
    assert "examples/github-actions/compress.yml" in doc and (ROOT / "examples/github-actions/compress.yml").is_file()
    readme = (ROOT / "README.md").read_text()
    assert "docs/ci.md" in readme
