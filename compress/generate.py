"""Text generation with an exported decoder (compress.onnx.decoder) in plain ONNX Runtime: greedy decoding
and seeded sampling (temperature, top-k, top-p), batch 1, the KV cache carried from step to step.

    from compress.generate import OnnxDecoder, generate_text
    dec = OnnxDecoder("exports/tiny-llama-decoder/student.int4.onnx")
    ids = dec.generate([1, 42, 7], max_new_tokens=20)                 # greedy
    text = generate_text("exports/tiny-llama-decoder", "the weather", do_sample=True, seed=0)

`compress generate DIR "prompt"` is the command-line face of `generate_text`."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import InputError
from compress.onnx.cache import CacheLayout, is_cache_graph, read_layout


class OnnxDecoder:
    """An exported decoder with a KV cache in an ORT session: `step` runs one forward, `generate` a loop."""

    def __init__(self, path: str | Path, *, provider: str = "CPUExecutionProvider", threads: int | None = None):
        from compress.onnx.runtime import make_session

        self.path = Path(path)
        self.session = make_session(self.path, provider=provider, threads=threads)
        names = [i.name for i in self.session.get_inputs()]
        if not is_cache_graph(names):
            raise InputError(f"{self.path}: this ONNX graph has no past_key_values inputs; export it with "
                             "`{type: export, cache: true}` to generate with it")
        layout = read_layout(self.path)
        if layout is None:  # a decoder exported elsewhere (optimum): read the layout off the graph inputs
            past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
            shape = past[0].shape
            layout = CacheLayout(family="unknown", num_layers=len(past) // 2, num_kv_heads=int(shape[1]),
                                 head_dim=int(shape[3]), max_positions=None,
                                 vocab_size=int(self.session.get_outputs()[0].shape[-1] or 0))
        self.layout = layout
        self.input_names = names
        self.output_names = [o.name for o in self.session.get_outputs()]
        dtypes = {i.name: i.type for i in self.session.get_inputs()}
        self.kv_dtype = np.float16 if dtypes[layout.past_names()[0]] == "tensor(float16)" else np.float32

    # ------------------------------------------------------------------ one step
    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.layout.num_kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.layout.num_layers)]

    def step(self, input_ids: np.ndarray, past: list[np.ndarray], start: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, seq, vocab] of `input_ids` placed at positions start.. after `past` (of length
        `start`), and the new past."""
        batch, seq = input_ids.shape
        feed: dict[str, np.ndarray] = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": np.ones((batch, start + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(start, start + seq, dtype=np.int64), (batch, seq)).copy(),
        }
        feed.update(zip(self.layout.past_names(), past))
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        outs = self.session.run(self.output_names, feed)
        return outs[0], list(outs[1:])

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.layout.max_positions
        if prompt_len == 0:
            raise InputError("prompt: empty; give at least one token")
        if limit is not None and prompt_len + max_new_tokens > limit:
            raise InputError(f"prompt: {prompt_len} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"{limit} positions ({self.path.name}); shorten the prompt or lower max_new_tokens")

    # ------------------------------------------------------------------ the loop
    def generate(self, prompt: list[int], *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 0, eos_token_id: int | None | str = "model",
                 on_token: Callable[[int], None] | None = None) -> list[int]:
        """The new token ids after `prompt` (batch 1). Greedy unless `do_sample`; sampling is reproducible
        for a given `seed`. Stops at `eos_token_id` ("model": the model's own, None: never)."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens: {max_new_tokens}; need at least 1")
        if do_sample and temperature <= 0:
            raise InputError(f"temperature: {temperature}; need > 0 for sampling (or greedy decoding)")
        self.check_length(len(prompt), max_new_tokens)
        eos = self.layout.eos_token_id if eos_token_id == "model" else eos_token_id
        rng = np.random.default_rng(seed)
        ids = np.asarray([prompt], dtype=np.int64)
        past = self.empty_past()
        start, out = 0, []
        for _ in range(max_new_tokens):
            logits, past = self.step(ids, past, start)
            start += ids.shape[1]
            tok = pick(logits[0, -1], do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if eos is not None and tok == eos:
                break
            ids = np.asarray([[tok]], dtype=np.int64)
        return out

    def timed(self, prompt: list[int], new_tokens: int, prefill_runs: int = 5) -> dict[str, float]:
        """Prefill latency (ms, median of `prefill_runs`) of `prompt` and decode speed (tokens/s) of `new_tokens`
        greedy steps after it."""
        self.check_length(len(prompt), new_tokens)
        ids = np.asarray([prompt], dtype=np.int64)
        times = []
        for _ in range(max(prefill_runs, 1)):
            t0 = time.perf_counter()
            logits, past = self.step(ids, self.empty_past(), 0)
            times.append(time.perf_counter() - t0)
        prefill = float(np.median(times))
        start = len(prompt)
        tok = int(logits[0, -1].argmax())
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = self.step(np.asarray([[tok]], dtype=np.int64), past, start)
            start += 1
            tok = int(logits[0, -1].argmax())
        decode = time.perf_counter() - t1
        return {"prefill_ms": prefill * 1e3, "decode_tokens_per_s": new_tokens / decode, "decode_ms_per_token": decode * 1e3 / new_tokens}


def pick(logits: np.ndarray, *, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None, rng: np.random.Generator | None = None) -> int:
    """The next token from one row of logits: argmax, or a sample after temperature, top-k and top-p."""
    if not do_sample:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int((rng or np.random.default_rng()).choice(p.size, p=p))


def measure_decoding(path: str | Path, prompt_len: int, new_tokens: int, *, vocab_size: int | None = None,
                     threads: int | None = None, provider: str = "CPUExecutionProvider", rounds: int = 3,
                     seed: int = 0) -> dict[str, float]:
    """Median over `rounds` (after one warm-up) of prefill ms and decode tokens/s for a random prompt."""
    dec = OnnxDecoder(path, provider=provider, threads=threads)
    vocab = vocab_size or dec.layout.vocab_size
    prompt = np.random.default_rng(seed).integers(0, vocab, prompt_len).tolist()
    dec.timed(prompt, min(new_tokens, 4))
    runs = [dec.timed(prompt, new_tokens) for _ in range(rounds)]
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


# ---------------------------------------------------------------------------------------------- folders
PREFERENCE = ("student.int4.onnx", "student.int8.onnx", "student.int4-weight-only.onnx", "student.int8-dynamic.onnx",
              "student.onnx")


def find_decoder(folder: Path, variant: str | None = None) -> Path:
    """The decoder to generate with in an export folder: `variant` (a file name or a report variant such as
    int4-weight-only, fp32), else the first of PREFERENCE present (the shipped quantized model first)."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; give the output folder of a `compress run` or an .onnx file")
    candidates: list[str] = []
    if variant:
        candidates += [variant, f"student.{variant}.onnx"] + (["student.onnx"] if variant == "fp32" else [])
    else:  # the shipped quantized model is copied to student.<precision>.onnx by the run
        candidates += list(PREFERENCE)
    for name in candidates:
        p = folder / name
        if p.is_file():
            return p
    found = sorted(p.name for p in folder.glob("*.onnx"))
    what = f"'{variant}'" if variant else "a decoder"
    raise InputError(f"{folder}: {what} not found (ONNX files here: {', '.join(found) or 'none'}); pass --variant")


def load_tokenizer(folder: Path) -> Any:
    from compress.models.loading import load_preprocessor

    for d in (folder, folder / "model", folder.parent, folder.parent / "model"):
        if d.is_dir() and any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            tok = load_preprocessor(str(d))
            if tok is not None:
                return tok
    raise InputError(f"{folder}: no tokenizer found there or in its model/ folder; pass the output folder of a run")


def generate_text(folder: str | Path, prompt: str, *, variant: str | None = None, max_new_tokens: int = 30,
                  do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int | None = 0, threads: int | None = None) -> str:
    """The prompt's continuation (decoded text) from the decoder of an export folder and its tokenizer."""
    path = find_decoder(Path(folder), variant)
    tok = load_tokenizer(path.parent if Path(folder).is_file() else Path(folder))
    ids = encode_prompt(tok, prompt)
    dec = OnnxDecoder(path, threads=threads)
    eos = dec.layout.eos_token_id if dec.layout.eos_token_id is not None else getattr(tok, "sep_token_id", None)
    new = dec.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos)
    return tok.decode(new, skip_special_tokens=True)


def encode_prompt(tok: Any, prompt: str) -> list[int]:
    """Prompt ids as the model saw text in training: with the tokenizer's start token, without its end token
    (`</s>`, or a WordPiece tokenizer's [SEP], would tell the model the text is over)."""
    ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    ends = {t for t in (getattr(tok, "sep_token_id", None), getattr(tok, "eos_token_id", None)) if t is not None}
    if len(ids) > 1 and ids[-1] in ends:
        ids = ids[:-1]
    return ids
