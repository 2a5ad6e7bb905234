"""Data: read a file, detect its format, normalize each row into an `Example`, split.

examples = load_examples("data/train.csv", columns={"label": "category"})
parts = split_examples(examples, ratios=(0.8, 0.1, 0.1), seed=42)
"""

from tunekit.data.example import Example, Message
from tunekit.data.formats import FORMATS, detect_format, load_examples, read_examples
from tunekit.data.readers import read_records
from tunekit.data.split import split_examples, write_split

__all__ = [
    "FORMATS",
    "Example",
    "Message",
    "detect_format",
    "load_examples",
    "read_examples",
    "read_records",
    "split_examples",
    "write_split",
]
