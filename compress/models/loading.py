"""Loading teachers and students: local HF folders, hub ids, pip packages that ship a model, and
`python:module:factory` callables; saving students as folders that reload with `from_pretrained`."""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import InputError
from compress.tasks import get_task

log = logging.getLogger(__name__)

PICKLED_MODEL = "model.pt"


def resolve_source(path: str, base_dir: Path) -> tuple[str, str]:
    """('folder', abs path) | ('hub', id) | ('python', 'module:factory') | ('config', abs path of a model config
    file, built with random weights by compress.models.scratch) for a `model.path` value."""
    if path.startswith("python:"):
        target = path[len("python:") :]
        if ":" not in target:
            raise InputError(f"model.path: '{path}' should be python:module:function, e.g. python:mypkg.models:build")
        return "python", target
    if path.startswith("config:"):  # a model built from a config file, random weights (compress.models.scratch)
        spec = Path(os.path.expanduser(path[len("config:") :]))
        spec = spec if spec.is_absolute() else base_dir / spec
        if not spec.is_file():
            raise InputError(f"model.path: config file {spec} does not exist; fix the path (relative to the YAML file)")
        return "config", str(spec.resolve())
    if path.startswith("package:"):
        pkg = path[len("package:") :]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise InputError(
                f"model.path: package '{pkg}' is not installed; pip install {pkg.replace('_', '-')}"
            ) from None
        getter = getattr(mod, "get_model_path", None)
        if getter is None:
            raise InputError(f"model.path: package '{pkg}' has no get_model_path(); use a folder path instead")
        return "folder", str(Path(getter()).resolve())
    local = Path(os.path.expanduser(path))
    local = local if local.is_absolute() else base_dir / local
    if local.exists():
        if not (local / "config.json").is_file() and not (local / PICKLED_MODEL).is_file():
            raise InputError(f"model.path: {local} has no config.json; point it at a Hugging Face model folder")
        return "folder", str(local.resolve())
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise InputError(f"model.path: folder {local} does not exist; fix the path (relative paths start at the YAML file)")
    return "hub", path


def load_python_factory(target: str) -> tuple[nn.Module, Any]:
    module_name, func_name = target.split(":", 1)
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise InputError(f"model.path: cannot import python:{target} ({err}); check the module is on PYTHONPATH") from None
    out = factory()
    model, pre = (out if isinstance(out, tuple) else (out, None))
    if not isinstance(model, nn.Module):
        raise InputError(f"model.path: python:{target} returned {type(model).__name__}, expected a torch nn.Module")
    return model, pre


def load_model(
    source: str,
    task: str,
    *,
    num_labels: int | None = None,
    label2id: dict[str, int] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """A task model from a folder or hub id; a classification head is (re)initialised when the label set
    differs from the checkpoint's."""
    folder = Path(source)
    if (folder / PICKLED_MODEL).is_file() and not (folder / "config.json").is_file():
        return torch.load(folder / PICKLED_MODEL, weights_only=False)
    if folder.is_dir():
        check_weight_files(folder)
    spec = get_task(task)
    cls = spec.auto_class()
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if label2id is not None and spec.has_classes:
        kwargs.update(
            num_labels=len(label2id),
            label2id=dict(label2id),
            id2label={i: lab for lab, i in label2id.items()},
            ignore_mismatched_sizes=True,
        )
    elif num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        quiet_transformers()
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise InputError(f"model.path: cannot load '{source}': {str(err).splitlines()[0]}") from None
    except ValueError as err:
        raise InputError(f"model.path: '{source}' does not fit task: {str(err).splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - a weights file the loader cannot read is bad input, not our bug
        if type(err).__name__ != "SafetensorError":
            raise
        raise InputError(f"model.path: cannot read the weights in '{source}' ({_first_line(err)}); "
                         "the file is damaged or truncated: download or save it again") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def check_weight_files(folder: Path) -> None:
    """InputError naming the first `*.safetensors` file in `folder` whose header does not describe its bytes (a
    truncated download or copy); reads the headers only."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise InputError(f"{f}: not a readable safetensors file ({_first_line(err)}); it is damaged or "
                             "truncated: download or save the model again") from None


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would drown ours; errors still surface as exceptions."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_preprocessor(source: str, revision: str | None = None) -> Any:
    """The tokenizer, else the image processor, else None."""
    from transformers import AutoImageProcessor, AutoTokenizer

    for cls in (AutoTokenizer, AutoImageProcessor):
        try:
            return cls.from_pretrained(source, revision=revision)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def save_model(model: nn.Module, preprocessor: Any, folder: Path) -> Path:
    """Save so that `from_pretrained(folder)` reloads it (plain nn.Modules are pickled to model.pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        torch.save(model, folder / PICKLED_MODEL)
    if preprocessor is not None and hasattr(preprocessor, "save_pretrained"):
        preprocessor.save_pretrained(folder)
    return folder


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20
