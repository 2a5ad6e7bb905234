"""tunekit: fine-tune language models on your own data, and prove the gain on held-out data.

The Python API is the same set of functions the CLI calls:

    from tunekit import load_config, train_sft, evaluate
    run_dir = train_sft(load_config("examples/lora.yaml"))
    report = evaluate(run_dir)
"""

from tunekit.config import Config, config_from_dict, load_config
from tunekit.data import load_examples, split_examples, write_split
from tunekit.errors import ConfigError, DataError, ModelError, TunekitError
from tunekit.eval.evaluate import evaluate
from tunekit.quickstart import quickstart
from tunekit.train.sft import train_sft

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "ModelError",
    "TunekitError",
    "config_from_dict",
    "evaluate",
    "load_config",
    "load_examples",
    "quickstart",
    "split_examples",
    "train_sft",
    "write_split",
]
__version__ = "0.1.0"
