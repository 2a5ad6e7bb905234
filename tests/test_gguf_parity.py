"""The export parity gate: `tunekit eval RUN --exported FILE.gguf` and the checks `tunekit export`
runs on every GGUF (prompts rendered by the GGUF's own template; with llama.cpp, the answers)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tunekit.ship.export import export

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module")
def answering_run(tiny_model_dir, tmp_path_factory):
    """A tiny LoRA run that answers every question with the same code (exact match 1.0 on its test)."""
    from conftest import train_to_answer

    return train_to_answer(tiny_model_dir, tmp_path_factory.mktemp("parity") / "run", "CODE-7")


def test_export_checks_the_gguf_template_against_training(answering_run, tmp_path, monkeypatch, capsys):
    from tunekit.runs.directory import load_run_config
    from tunekit.ship.export import check_gguf
    from tunekit.train.setup import load_trained

    real = importlib.util.find_spec  # as on a machine without llama.cpp
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a)
    )
    path = export(answering_run, tmp_path / "gguf", format="gguf", quant="q8_0")
    assert (path.parent / "Modelfile").read_text().startswith("# Ollama")
    err = capsys.readouterr().err
    assert "llama-cpp-python is not installed" in err and "warning" not in err
    # A tokenizer whose template changed since training: every prompt differs, and export says so.
    _, tok, _ = load_trained(answering_run)
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    warnings = check_gguf(answering_run, load_run_config(answering_run), tok, path, parity=False)
    assert len(warnings) == 1 and "render differently" in warnings[0]


@pytest.mark.skipif(
    not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (make verify-gguf builds it once)"
)
def test_parity_gate_runs_the_test_split_through_llama_cpp(answering_run, tmp_path):
    from tunekit.eval.exported import REPORT, evaluate_exported

    path = export(answering_run, tmp_path / "gguf", format="gguf", quant="f16", parity=False)
    report = evaluate_exported(answering_run, path, quiet=True)
    assert json.loads((answering_run / REPORT).read_text())["gguf"] == str(path.resolve())
    m = report["task_metric"]
    assert report["prompt_text_mismatches"] == 0 and report["prompt_token_mismatches"] == 0
    # f16: llama.cpp answers every held-out prompt with the trained model's exact reply.
    assert report["same_prediction"] == 1.0 and report["exported"][m] == report["trained"][m]
    assert report["exported_vs_trained"]["difference"] == 0 and not report["significantly_worse"]
    assert [e["exported"] for e in report["examples"]] == [e["trained"] for e in report["examples"]]
