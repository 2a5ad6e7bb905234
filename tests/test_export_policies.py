"""dpo and rl runs yield policies (language models): they export, merge, serve and chat like an sft run.

The check is end to end: the policy as training left it in memory (caught at the moment the recipe
saves it) computes the same logits as the run loaded back (`load_trained`) and as the merged export
loaded by plain transformers; the server and `tunekit chat` answer with that policy. An rl run's
adapter is the SFT stage's adapter trained on (not a second adapter stacked on a merged SFT model),
so the merged policy is neither the base nor the SFT stage.
"""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunekit.config import config_from_dict
from tunekit.ship.chat import chat
from tunekit.ship.export import export
from tunekit.ship.generation import stream_reply
from tunekit.train.session import train
from tunekit.train.setup import load_trained

QUESTION = "What is the code for item 3?"


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def _ids(tokenizer):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]  # fmt: skip


def _logits(model, tokenizer):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=_ids(tokenizer)).logits[0]
    model.train(was_training)
    return out


def _catch_saved_policy(monkeypatch, recipe) -> dict:
    """Record the policy's logits as the recipe hands it to save_trained."""
    caught = {}
    save = recipe.save_trained

    def saving(model, tokenizer, run_dir, method):
        caught["logits"] = _logits(model, tokenizer)
        return save(model, tokenizer, run_dir, method)

    monkeypatch.setattr(recipe, "save_trained", saving)
    return caught


def _config(model_dir, pairs_file, out, task, **extra):
    return config_from_dict(
        {
            "model": str(model_dir),
            "task": task,
            "data": {"train": str(pairs_file), "split": [0.75, 0.125, 0.125]},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 5e-2, "max_length": 64,
                      "warmup_ratio": 0.0},
            "eval": {"max_examples": 2, "max_new_tokens": 6},
            "output_dir": str(out),
        }
        | extra
    )  # fmt: skip


def _check_policy_ships(run, trained_logits, tmp_path, not_these: list) -> None:
    from fastapi.testclient import TestClient

    from tunekit.ship.serve import create_app, load_models

    policy, tok, is_adapter = load_trained(run)
    assert is_adapter
    want = _logits(policy, tok)
    torch.testing.assert_close(want, trained_logits, rtol=1e-5, atol=1e-5)  # what training left
    for other in not_these:  # the base, the SFT stage: the export must be the policy, not these
        assert (want - other).abs().max() > 1e-3

    merged = AutoModelForCausalLM.from_pretrained(export(run, tmp_path / "merged", merge=True)).eval()
    torch.testing.assert_close(_logits(merged, tok), want, rtol=1e-4, atol=1e-4)
    assert export(run, tmp_path / "gguf", format="gguf").stat().st_size > 0  # the same merge, as GGUF

    pieces, _ = stream_reply(merged, tok, [{"role": "user", "content": QUESTION}], 6, 0.0)
    expected = "".join(pieces)
    with TestClient(create_app(load_models([run]))) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": run.resolve().name, "messages": [{"role": "user", "content": QUESTION}],
                  "temperature": 0, "max_tokens": 6},
        )  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    history = chat(run, lines=[QUESTION], max_tokens=6, out=io.StringIO())
    assert history[-1] == {"role": "assistant", "content": expected}


def _base_logits(model_dir, tokenizer):
    return _logits(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)


def test_a_dpo_policy_exports_merges_serves_and_chats(
    tiny_model_dir, tokenizer, pairs_file, tmp_path, monkeypatch
):
    import tunekit.train.recipes.dpo as dpo

    caught = _catch_saved_policy(monkeypatch, dpo)
    run = train(_config(tiny_model_dir, pairs_file, tmp_path / "dpo", "dpo"), quiet=True)
    _check_policy_ships(run, caught["logits"], tmp_path, [_base_logits(tiny_model_dir, tokenizer)])


def test_an_rl_policy_on_its_sft_stage_exports_merges_serves_and_chats(
    tiny_model_dir, tokenizer, pairs_file, tmp_path, monkeypatch
):
    import tunekit.train.recipes.rl as rl

    caught = _catch_saved_policy(monkeypatch, rl)
    cfg = _config(
        tiny_model_dir, pairs_file, tmp_path / "rl", "rl",
        rl={"num_generations": 2, "max_new_tokens": 6, "max_prompts": 4},
    )  # fmt: skip
    run = train(cfg, quiet=True)
    sft_policy, tok, _ = load_trained(run / "stages" / "sft")
    not_these = [_base_logits(tiny_model_dir, tokenizer), _logits(sft_policy, tok)]
    _check_policy_ships(run, caught["logits"], tmp_path, not_these)
