"""`data.replay: self`: the base model's own answers to general prompts, mixed into training.

A fine-tune on a narrow task (JSON records, one label per line) pulls every answer towards the task's
shape, and the model forgets how it answered anything else (measured: the default recipe took the
forgetting probe's open questions from 0.675 to 0.000). Replaying a little general data during
training pulls it back. The most faithful general data for a model is its own: its greedy answers to
a set of general prompts (data/general_prompts.jsonl) before any training step (self-distillation).
They need no outside dataset, carry no other model's style or license, and teach nothing new: the
replay only asks the model to keep answering as it did.

The answers are generated once, batched and bounded (`data.replay.max_new_tokens`), and cached as
JSONL under $TUNEKIT_HOME/replay/, keyed by what they depend on: the base model's identity (its
folder and its weight and config files' sizes and mtimes, as models/load.py keys its caches), the
chat template, the prompts' content, the generation settings and whether the base is 4-bit (qlora).
Answers that did not finish within max_new_tokens are kept in the cache but not replayed: training
on a cut answer followed by the end-of-turn token would teach the model to stop mid-sentence.

Run as: part of `tunekit train` (task: sft) with `data.replay: self` in the config.
"""

from __future__ import annotations

import gc
import hashlib
import json
import time
from pathlib import Path

import torch

from tunekit.config import Config, ReplayConfig
from tunekit.console import err as console
from tunekit.data.example import Example, Message
from tunekit.data.replay import general_prompts_path, read_prompts, replay_examples
from tunekit.data.tokenize import render_prompt
from tunekit.errors import DataError
from tunekit.io import atomic_write_jsonl
from tunekit.models.load import tunekit_home
from tunekit.models.stops import before_stop, reply_text, stop_token_ids
from tunekit.train import distributed

CACHE_VERSION = 1  # bump when what a cache file holds, or how it is generated, changes
MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "generation_config.json")


def replay_for_training(cfg: Config, tokenizer, model_path: Path, n_train: int, quiet: bool) -> list[Example]:
    """The replay examples `cfg.data.replay` adds to a training split of `n_train` examples (none when
    it is off), with one line saying how many and from where. Call it before the model is built:
    `self` loads the plain base model once to answer the prompts when its cache is missing."""
    replay = cfg.data.replay
    if replay is None:
        return []
    if replay.source == "file":
        extra = replay_examples(replay, n_train)
        if not quiet and distributed.is_main():
            console.print(f"replay: {len(extra)} examples from {replay.path} mixed into training")
        return extra
    pool, cache, built = self_replay_pool(cfg, tokenizer, model_path, quiet)
    extra = replay_examples(replay, n_train, pool)
    if not pool and distributed.is_main():  # printed even when quiet: the user asked for a replay
        console.print(
            f"[yellow]replay: self: none of the base model's answers in {cache} finished within "
            f"data.replay.max_new_tokens={replay.max_new_tokens} tokens, so nothing is replayed; raise it, "
            "or give shorter prompts (data.replay.prompts)[/]"
        )
    elif not quiet and distributed.is_main():
        how = f"built in {built:.0f}s" if built is not None else "cached"
        console.print(
            f"replay: self: {len(extra)} examples (ratio {replay.ratio} of {n_train}) drawn from the base "
            f"model's {len(pool)} finished answers to general prompts, {how}: {cache}"
        )
    return extra


def self_replay_pool(
    cfg: Config, tokenizer, model_path: Path, quiet: bool = True
) -> tuple[list[Example], Path, float | None]:
    """(the base model's finished answers as examples, the cache file, seconds spent generating them
    or None when the cache held them). Under `--nproc N` rank 0 generates, the others wait and read."""
    replay = cfg.data.replay
    prompts_path = replay.prompts or general_prompts_path()
    prompts = read_prompts(prompts_path)
    path = cache_path(model_path, tokenizer, prompts, replay, quantized=cfg.method == "qlora")
    seconds = None
    if distributed.is_main() and not path.is_file():
        if not quiet:
            console.print(
                f"replay: self: the base model answers {len(prompts)} general prompts "
                f"(once; at most {replay.max_new_tokens} tokens each)"
            )
        t0 = time.perf_counter()
        rows = generate_answers(cfg, tokenizer, model_path, prompts, quiet)
        atomic_write_jsonl(path, rows)
        seconds = time.perf_counter() - t0
    distributed.barrier()
    return pool_from_cache(path), path, seconds


def cache_path(
    model_path: Path, tokenizer, prompts: list[str], replay: ReplayConfig, quantized: bool
) -> Path:
    """$TUNEKIT_HOME/replay/<model folder name>-<key>.jsonl, the key a hash of everything the answers
    depend on: change the model, its template, the prompts or the settings and the cache misses."""
    key = {
        "version": CACHE_VERSION,
        "model": model_identity(model_path),
        "template": tokenizer.chat_template or "",
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "max_new_tokens": replay.max_new_tokens,
        "decoding": "greedy",
        "quantized": quantized,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return tunekit_home() / "replay" / f"{Path(model_path).name}-{digest}.jsonl"


def model_identity(model_path: Path) -> dict:
    """The model folder's absolute path and, for each weight and config file, its size and mtime:
    a re-converted or edited model gets a new identity without hashing gigabytes of weights."""
    folder = Path(model_path).resolve()
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern)})
    return {"path": str(folder), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def generate_answers(
    cfg: Config, tokenizer, model_path: Path, prompts: list[str], quiet: bool = True
) -> list[dict]:
    """The plain base model's greedy answer to each prompt: {prompt, answer, finished} rows in prompt
    order. The model is loaded as training loads it (4-bit for qlora), without adapters or speed
    pieces, and freed afterwards, so training's peak memory does not add to it."""
    from tunekit.train.setup import fit_vocabulary, frozen_base_dtype, load_base

    model = load_base(model_path, cfg.method, dtype=frozen_base_dtype(cfg))
    fit_vocabulary(model, tokenizer, quiet=True)  # a template's added turn tokens need their rows
    try:
        t0 = time.perf_counter()

        def progress(done: int) -> None:
            if not quiet:
                console.print(
                    f"replay: self: {done}/{len(prompts)} answered ({time.perf_counter() - t0:.0f}s)"
                )

        return answer(
            model, tokenizer, prompts, cfg.data.replay.max_new_tokens, cfg.eval.batch_size, progress
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def answer(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, progress=None
) -> list[dict]:
    """Greedy answers of `model` to single-turn `prompts`, stopping where eval, serve and chat stop
    (models/stops.py); `finished` says whether the answer ended with a stop token in time.
    `progress(n_done)` is called after each chunk of a few batches (a CPU takes minutes for all)."""
    from tunekit.eval.generate import generate_ids

    model.eval()
    examples = [Example(messages=(Message("user", p), Message("assistant", ""))) for p in prompts]
    rendered = [render_prompt(tokenizer, ex) for ex in examples]
    stops = stop_token_ids(tokenizer, model)
    # Shortest first, in chunks of 4 batches: batches pad little, and progress shows between chunks.
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    rows: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), 4 * batch_size):
        idx = order[start : start + 4 * batch_size]
        got = generate_ids(model, tokenizer, [rendered[i] for i in idx], max_new_tokens, batch_size, stops)
        for i, ids in zip(idx, got, strict=True):
            rows[i] = ids
        if progress is not None:
            progress(start + len(idx))
    return [
        {
            "prompt": p,
            "answer": reply_text(tokenizer, ids, stops).strip(),
            "finished": len(before_stop(ids, stops)) < len(ids),
        }
        for p, ids in zip(prompts, rows, strict=True)
    ]


def pool_from_cache(path: Path) -> list[Example]:
    """The cached answers that finished and are not empty, as single-turn examples."""
    pool = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            keep = bool(row["finished"] and row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                [f"{path}:{line_no}: not a self-replay cache row ({line[:60]!r})"],
                header="data.replay: self: the cached answers are damaged; delete the file and they are "
                "generated again",
            ) from None
        if keep:
            msgs = (Message("user", row["prompt"]), Message("assistant", row["answer"]))
            pool.append(Example(messages=msgs, source=str(path), line=line_no, format="self-replay"))
    return pool
