"""Data: read a file, detect its format, normalize each row into an `Example`, split.

examples = load_examples("data/train.csv", columns={"label": "category"})
parts = split_examples(examples, ratios=(0.8, 0.1, 0.1), seed=42)

`read_examples` returns the examples and a `Problem` for every row that could not be used;
`load_examples` raises `DataError` listing them instead.
"""

from tunekit.data.example import Example, Message
from tunekit.data.formats import (
    FORMAT_KEYS,
    FORMATS,
    FieldError,
    detect_format,
    load_examples,
    read_examples,
)
from tunekit.data.problems import Problem
from tunekit.data.readers import read_records
from tunekit.data.split import split_examples, write_split

__all__ = [
    "FORMATS",
    "FORMAT_KEYS",
    "Example",
    "FieldError",
    "Message",
    "Problem",
    "detect_format",
    "load_examples",
    "read_examples",
    "read_records",
    "split_examples",
    "write_split",
]
