"""`tunekit eval RUN_DIR`: base model vs fine-tuned model on the same held-out test examples.

For adapter runs both contenders share one model in memory: the base is the fine-tuned model with
its adapter switched off, so the comparison cannot be skewed by loading two different copies. A
full fine-tune's base is loaded from the same source the run started from.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from tunekit.console import err as console
from tunekit.data.tokenize import render_prompt
from tunekit.errors import TunekitError
from tunekit.eval.generate import generate
from tunekit.eval.metrics import normalize, task_metrics
from tunekit.eval.report import write_report
from tunekit.io import atomic_write_json
from tunekit.models import load_model, resolve_model
from tunekit.run_dir import load_run_config, read_split
from tunekit.train.setup import load_trained
from tunekit.train.sft import evaluate_loss, tokenize_all


@contextmanager
def _contender(model, is_adapter: bool, cfg, name: str):
    """The model playing `name`: the fine-tuned one, or the base. An adapter run's base is the same
    model with its adapter switched off; a full fine-tune's base is loaded beside it."""
    if name != "base":
        yield model
    elif is_adapter:
        with model.disable_adapter():
            yield model
    else:
        base = load_model(resolve_model(cfg.model)).eval()
        yield base
        del base


# task -> (module, function) for the tasks whose evaluation is not generation: each lives in its
# own file, and `tunekit eval RUN_DIR` picks by the run's task.
EVALUATORS = {
    "classify": ("tunekit.eval.classify", "evaluate_classifier"),
    "reward": ("tunekit.eval.preference", "evaluate_preference"),
    "dpo": ("tunekit.eval.preference", "evaluate_preference"),
    "rl": ("tunekit.eval.preference", "evaluate_preference"),
}


def evaluate(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """Evaluate a run on its held-out test split (or `data`) as its task needs; writes report.json
    and report.md. For sft: the base against the fine-tuned model, by generation."""
    from importlib import import_module

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.task in EVALUATORS:
        module, func = EVALUATORS[cfg.task]
        return getattr(import_module(module), func)(run_dir, data, quiet=quiet)
    return evaluate_generation(run_dir, data, quiet)


def evaluate_generation(run_dir: Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """SFT: base and fine-tuned generate for each test prompt; scored against the reference."""
    from tunekit.data import load_examples

    cfg = load_run_config(run_dir)
    if data is not None:
        examples = load_examples(data, format=cfg.data.format, columns=cfg.data.columns or None)
    else:
        examples = read_split(run_dir, "test")
    if cfg.eval.max_examples:
        examples = examples[: cfg.eval.max_examples]
    if not examples:
        raise TunekitError(f"{run_dir}: the test split is empty; pass --data FILE or set data.split")

    model, tokenizer, is_adapter = load_trained(run_dir)
    references = [ex.target for ex in examples]
    is_cls = all(ex.label is not None for ex in examples)
    max_new = cfg.eval.max_new_tokens or 16 + max(
        len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references
    )
    test_tok = tokenize_all(tokenizer, examples, cfg.train.max_length, "test")
    prompt_tokens = sum(
        len(tokenizer(render_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]) for ex in examples
    )

    contenders, predictions = {}, {}
    for name in ("base", "finetuned"):
        t0 = time.perf_counter()
        with _contender(model, is_adapter, cfg, name) as m:
            preds = generate(m, tokenizer, examples, max_new, cfg.eval.batch_size)
            loss = evaluate_loss(m, test_tok, tokenizer.pad_token_id, cfg.eval.batch_size)
        seconds = time.perf_counter() - t0
        gen_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in preds)
        contenders[name] = task_metrics(preds, references, is_cls) | {
            "test_loss": loss,
            "perplexity": math.exp(min(loss, 50)),
            "prompt_tokens_per_example": prompt_tokens / len(examples),
            "completion_tokens_per_example": gen_tokens / len(examples),
            "seconds_per_example": seconds / len(examples),
        }
        predictions[name] = preds
        if not quiet:
            console.print(f"eval {name}: {contenders[name]} ({seconds:.0f}s)")

    task_metric = "accuracy" if is_cls else "exact_match"
    rows = [
        {
            "source": ex.where,
            "prompt": ex.prompt[-1].content if ex.prompt else "",
            "reference": ex.target,
            "base": predictions["base"][i],
            "finetuned": predictions["finetuned"][i],
            "base_correct": normalize(predictions["base"][i]) == normalize(ex.target),
            "finetuned_correct": normalize(predictions["finetuned"][i]) == normalize(ex.target),
        }
        for i, ex in enumerate(examples)
    ]
    report = {
        "task_metric": task_metric,
        "n_test": len(examples),
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "contenders": contenders,
        "examples": rows[: cfg.eval.show_examples],
        "failures": [r for r in rows if not r["finetuned_correct"]],
    }
    atomic_write_json(run_dir / "report.json", report)
    write_report(run_dir, report)
    atomic_write_json(run_dir / "predictions.json", rows)
    return report
