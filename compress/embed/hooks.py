"""What the built-in passes call for sentence-embedding models (feature-extraction from a sentence-transformers
folder). A run is a sentence-embedding run when its task is feature-extraction and the teacher folder (the
load step keeps its sentence-transformers files) has a Pooling module; then:

- load keeps `modules.json`, `1_Pooling/`, Dense and the other sentence-transformers files (`copy_st_files`);
- distill trains the student's sentence head with it (`distill_heads`: pooling, a projection when the widths
  differ) on the sentence-embedding defaults (`embedding_defaults`), and saves the student as a
  sentence-transformers folder (`save_student_folder`);
- export traces `SentenceEncoder` (pooling and normalisation inside the graph, output `sentence_embedding`);
- evaluate scores embeddings with compress.embed.metrics (`SentenceEval`);
- ptq quantizes the embedding table by default (`quantize_embeddings_default`), and search budgets size and
  latency for what ptq will do (`ptq_quantizes_embeddings`)."""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress.embed.metrics import MIN_RETRIEVAL_TEXTS, embedding_scores
from compress.embed.model import OUTPUT, SentenceEncoder, SentenceHead
from compress.embed.st import is_st_folder, load_dense, read_spec, write_st_files
from compress.errors import InputError

ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def sentence_run(run: Any, teacher_dir: str | Path | None) -> bool:
    """Whether this run makes sentence embeddings; `model.pooling` on a folder without a Pooling module is bad input."""
    if run.model.task != "feature-extraction":
        return False
    if is_st_folder(teacher_dir):
        return True
    if getattr(run.model, "pooling", None) is not None:
        raise InputError(f"model.pooling: '{run.model.pooling}' is not a pooling mode the model folder defines (it "
                         "has no sentence-transformers modules.json with a Pooling module); remove model.pooling")
    return False


def copy_st_files(source: str | Path, folder: str | Path) -> None:
    """Copy the sentence-transformers files of `source` into the saved model folder `folder` (no-op otherwise)."""
    source, folder = Path(source), Path(folder)
    if not is_st_folder(source):
        return
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    for sub in source.iterdir():
        if sub.is_dir() and sub.name[:1].isdigit() and "_" in sub.name:  # 1_Pooling, 2_Dense, 2_Normalize...
            shutil.copytree(sub, folder / sub.name, dirs_exist_ok=True)
    import json

    for m in json.loads((folder / "modules.json").read_text()):  # e.g. a Normalize module without files
        if m.get("path"):
            (folder / m["path"]).mkdir(exist_ok=True)


def carry_st_files(source: str | Path | None, folder: str | Path, model: nn.Module, *, where: str) -> None:
    """A pass that rewrites a sentence-transformers student (prune: vocabulary trimming, smaller layers) keeps
    its sentence-transformers files; the Pooling width follows the model's new hidden size."""
    if source is None or not is_st_folder(source):
        return
    spec = read_spec(source)
    width = int(model.config.hidden_size)
    if spec.dense_in is not None and spec.dense_in != width:
        raise InputError(f"{where}: the student's Dense projection takes {spec.dense_in} features but the pruned "
                         f"model is {width} wide; remove 'hidden' from granularities for this sentence-embedding student")
    copy_st_files(source, folder)
    if spec.dim != width:
        import json

        pfile = Path(folder) / "1_Pooling" / "config.json"
        pfile.write_text(json.dumps({**json.loads(pfile.read_text()), "word_embedding_dimension": width}, indent=2))


# ---------------------------------------------------------------------------------------------- distill
@dataclass
class SentenceHeads:
    """The student's sentence head (trained: its projection) and the teacher's (fixed)."""

    student: SentenceHead
    teacher: SentenceHead


def distill_heads(student: nn.Module, teacher_dir: str | Path, run: Any, student_dir: str | Path | None = None
                  ) -> SentenceHeads:
    """Heads for distilling a sentence-embedding student: the teacher's pooling / Dense / normalisation; the
    student pools the same way and, when its width differs from the teacher's embedding width, learns a
    projection (initialised from the teacher's Dense when it fits). A student that is already a
    sentence-transformers folder of its own (`student_dir`) keeps its head."""
    pooling = getattr(run.model, "pooling", None)
    t_spec = read_spec(teacher_dir, pooling)
    t_dense = load_dense(teacher_dir, t_spec)
    teacher = SentenceHead(t_spec, t_dense).requires_grad_(False)
    if student_dir is not None and Path(student_dir) != Path(teacher_dir) and is_st_folder(student_dir):
        s_spec = read_spec(student_dir, None)
        return SentenceHeads(SentenceHead(s_spec, load_dense(student_dir, s_spec)), teacher)
    width = int(student.config.hidden_size)
    dense: nn.Linear | None = None
    if t_dense is not None and t_dense.in_features == width:
        dense = copy.deepcopy(t_dense).requires_grad_(True)
    elif width != t_spec.out_dim:
        dense = nn.Linear(width, t_spec.out_dim)
    return SentenceHeads(SentenceHead(t_spec, dense), teacher)


# the sentence-embedding defaults of distill's weights (when the config does not set `weights`)
EMBEDDING_WEIGHTS = {"embedding": 1.0, "embedding_mse": 1.0, "contrastive": 0.1, "hidden": 1.0, "relation": 0.0}


def embedding_defaults(cfg: Any) -> Any:
    """`cfg` with the sentence-embedding loss weights when it leaves `weights` at the defaults."""
    if "weights" in cfg.model_fields_set:
        return cfg
    return cfg.model_copy(update={"weights": cfg.weights.model_copy(update=EMBEDDING_WEIGHTS)})


def save_student_folder(folder: str | Path, heads: SentenceHeads, student: nn.Module, run: Any,
                        teacher_dir: str | Path) -> Path:
    """Write the sentence-transformers files of a distilled student next to its HF files."""
    t_spec = read_spec(teacher_dir, getattr(run.model, "pooling", None))
    spec = heads.student.spec(int(student.config.hidden_size), t_spec.max_seq_length)
    dense = heads.student.dense
    return write_st_files(folder, spec, dense.cpu() if dense is not None else None)


# ---------------------------------------------------------------------------------------------- export
def export_model(model: nn.Module, folder: str | Path | None, run: Any) -> tuple[nn.Module, str | None]:
    """(what to export, its output name): the SentenceEncoder of a sentence-transformers student folder and
    `sentence_embedding`, else the model itself and None (the task's output)."""
    if run.model.task != "feature-extraction" or not is_st_folder(folder):
        return model, None
    return SentenceEncoder.from_folder(model, folder, getattr(run.model, "pooling", None)).eval(), OUTPUT


# ---------------------------------------------------------------------------------------------- evaluate
def check_retrieval_gate(run: Any, examples: int) -> None:
    if getattr(run.gates, "min_retrieval_agreement", None) is not None and examples < MIN_RETRIEVAL_TEXTS:
        raise InputError(f"gates.min_retrieval_agreement: data.eval gives {examples} texts; recall@10 needs at "
                         f"least {MIN_RETRIEVAL_TEXTS}: give more eval texts or remove the gate")


class SentenceEval:
    """Evaluate's view of a sentence-embedding run: the teacher's embeddings and the scorer."""

    def __init__(self, teacher: nn.Module, teacher_dir: str | Path, run: Any, labels: list[Any] | None):
        self.teacher = SentenceEncoder.from_folder(teacher, teacher_dir, getattr(run.model, "pooling", None)).eval()
        self.labels = labels

    def teacher_outputs(self, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        from compress.passes.common import model_inputs

        with torch.no_grad():
            return [self.teacher(**model_inputs(b)).float() for b in batches]

    def score(self, batches: Any, s_out: list[torch.Tensor], t_out: list[torch.Tensor]) -> dict[str, float]:
        s = np.concatenate([np.asarray(o, dtype=np.float32) for o in s_out])
        t = np.concatenate([np.asarray(o, dtype=np.float32) for o in t_out])
        if s.ndim != 2:
            raise InputError(f"evaluate: the ONNX student's output has shape {s.shape}, not [texts, dim]; export "
                             "the student again (a sentence-embedding run exports `sentence_embedding`)")
        return embedding_scores(s, t, self.labels)


def sentence_eval(artifact: Any, ctx: Any, teacher: nn.Module, limit: int | None) -> SentenceEval | None:
    """A SentenceEval for a sentence-embedding run, else None."""
    if not sentence_run(ctx.run, artifact.teacher_dir):
        return None
    labels = ctx.data.records("eval").labels
    if labels is not None and limit is not None:
        labels = labels[:limit]
    return SentenceEval(teacher, artifact.teacher_dir, ctx.run, labels)


# ---------------------------------------------------------------------------------------------- ptq
def quantize_embeddings_default(artifact: Any, run: Any) -> bool:
    """ptq's `quantize_embeddings` when the config leaves it unset: on for a sentence-embedding student."""
    return run.model.task == "feature-extraction" and is_st_folder(artifact.model_dir)


def ptq_quantizes_embeddings(run: Any, teacher_dir: str | Path | None) -> bool:
    """Whether the run's ptq pass will store the embedding tables as int8, for a pass before it (search) that
    budgets int8 size and latency: a ptq pass's explicit `quantize_embeddings`, or its `auto` default, which is
    on when ptq gets a sentence-embedding student (`quantize_embeddings_default`). Whether it does follows the
    passes: the loaded teacher of a sentence run is a sentence-transformers folder, a searched student is a plain
    HF folder, and distill saves its student as a sentence-transformers folder again (`save_student_folder`);
    the other passes keep what they get (prune: `carry_st_files`)."""
    sentence = st = sentence_run(run, teacher_dir)
    for p in run.passes:
        if p.type == "search":
            st = False
        elif p.type == "distill":
            st = sentence
        elif p.type == "ptq":
            value = p.options().get("quantize_embeddings", "auto")
            if (st if value == "auto" else value is True):
                return True
    return False
