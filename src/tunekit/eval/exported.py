"""`tunekit eval RUN --exported PATH.gguf`: does the exported file answer as the trained model does?

An export can go wrong silently: a chat template that renders differently in the runtime, a
tokenizer that splits text differently, quantization that costs accuracy. This gate runs the
run's held-out test through llama.cpp on the exported file, with each prompt rendered by the GGUF's
own chat template and tokenized by llama.cpp, and scores it beside the trained model (same
examples, same greedy decoding, same stop tokens), with a paired test on the task metric.

It also counts the prompts whose GGUF rendering (text, then token ids) differs from the training
rendering: any such prompt means the runtime shows the model something it never saw in training.
`check_prompts` (text only, no llama.cpp needed) is what `tunekit export` runs on every GGUF.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tunekit.console import err as console
from tunekit.errors import TunekitError

REPORT = "export_parity.json"


def gguf_chat_meta(path: Path) -> dict:
    """The GGUF's chat template and its bos/eos token strings (what the template may reference)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key):
        field = fields.get(key)
        return field.contents() if field is not None else None

    def token(key):
        i = value(key)
        tokens = fields.get("tokenizer.ggml.tokens")
        if i is None or tokens is None:
            return None
        return bytes(tokens.parts[tokens.data[i]]).decode("utf-8")

    return {
        "chat_template": value("tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
    }


def render_gguf_prompt(meta: dict, messages: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation (and its declared `tools`) rendered by the GGUF's own chat template, as a
    runtime that reads it does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    if not meta["chat_template"]:
        raise TunekitError("the GGUF carries no chat template (tokenizer.chat_template); re-export it")
    rendered, _ = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=meta["chat_template"],
        add_generation_prompt=True,
        bos_token=meta["bos_token"] or "",
        eos_token=meta["eos_token"] or "",
    )
    return rendered[0]


def _gguf_prompt(meta: dict, tokenizer, example) -> str:
    """The example's prompt by the GGUF's template, given the turns training gave its own template
    (data/tokenize.py `conversation`: reasoning as <think> blocks, tool use native or by the fallback)."""
    from tunekit.data.tokenize import conversation

    turns, tools, _ = conversation(tokenizer, example.prompt, example.tools)
    return render_gguf_prompt(meta, turns, tools)


def check_prompts(gguf_path: Path, tokenizer, examples) -> list[dict]:
    """The examples whose prompt, rendered by the GGUF's template, differs from training's rendering."""
    from tunekit.data.tokenize import render_prompt

    meta = gguf_chat_meta(gguf_path)
    out = []
    for ex in examples:
        train_text, gguf_text = render_prompt(tokenizer, ex), _gguf_prompt(meta, tokenizer, ex)
        if train_text != gguf_text:
            out.append({"source": ex.where, "training": train_text, "gguf": gguf_text})
    return out


@contextmanager
def _no_repack():
    """Load with llama.cpp's CPU weight repacking off (`use_extra_bufts`, the library side of
    llama-cli's --no-repack). llama-cpp-python 0.3.36 built for an AVX-512 CPU segfaults in its first
    decode of any quantized file with repacking on (SmolLM2's own Q4_1 GGUF included); repacking
    only reorders weights for speed, so the results are the same. llama-cpp-python exposes no
    argument for it, so its default-params function is wrapped while the model loads."""
    import llama_cpp.llama as llama_module

    default = llama_module.llama_cpp.llama_model_default_params

    def without_repack():
        params = default()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_repack
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = default


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (through llama-cpp-python): tokenize, logits, greedy replies."""

    def __init__(self, path: Path, n_ctx: int = 2048):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise TunekitError(
                "--exported: running a GGUF needs llama-cpp-python. Install it with "
                "`make verify-gguf` (builds it once, cached) or `pip install llama-cpp-python`."
            ) from None
        with _no_repack():
            self.llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, seed=0, verbose=False
            )
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str) -> list[int]:
        """Token ids as a llama.cpp runtime tokenizes a rendered prompt: control tokens parsed, no
        bos added beyond what the template wrote (as transformers' apply_chat_template does)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _last_logits(self) -> np.ndarray:
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """The logits for the token after `ids` (a fresh context)."""
        self.llm.reset()
        self.llm.eval(ids)
        return self._last_logits()

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
        """Greedy continuation of `ids`, up to and excluding the first stop id."""
        logits, out = self.next_logits(ids), []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits))
            if tok in stop_ids:
                break
            out.append(tok)
            self.llm.eval([tok])
            logits = self._last_logits()
        return out

    def text(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")


def evaluate_exported(
    run_dir: str | Path, gguf_path: str | Path, data: str | Path | None = None, quiet: bool = False
) -> dict:
    """The trained model and the exported GGUF on the same held-out prompts: task metric with CIs
    for both, a paired test of the difference, and the prompt/token mismatch counts. Writes
    RUN/export_parity.json."""
    from tunekit.eval.generate import generate
    from tunekit.eval.metrics import default_metrics, metrics_to_score, resolve_metric, score_metrics
    from tunekit.eval.stats import paired_difference
    from tunekit.io import atomic_write_json
    from tunekit.models.stops import stop_token_ids
    from tunekit.runs.directory import load_run_config, load_test_examples
    from tunekit.train.setup import load_trained

    run_dir, gguf_path = Path(run_dir), Path(gguf_path)
    if not gguf_path.is_file():
        raise TunekitError(
            f"--exported {gguf_path}: no such file; export one with tunekit export --format gguf"
        )
    cfg = load_run_config(run_dir)
    examples = load_test_examples(run_dir, cfg, data)
    references = [ex.target for ex in examples]
    specs = metrics_to_score(cfg.eval.metrics, None, run_dir / "config.yaml") or default_metrics(
        references, all(ex.label is not None for ex in examples)
    )
    task_metric = resolve_metric(specs[0]).name
    model, tokenizer, _ = load_trained(run_dir)
    stops = stop_token_ids(tokenizer, model)
    max_new = cfg.eval.max_new_tokens or 16 + max(
        len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references
    )

    t0 = time.perf_counter()
    trained_preds = generate(model, tokenizer, examples, max_new, cfg.eval.batch_size)
    t_trained = time.perf_counter() - t0
    del model

    from tunekit.data.tokenize import render_prompt

    meta = gguf_chat_meta(gguf_path)
    train_ids = [
        tokenizer(render_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"] for ex in examples
    ]
    # The context fits the longest prompt and its reply (test prompts may exceed train.max_length).
    runner = LlamaCpp(gguf_path, n_ctx=max(map(len, train_ids)) + max_new + 64)
    gguf_stops = sorted(set(stops) | {runner.llm.token_eos()})
    text_mismatch, token_mismatch, gguf_preds = [], 0, []
    t0 = time.perf_counter()
    for ex, want_ids in zip(examples, train_ids, strict=True):
        gguf_text = _gguf_prompt(meta, tokenizer, ex)
        if render_prompt(tokenizer, ex) != gguf_text:
            text_mismatch.append(ex.where)
        ids = runner.tokenize(gguf_text)
        token_mismatch += ids != want_ids
        gguf_preds.append(runner.text(runner.greedy(ids, max_new, gguf_stops)).strip())
    t_gguf = time.perf_counter() - t0

    trained_values, trained_scores = score_metrics(specs, trained_preds, references)
    gguf_values, gguf_scores = score_metrics(specs, gguf_preds, references)
    comparison = {"metric": task_metric} | paired_difference(
        trained_scores[task_metric], gguf_scores[task_metric]
    )
    report = {
        "gguf": str(gguf_path.resolve()),
        "n_test": len(examples),
        "task_metric": task_metric,
        "trained": trained_values | {"seconds_per_example": t_trained / len(examples)},
        "exported": gguf_values | {"seconds_per_example": t_gguf / len(examples)},
        "exported_vs_trained": comparison,
        "significantly_worse": bool(comparison["significant"] and comparison["difference"] < 0),
        "prompt_text_mismatches": len(text_mismatch),
        "prompt_token_mismatches": int(token_mismatch),
        "mismatched_sources": text_mismatch[:20],
        "same_prediction": sum(a == b for a, b in zip(trained_preds, gguf_preds, strict=True))
        / len(examples),
        "examples": [
            {"source": ex.where, "reference": ex.target, "trained": a, "exported": b}
            for ex, a, b in zip(examples, trained_preds, gguf_preds, strict=True)
        ][:20],
    }
    atomic_write_json(run_dir / REPORT, report)
    if not quiet:
        print_parity(report)
    return report


def print_parity(report: dict) -> None:
    """The two contenders side by side, the paired test and any warning."""
    m = report["task_metric"]
    c = report["exported_vs_trained"]
    for name in ("trained", "exported"):
        v = report[name]
        console.print(f"{name:>9}: {m} {v[m]:.3f} (95% CI {v[m + '_ci_low']:.3f}-{v[m + '_ci_high']:.3f})")
    console.print(
        f"exported - trained: {c['difference']:+.3f} (95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, "
        f"p={c['p_value']:.3g}, {c['test']}); same reply on {report['same_prediction']:.0%} of "
        f"{report['n_test']} prompts"
    )
    for warning in parity_warnings(report):
        console.print(f"[yellow]warning:[/yellow] {warning}")


def parity_warnings(report: dict) -> list[str]:
    """What a user must hear about an export: worse answers, or prompts the model never saw."""
    out = []
    if report["significantly_worse"]:
        c = report["exported_vs_trained"]
        out.append(
            f"the exported model is significantly worse than the trained one on {report['task_metric']} "
            f"({c['difference']:+.3f}, p={c['p_value']:.3g}): try a less aggressive --quant (f16 or q8_0)"
        )
    if report["prompt_text_mismatches"]:
        out.append(
            f"{report['prompt_text_mismatches']} of {report['n_test']} prompts render differently with the "
            "GGUF's chat template than in training (e.g. " + ", ".join(report["mismatched_sources"][:3]) + ")"
        )
    elif report["prompt_token_mismatches"]:
        out.append(
            f"{report['prompt_token_mismatches']} of {report['n_test']} prompts tokenize differently in "
            "llama.cpp than in training: the GGUF's tokenizer does not match"
        )
    return out
