"""tunekit: fine-tune language models on your own data, and prove the gain on held-out data.

The Python API is the same set of functions the CLI calls:

    from tunekit import load_config, fine_tune, evaluate
    run_dir = fine_tune(load_config("examples/lora_tickets.yaml"))  # any task: sft, classify, dpo, ...
    report = evaluate(run_dir)
"""

from tunekit.config import Config, config_from_dict, load_config
from tunekit.data import load_examples, split_examples, write_split
from tunekit.errors import ConfigError, DataError, ModelError, TunekitError
from tunekit.eval.evaluate import evaluate
from tunekit.quickstart import quickstart
from tunekit.train import train as fine_tune
from tunekit.train.sft import train_sft

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "ModelError",
    "TunekitError",
    "config_from_dict",
    "evaluate",
    "fine_tune",
    "load_config",
    "load_examples",
    "quickstart",
    "split_examples",
    "train_sft",
    "write_split",
]
__version__ = "0.1.0"
