"""Shared fixtures: the real tokenizer of the default model, and tiny random llama models built from it."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def signal_on_call(monkeypatch, owner, name: str, k: int, signum: int | None = None) -> None:
    """Patch `owner.name` so that its k-th call (1-based) first delivers a real signal (SIGTERM by
    default) to this process, as a user's kill or Ctrl-C would, then runs as usual."""
    import signal

    real, calls = getattr(owner, name), {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            signal.raise_signal(signum or signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def shared_data(rel: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"../shared/data not present ({path}): real-data test skipped")
    return path


def jsonl(*rows: object) -> str:
    """Rows as JSON Lines text."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    """Write a test data file byte for byte (no newline translation)."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default, converted once into the tunekit cache."""
    from tunekit.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from tunekit.models import load_tokenizer

    return load_tokenizer(default_model_dir)


def make_tiny_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 llama with the real tokenizer and chat template, saved as a HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # Wide init: with the default 0.02 a 64-wide tied head can only produce logits of about +-1, so
        # no adapter could ever fit a target; 0.2 gives the head the range a trained model has.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


# The architecture matrix (tests/test_architectures.py): family -> (transformers config class, the
# settings that make its tiny model exercise what sets the family apart). Sliding windows of 8
# tokens are shorter than the test rows, so a kernel that ignored the window would compute
# something else; qwen2 has its q/k/v biases, qwen3 and gemma3 their q/k norms, phi3 its fused
# qkv_proj and gate_up_proj, gemma2 its attention and final-logit soft-capping.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "gemma3_text": (
        "Gemma3TextConfig",
        {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"]},
    ),
    "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8}),
}  # fmt: skip


def make_tiny(family: str, folder: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """A 2-layer, hidden-64 model of `family` (a key of ARCHITECTURES, or any transformers config
    class name with `overrides`) with the real tokenizer and chat template, saved as a HF folder.

    Unlike make_tiny_llama's, the config names no pad token: the end-of-turn token (which pads) keeps
    a real embedding row instead of nn.Embedding's all-zero padding row, so a fine-tune can learn to
    stop (its tied logit would be 0 whatever the input)."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, own = ARCHITECTURES.get(family, (family, {}))
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, initializer_range=0.2,  # wide init: see make_tiny_llama
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, **(own | overrides),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, tokenizer):
    """family -> the folder of its tiny model, built once per session on first use."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"), tokenizer)
        return built[family]

    return get


def build_model_for(model_dir: Path, chat_file: Path, method: str = "lora", **train):
    """`build_model` as a config with these `train` keys builds it (LoRA dropout 0: deterministic)."""
    from tunekit.config import config_from_dict
    from tunekit.train.setup import build_model

    cfg = config_from_dict(
        {"model": str(model_dir), "method": method, "data": {"train": str(chat_file)},
         "lora": {"dropout": 0.0}, "train": train}
    )  # fmt: skip
    return build_model(cfg, model_dir)


@pytest.fixture
def chat_file(tmp_path) -> Path:
    """A small chat JSONL the tiny model can overfit: 24 fixed question -> answer pairs."""
    import json

    rows = []
    for i in range(24):
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the code for item {i}?"},
                    {"role": "assistant", "content": f"CODE-{i % 4}"},
                ]
            }
        )
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_rows(tokenizer, chat_file) -> list:
    """The first four examples of `chat_file`, tokenized as SFT tokenizes them."""
    from tunekit.data import load_examples
    from tunekit.data.tokenize import tokenize_example

    return [tokenize_example(tokenizer, ex, 64) for ex in load_examples(chat_file)[:4]]


@pytest.fixture
def chat_batch(tokenizer, chat_rows) -> dict:
    """`chat_rows` collated into one padded training batch."""
    from tunekit.train.batching import collate

    return collate(chat_rows, tokenizer.pad_token_id)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """16 preference pairs a tiny model can separate: the chosen answer is CODE-k, the rejected NOPE-k."""
    rows = [
        {"prompt": f"What is the code for item {i}?", "chosen": f"CODE-{i % 4}", "rejected": f"NOPE-{i % 4}"}
        for i in range(16)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text(jsonl(*rows))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """`app` on a real uvicorn server on a free port, in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def train_to_answer(model_dir: Path, out: Path, answer: str, question: str = "question {i}?", **cfg):
    """A LoRA run on `model_dir` trained (40 steps, lr 2e-2) until every question gets `answer`;
    `cfg` adds config sections (e.g. eval=...). Returns the run directory `out`."""
    from tunekit.config import config_from_dict
    from tunekit.train.session import train

    out.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": question.format(i=i)}, {"role": "assistant", "content": answer}]}
            for i in range(24)]  # fmt: skip
    data = write(out.parent, f"{out.name}.jsonl", jsonl(*rows))
    config = {
        "model": str(model_dir),
        "data": {"train": str(data)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 40, "learning_rate": 2e-2, "batch_size": 4, "max_length": 64, "seed": 0},
        "output_dir": str(out),
    }
    return train(config_from_dict(config | cfg), quiet=True)


def varied_length_questions(n: int):
    """`n` one-turn Examples whose prompts differ a lot in length, so batches need padding."""
    from tunekit.data.example import Example, Message

    return [
        Example(
            messages=(
                Message("user", "word " * (1 + 7 * (i % 5)) + f"question {i}"),
                Message("assistant", "x"),
            )
        )
        for i in range(n)
    ]


def chromium_path() -> str:
    """The headless browser for the dashboard and report.html tests; skips, saying how to get one."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium found: install Debian's (apt-get install chromium) to run the browser tests")


def train_old_and_new(tiny_model_dir: Path, chat_file: Path, folder: Path, probe) -> tuple[Path, Path]:
    """OLD, a LoRA run on the chat data; NEW, retrained from OLD on new data (item codes), as
    `tunekit train CONFIG --from OLD` does; `probe` is both runs' eval.probe. Returns (OLD, NEW)."""
    import json

    from tunekit.config import config_from_dict
    from tunekit.train.session import train

    new_data = folder / "new.jsonl"
    new_data.write_text(
        "".join(
            json.dumps({"prompt": f"What is the code for item {i}?", "completion": f"CODE-{i % 4}"}) + "\n"
            for i in range(24, 48)
        )
    )

    def cfg(name: str, data, **train_keys):
        return config_from_dict(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(data)},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": {"epochs": 5, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0}
                | train_keys,
                "eval": {"max_new_tokens": 6, "probe": probe},
                "output_dir": str(folder / name),
            }
        )

    old = train(cfg("old", chat_file), quiet=True)
    return old, train(cfg("new", new_data, init_from=str(old)), quiet=True)
