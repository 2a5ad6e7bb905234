"""`tunekit export RUN_DIR --out DIR`: the fine-tune as files other tools load.

- `--merge` (adapter runs): the adapter folded into its base, saved as a plain Hugging Face
  safetensors model that `AutoModelForCausalLM.from_pretrained(DIR)` loads with no PEFT involved.
  Without `--merge` an adapter run exports the adapter alone (PEFT format); a full run always
  exports its whole model.
- `--format gguf` (see gguf_export.py): one GGUF file for llama.cpp, Ollama and LM Studio (llama,
  mistral, qwen2, qwen3 and gemma3 models; f16, q8_0 or q4_0), always merged, with an Ollama
  `Modelfile` (modelfile.py). Then the export checks itself: every test prompt rendered by the
  GGUF's own chat template must equal the training rendering, and, where llama-cpp-python is
  installed, the parity gate (eval/exported.py) runs the test split through llama.cpp and warns
  when the exported model is significantly worse than the trained one.

Every export carries the run's tokenizer with the chat template used in training and a
generation_config whose eos ids are the stop tokens training taught (the template's end-of-turn
token first), so a server that reads them stops where the model learned to stop.

QLoRA: merging into a 4-bit base and re-quantizing silently degrades the output (peft#2321), so
the base is dequantized to fp32 first and the adapter merged into that: the merged model computes
what the adapter model computed (tested).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tunekit.console import err as console
from tunekit.errors import TunekitError
from tunekit.models.stops import end_of_turn_token, stop_token_ids
from tunekit.runs.directory import load_run_config

MANIFEST = "tunekit_export.json"


def check_generative(run_dir: Path):
    """The run's config, if its task yields a language model (the task table's `generative`): only
    those can be exported, served or chatted with."""
    from tunekit.tasks import get_task, task_names

    cfg = load_run_config(run_dir)
    if not get_task(cfg.task).generative:
        takers = [t for t in task_names() if get_task(t).generative]
        raise TunekitError(
            f"{run_dir}: a task: {cfg.task} run has no language-model head to export or serve; only "
            f"task: {', '.join(takers)} runs can be exported, served or chatted with"
        )
    return cfg


def load_merged(run_dir: str | Path):
    """The run's fine-tuned model as one plain fp32 causal LM (adapter merged in), and its tokenizer.

    A qlora adapter is merged into its base dequantized, not into the original fp32 weights: the
    4-bit values are the ones training optimised the adapter against (train/setup.dequantized).
    """
    from tunekit.train.setup import load_trained

    run_dir = Path(run_dir)
    check_generative(run_dir)
    model, tokenizer, is_adapter = load_trained(run_dir, dequantize=True)
    if is_adapter:
        model = model.merge_and_unload()
    return model.eval(), tokenizer


def export(
    run_dir: str | Path,
    out: str | Path,
    merge: bool = False,
    format: str = "hf",
    quant: str = "f16",
    parity: bool = True,
) -> Path:
    """Export a run; returns the folder (hf) or the .gguf file written. `parity` (GGUF): run the
    llama.cpp parity gate when llama-cpp-python is installed."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = check_generative(run_dir)
    if format not in ("hf", "gguf"):
        raise TunekitError(f"--format {format!r}: expected hf or gguf")
    _check_out(out)
    if format == "gguf":
        from tunekit.ship.gguf_export import write_gguf
        from tunekit.ship.modelfile import write_modelfile

        model, tokenizer = load_merged(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = write_gguf(model, tokenizer, out / f"model-{quant}.gguf", quant, name=run_dir.name)
        write_modelfile(tokenizer, model, path)
        _write_manifest(out, run_dir, cfg, tokenizer, model, merged=True, format="gguf", quant=quant)
        _register(run_dir, path)
        del model
        check_gguf(run_dir, cfg, tokenizer, path, parity)
        return path
    from tunekit.train.setup import trained_dir

    trained, is_adapter = trained_dir(run_dir)
    tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None, prefix=f".{out.name}."))
    try:
        if is_adapter and not merge:
            from tunekit.models import load_tokenizer

            shutil.copytree(trained, tmp, dirs_exist_ok=True)
            tokenizer, model = load_tokenizer(tmp), None
        else:
            model, tokenizer = load_merged(run_dir)
            _set_stops(model, tokenizer)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        _write_manifest(tmp, run_dir, cfg, tokenizer, model, merged=model is not None, format="hf")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _register(run_dir, out)
    if not merge and is_adapter:
        console.print(f"exported the adapter -> {out} (add --merge for a standalone model)")
    return out


def check_gguf(run_dir: Path, cfg, tokenizer, path: Path, parity: bool) -> list[str]:
    """Warn about an exported GGUF that does not behave as trained: test prompts its chat template
    renders differently, and (llama-cpp-python installed, `parity`) answers significantly worse.
    Returns the warnings."""
    import importlib.util

    from tunekit.eval.exported import check_prompts, evaluate_exported, parity_warnings
    from tunekit.runs.directory import load_test_examples

    try:
        examples = load_test_examples(run_dir, cfg)
    except TunekitError:  # no held-out split: nothing to check against
        return []
    if not any(ex.prompt for ex in examples):
        # Raw text (task: pretrain): documents, no prompts for the template to render or the model to answer.
        console.print("the held-out documents have no prompts: no prompt check or parity gate for this run")
        return []
    if parity and importlib.util.find_spec("llama_cpp") is not None:
        console.print(f"parity gate: the {len(examples)} test prompts through llama.cpp on {path.name}")
        try:
            return parity_warnings(evaluate_exported(run_dir, path))
        except TunekitError as e:  # the file is written; a gate that cannot run must not undo that
            console.print(f"[yellow]warning:[/yellow] the parity gate could not run: {e}")
            return [str(e)]
    warnings = []
    differ = check_prompts(path, tokenizer, examples)
    if differ:
        warnings.append(
            f"{len(differ)} of {len(examples)} test prompts render differently with the GGUF's chat "
            f"template than in training (first: {differ[0]['source']})"
        )
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if parity:
        console.print(
            "note: llama-cpp-python is not installed, so the exported file was not run; "
            "`make verify-gguf` installs it, then `tunekit eval RUN --exported FILE.gguf`"
        )
    return warnings


def _check_out(out: Path) -> None:
    """Write into an empty or missing folder, or over an earlier export; never over anything else."""
    if out.is_file():
        raise TunekitError(f"--out {out}: is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise TunekitError(
            f"--out {out}: the folder is not empty and is not an earlier export; choose another"
        )


def _set_stops(model, tokenizer) -> None:
    """The generation config ends replies on the stop tokens training taught."""
    ids = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = ids[0]


def _write_manifest(folder: Path, run_dir: Path, cfg, tokenizer, model, merged: bool, **extra) -> None:
    from tunekit.io import atomic_write_json

    ids = stop_token_ids(tokenizer, model)
    atomic_write_json(
        folder / MANIFEST,
        {
            "run_dir": str(run_dir.resolve()),
            "base_model": cfg.model,
            "method": cfg.method,
            "merged": merged,
            "end_of_turn_token": end_of_turn_token(tokenizer),
            "stop_token_ids": ids,
            "stop_tokens": tokenizer.convert_ids_to_tokens(ids),
            "chat_template": tokenizer.chat_template,
        }
        | extra,
    )


def _register(run_dir: Path, path: Path) -> None:
    from tunekit.runs import registry

    registry.add_artifact(run_dir, "export", path)
