"""`compress` CLI that kills itself with SIGKILL at the start of training step $KILL_AT_STEP (no cleanup, no
atexit: what a machine's crash or the OOM killer leaves), run by tests/test_resume_after_kill.py.

Usage: KILL_AT_STEP=6 python tests/kill_at_step.py run model.yaml -q   (without KILL_AT_STEP: plain compress)"""
from __future__ import annotations

import os
import signal
import sys

from compress.cli import main
from compress.train import trainer


class _KillAt(trainer.StepHook):
    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


if "KILL_AT_STEP" in os.environ:
    _init = trainer.Trainer.__init__

    def _init_with_kill(self: trainer.Trainer, *args: object, **kwargs: object) -> None:
        _init(self, *args, **kwargs)
        self.hooks.append(_KillAt(int(os.environ["KILL_AT_STEP"])))

    trainer.Trainer.__init__ = _init_with_kill  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
