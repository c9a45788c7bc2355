"""The sentence-transformers folder format, read and written without depending on that package.

A sentence-transformers folder is a Hugging Face model folder plus `modules.json`, the list of modules the
text goes through in order: the Transformer (path ""), a Pooling module (`1_Pooling/config.json`: which
token states make the sentence vector), optionally a Dense module (a Linear: `2_Dense/config.json` and its
weights, `linear.weight` / `linear.bias`) and a Normalize module (unit length). `SentenceSpec` is what
compress keeps of it: the pooling mode, whether a Dense projection follows (and its shape), whether the
vector is normalised. The same spec drives PyTorch (compress.embed.model), the ONNX graph and evaluation."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from compress.errors import InputError

PoolingMode = Literal["mean", "cls", "max"]
POOLING_MODES: tuple[str, ...] = ("mean", "cls", "max")
# 1_Pooling/config.json keys -> our modes; the other keys sentence-transformers knows have no ONNX twin here
_MODE_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
_UNSUPPORTED_KEYS = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ST = "sentence_transformers.models."
DENSE_DIR = "2_Dense"
IDENTITY = "torch.nn.modules.linear.Identity"


@dataclass(frozen=True)
class SentenceSpec:
    """How token states become one sentence vector: `pooling` over the valid tokens, then an optional Dense
    projection (`dense_in` -> `dense_out`, no activation), then L2 normalisation when `normalize`."""

    pooling: PoolingMode
    normalize: bool
    dim: int  # the transformer's hidden size (word_embedding_dimension)
    dense_in: int | None = None
    dense_out: int | None = None
    max_seq_length: int | None = None

    @property
    def out_dim(self) -> int:
        return self.dense_out or self.dim


def is_st_folder(folder: str | Path | None) -> bool:
    """Whether `folder` is a sentence-transformers folder with a Pooling module."""
    if folder is None:
        return False
    f = Path(folder) / "modules.json"
    if not f.is_file():
        return False
    try:
        return any(str(m.get("type", "")).endswith("Pooling") for m in json.loads(f.read_text()))
    except (ValueError, AttributeError):
        return False


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; the sentence-transformers folder names it in modules.json") from None
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err}); save the model again") from None


def folder_modes(folder: str | Path) -> tuple[list[str], dict[str, Any]]:
    """The pooling modes a folder's Pooling config switches on (ours and unsupported ones) and the config."""
    folder = Path(folder)
    modules = _read_json(folder / "modules.json")
    pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
    if pooling is None:
        raise InputError(f"{folder / 'modules.json'}: no Pooling module; this is not a sentence-embedding model")
    cfg = _read_json(folder / pooling.get("path", "1_Pooling") / "config.json")
    modes = [mode for key, mode in _MODE_KEYS.items() if cfg.get(key)]
    modes += [key for key in _UNSUPPORTED_KEYS if cfg.get(key)]
    if cfg.get("pooling_mode") and not modes:  # the newer single-string form
        modes = [str(cfg["pooling_mode"])]
    return modes, cfg


def read_spec(folder: str | Path, pooling: str | None = None, *, where: str = "model.pooling") -> SentenceSpec:
    """The SentenceSpec of a sentence-transformers folder. `pooling` picks one of the modes its Pooling config
    defines (None: the one it defines); asking for a mode it does not define is bad input."""
    folder = Path(folder)
    modes, cfg = folder_modes(folder)
    pfile = folder / "1_Pooling" / "config.json"
    ours = [m for m in modes if m in POOLING_MODES]
    if pooling is not None:
        if pooling not in ours:
            raise InputError(f"{where}: '{pooling}' is not a pooling mode {pfile} defines "
                             f"(it defines: {', '.join(modes) or 'none'}); remove {where} or set one of those")
        mode = pooling
    elif len(ours) == 1 and len(modes) == 1:
        mode = ours[0]
    else:
        raise InputError(f"{pfile}: pooling {' + '.join(modes) or 'none'} is not one of {', '.join(POOLING_MODES)}; "
                         f"set {where} to one of those the file defines, or save the model with one of them")
    modules = _read_json(folder / "modules.json")
    types = [str(m.get("type", "")) for m in modules]
    dense_in = dense_out = None
    dense = next((m for m in modules if str(m.get("type", "")).endswith("Dense")), None)
    if dense is not None:
        dcfg = _read_json(folder / dense["path"] / "config.json")
        if dcfg.get("activation_function", IDENTITY) != IDENTITY:
            raise InputError(f"{folder / dense['path'] / 'config.json'}: activation "
                             f"{dcfg['activation_function']} is not supported; only a linear (Identity) Dense")
        dense_in, dense_out = int(dcfg["in_features"]), int(dcfg["out_features"])
    st_cfg = folder / "sentence_bert_config.json"
    max_len = _read_json(st_cfg).get("max_seq_length") if st_cfg.is_file() else None
    return SentenceSpec(pooling=mode, normalize=any(t.endswith("Normalize") for t in types),
                        dim=int(cfg.get("word_embedding_dimension") or 0), dense_in=dense_in, dense_out=dense_out,
                        max_seq_length=max_len)


def load_dense(folder: str | Path, spec: SentenceSpec) -> nn.Linear | None:
    """The Dense module's Linear (its saved weights), or None when the folder has no Dense module."""
    if spec.dense_in is None or spec.dense_out is None:
        return None
    d = Path(folder) / DENSE_DIR
    dcfg = _read_json(d / "config.json")
    linear = nn.Linear(spec.dense_in, spec.dense_out, bias=bool(dcfg.get("bias", True)))
    if (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").is_file():
        state = torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise InputError(f"{d}: no model.safetensors or pytorch_model.bin with the Dense weights")
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return linear


def write_st_files(folder: str | Path, spec: SentenceSpec, dense: nn.Linear | None = None) -> Path:
    """Make the HF model folder `folder` a sentence-transformers folder (modules.json, 1_Pooling, 2_Dense
    when there is a projection, Normalize, sentence_bert_config.json). Each file is written to a temp name
    and renamed; a Dense folder is built aside and moved in whole."""
    folder = Path(folder)
    modules: list[dict[str, Any]] = [{"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"},
                                     {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"}]
    pooling_cfg = {"word_embedding_dimension": spec.dim, "pooling_mode_cls_token": spec.pooling == "cls",
                   "pooling_mode_mean_tokens": spec.pooling == "mean", "pooling_mode_max_tokens": spec.pooling == "max",
                   "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True}
    _write_json(folder / "1_Pooling" / "config.json", pooling_cfg)
    if dense is not None:
        from safetensors.torch import save_file

        modules.append({"idx": len(modules), "name": str(len(modules)), "path": DENSE_DIR, "type": _ST + "Dense"})
        tmp = Path(tempfile.mkdtemp(prefix=".dense-", dir=folder))
        _write_json(tmp / "config.json", {"in_features": dense.in_features, "out_features": dense.out_features,
                                          "bias": dense.bias is not None, "activation_function": IDENTITY})
        save_file({f"linear.{k}": v.detach().cpu().contiguous() for k, v in dense.state_dict().items()},
                  str(tmp / "model.safetensors"))
        shutil.rmtree(folder / DENSE_DIR, ignore_errors=True)
        os.replace(tmp, folder / DENSE_DIR)
    if spec.normalize:
        idx = len(modules)
        modules.append({"idx": idx, "name": str(idx), "path": f"{idx}_Normalize", "type": _ST + "Normalize"})
        (folder / f"{idx}_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    _write_json(folder / "sentence_bert_config.json",
                {"max_seq_length": spec.max_seq_length or 256, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json",
                {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine", "__version__": {"compress": "1"}})
    return folder


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
