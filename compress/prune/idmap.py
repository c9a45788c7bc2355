"""The id map a vocabulary-trimmed student carries for its teacher.

A trimmed student numbers its kept tokens 0..n-1 (compress.prune.vocab); the teacher still reads the original ids.
The prune pass saves the kept original ids beside the student (`vocab_kept.json`: entry i = the original id of the
student's token i; dropped tokens share the unknown token's id, which maps back to the original unknown token).
Passes that feed one batch to both models (distill) look the teacher's ids up with `teacher_ids`; passes that
score the teacher on data (evaluate) tokenize for it with its own tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

VOCAB_MAP_FILE = "vocab_kept.json"


def save_id_map(folder: Path, kept: list[int]) -> Path:
    """Write the kept original ids into `folder` (atomically)."""
    path = Path(folder) / VOCAB_MAP_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps([int(k) for k in kept]))
    os.replace(tmp, path)
    return path


def carry_id_map(source: Path | None, folder: Path) -> None:
    """Hand a trimmed vocabulary's map on: a pass that keeps the student's tokenizer (distill, qat) writes the map of
    the student it got (if any) next to the student it saves."""
    id_map = load_id_map(source)
    if id_map is not None:
        save_id_map(folder, id_map.tolist())


def load_id_map(folder: Path | None) -> torch.Tensor | None:
    """student id -> teacher id (a LongTensor), or None when the student's vocabulary was not trimmed."""
    if folder is None:
        return None
    path = Path(folder) / VOCAB_MAP_FILE
    if not path.is_file():
        return None
    return torch.tensor(json.loads(path.read_text()), dtype=torch.long)


def teacher_ids(input_ids: torch.Tensor, id_map: torch.Tensor | None) -> torch.Tensor:
    """The teacher's ids of a batch tokenized for the student."""
    return input_ids if id_map is None else id_map.to(input_ids.device)[input_ids]
