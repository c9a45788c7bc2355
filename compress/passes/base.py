"""The Pass interface (DESIGN.md, Interfaces) and the context a pass runs in."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compress.artifact import Artifact
from compress.contracts import Kind

if TYPE_CHECKING:
    from compress.config import RunConfig
    from compress.data.sources import Records

log = logging.getLogger(__name__)


class PassConfig(BaseModel):
    """Base of every pass config: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Pass:
    """A pipeline step. Subclasses set `type`, `Config` (a PassConfig) and `version` (bump it whenever
    the pass's output for the same inputs changes: it is part of the cache key) and implement `run`.
    `consumes`, `refuses`, `produces` and `drops` declare what the pass needs in its input artifact, what it
    cannot take, what it adds and what it removes (compress.contracts checks a pipeline's order from them)."""

    type: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    version: ClassVar[str] = "1"
    uses_data: ClassVar[tuple[str, ...]] = ()  # which data splits this pass reads (for the cache key)
    consumes: ClassVar[tuple[Kind, ...]] = ()
    refuses: ClassVar[tuple[Kind, ...]] = ()
    produces: ClassVar[tuple[Kind, ...]] = ()
    drops: ClassVar[tuple[Kind, ...]] = ()

    def __init__(self, config: PassConfig):
        self.config = config

    def run(self, artifact: Artifact, ctx: PassContext) -> Artifact:  # pragma: no cover - interface
        raise NotImplementedError

    def validate(self, run: RunConfig) -> str | None:
        """Checks needing the whole run config (say, that a data split exists). Returns an error or None."""
        return None

    def reads_from_run(self, run: RunConfig) -> Any:
        """What this pass reads from the rest of the run config beyond its own config, data, target and input
        artifact (say, a later pass's setting it plans for): part of its cache key when not None."""
        return None


class Progress:
    """Progress reporting through rich; a no-op bar when disabled."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress
            from rich.progress import TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[ProgressTask]:
        if self._progress is None:
            yield ProgressTask(None, None)
            return
        tid = self._progress.add_task(description, total=total, status="")
        yield ProgressTask(self._progress, tid)


@dataclass
class ProgressTask:
    progress: Any
    task_id: Any

    def advance(self, n: int = 1, status: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, advance=n, **({"status": status} if status is not None else {}))

    def update(self, completed: int | None = None, status: str | None = None) -> None:
        if self.progress is not None:
            kw: dict[str, Any] = {}
            if completed is not None:
                kw["completed"] = completed
            if status is not None:
                kw["status"] = status
            self.progress.update(self.task_id, **kw)


@dataclass
class PassContext:
    """What a pass gets besides its input artifact."""

    run: RunConfig
    label: str
    out_dir: Path  # this pass's new files; becomes its cache entry when the pass succeeds
    work_dir: Path  # persistent scratch (training checkpoints): survives a crash, removed on success
    seed: int
    data: DataProvider
    progress: Progress = field(default_factory=lambda: Progress(False))
    metrics: dict[str, Any] = field(default_factory=dict)  # what the report shows for this pass
    nproc: int = 1  # training processes (`compress run --nproc`)
    events: list[dict[str, Any]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    def event(self, name: str, **data: Any) -> None:
        """Record something the report should show (a round of a bandit, a checkpoint...)."""
        self.events.append({"event": name, "time": time.time(), **data})
        log.debug("%s: %s %s", self.label, name, data)

    def seed_everything(self) -> None:
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)

    # models
    def load_student(self, artifact: Artifact) -> nn.Module:
        from compress.models.loading import load_model

        if artifact.model_dir is None:
            raise ValueError("the artifact has no student model")
        return load_model(str(artifact.model_dir), artifact.task)

    def load_teacher(self, artifact: Artifact) -> nn.Module:
        from compress.models.loading import load_model

        if artifact.teacher_dir is None:
            raise ValueError("the artifact has no teacher model")
        return load_model(str(artifact.teacher_dir), artifact.task)

    def load_preprocessor(self, artifact: Artifact) -> Any:
        from compress.models.loading import load_preprocessor

        return load_preprocessor(str(artifact.model_dir or artifact.teacher_dir))

    def save_student(self, model: nn.Module, preprocessor: Any, name: str = "model") -> Path:
        from compress.models.loading import save_model

        return save_model(model, preprocessor, self.out_dir / name)


class DataProvider:
    """Loads each data split once per run and fingerprints it for the cache keys."""

    def __init__(self, run: RunConfig):
        self.run = run
        self._records: dict[str, Records] = {}

    def has(self, split: str) -> bool:
        return getattr(self.run.data, split) is not None

    def records(self, split: str) -> Records:
        from compress.data.sources import load_records
        from compress.errors import InputError

        if split not in self._records:
            spec = getattr(self.run.data, split)
            if spec is None:
                raise InputError(f"data.{split}: this pipeline needs data.{split}; add it to the config")
            self._records[split] = load_records(spec, base_dir=self.run.base_dir, name=f"data.{split}")
        return self._records[split]

    def fingerprint(self, splits: tuple[str, ...]) -> str:
        h = hashlib.sha256()
        for split in splits:
            if self.has(split):
                h.update(f"{split}:{self.records(split).fingerprint};".encode())
        return h.hexdigest()

    def label2id(self) -> dict[Any, int] | None:
        """Labels of the training data (else eval), sorted; None when the data has no labels."""
        from compress.data.sources import label_mapping

        for split in ("train", "eval"):
            if self.has(split) and self.records(split).labels is not None:
                label2id, _ = label_mapping(self.records(split))
                return dict(label2id)
        return None


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
