"""Run a training pass in N processes (`compress run --nproc N`, or the pass's own `nproc`).

`run_training(pass_, artifact, ctx, nproc)` calls `pass_.train(artifact, ctx)` in this process when one
process is asked for (or when it already runs under torchrun), else it writes what the children need (the
run config, the pass's class and config, the input artifact, the context's folders and seed) to
`work_dir/ddp-spec.json` and launches `python -m compress.train.launch SPEC` under torchrun. Each child
rebuilds the context and calls `pass_.train`; the `Trainer` it builds joins the process group and shards
the data. Rank 0 hands back its metrics, events and output artifact; a `CompressError` raised in a child
comes back with the same exit code and message."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from compress.artifact import Artifact
from compress.errors import CompressError, InputError, PassFailed
from compress.train.distributed import distributed_env, is_main_process, launch_distributed

if TYPE_CHECKING:
    from compress.passes.base import PassContext

SPEC_FILE = "ddp-spec.json"
ERROR_FILE = "ddp-error.json"
RESULT_FILE = "ddp-result.json"


class TrainingPass(Protocol):
    """A pass whose training `run_training` can spread over processes: `train` does the work in one process
    (and, under torchrun, in each of them; only rank 0 should write the pass's output files)."""

    config: Any

    def train(self, artifact: Artifact, ctx: PassContext) -> Artifact: ...


def run_training(pass_: TrainingPass, artifact: Artifact, ctx: PassContext, nproc: int | None = None) -> Artifact:
    """`pass_.train(artifact, ctx)` in this process, or in `nproc` (default `ctx.nproc`) torchrun processes."""
    nproc = nproc or ctx.nproc
    if nproc <= 1 or distributed_env() is not None:
        return pass_.train(artifact, ctx)
    cls = type(pass_)
    spec = ctx.work_dir / SPEC_FILE
    spec.write_text(json.dumps({
        "run": ctx.run.model_dump(mode="json"), "source": str(ctx.run.source) if ctx.run.source else None,
        "pass": f"{cls.__module__}:{cls.__qualname__}",
        "config": pass_.config.model_dump(mode="json", exclude_unset=True), "artifact": artifact.to_json(Path("/")),
        "label": ctx.label, "out_dir": str(ctx.out_dir), "work_dir": str(ctx.work_dir), "seed": ctx.seed,
    }))
    code = launch_distributed(nproc, ["-m", "compress.train.launch", str(spec)])
    failure = ctx.work_dir / ERROR_FILE
    if code != 0 and failure.is_file():  # a child raised one of ours: same exit code, same message
        err = json.loads(failure.read_text())
        failure.unlink()
        if err["exit_code"] == 2:
            raise InputError(err["message"])
        raise PassFailed(ctx.label, err["message"].removeprefix(f"pass '{ctx.label}' failed: "))
    if code != 0:
        raise PassFailed(ctx.label, f"distributed training with {nproc} processes exited with code {code}")
    result_file = ctx.work_dir / RESULT_FILE
    result = json.loads(result_file.read_text())
    result_file.unlink()
    ctx.metrics.update(result["metrics"], nproc=nproc)
    ctx.events.extend(result["events"])
    return Artifact.from_json(result["artifact"], Path("/"))


def _pass_class(qualified: str) -> Any:
    module, _, qualname = qualified.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def worker(spec_path: str) -> int:
    """Entry of each torchrun process: rebuild the pass context, train; rank 0 writes the result."""
    from compress.config import parse_config
    from compress.passes.base import DataProvider, PassContext

    spec = json.loads(Path(spec_path).read_text())
    source = Path(spec["source"]) if spec["source"] else None
    run = parse_config(spec["run"], file=str(source or "<config>"), source=source, check_passes=False)
    work_dir = Path(spec["work_dir"])
    ctx = PassContext(run=run, label=spec["label"], out_dir=Path(spec["out_dir"]), work_dir=work_dir,
                      seed=spec["seed"], data=DataProvider(run))
    ctx.seed_everything()
    artifact = Artifact.from_json(spec["artifact"], Path("/"))
    cls = _pass_class(spec["pass"])
    try:
        out = cls(cls.Config.model_validate(spec["config"])).train(artifact, ctx)
    except CompressError as err:
        if is_main_process():
            (work_dir / ERROR_FILE).write_text(json.dumps({"exit_code": err.exit_code, "message": str(err)}))
        return err.exit_code
    if is_main_process():
        (work_dir / RESULT_FILE).write_text(json.dumps(
            {"metrics": ctx.metrics, "events": ctx.events, "artifact": out.to_json(Path("/"))}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
