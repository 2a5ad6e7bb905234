"""One source for the tokens that end a reply (models/stops.py): `tunekit eval` stops and cuts where
`serve` and `chat` do, also when the chat template's end-of-turn token is not the eos.

The Gemma-style template below ends a turn with `<end_of_turn>` while the tokenizer's eos stays
SmolLM2's `<|im_end|>`. Eval used to stop on the eos ids alone: a model that answered right ran on
past its end-of-turn token, and eval scored it wrong.
"""

from __future__ import annotations

import io
import json
import urllib.request

import pytest

from conftest import make_tiny_llama, running, train_to_answer
from tunekit.eval.evaluate import evaluate
from tunekit.eval.generate import generate
from tunekit.models import load_model, load_tokenizer
from tunekit.models.stops import end_of_turn_token, reply_text, stop_token_ids
from tunekit.runs.directory import load_run_config, load_test_examples
from tunekit.ship.generation import stream_reply
from tunekit.train.setup import load_trained

GEMMA_TEMPLATE = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
ANSWER = "READY"


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory, tiny_model_dir):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module's runs
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


@pytest.fixture(scope="module", params=["special", "plain"])
def gemma_dir(request, tmp_path_factory, default_model_dir):
    """A tiny llama whose chat template is Gemma-style: turns end with `<end_of_turn>`, a token
    other than the eos. "special": the token is a special token (as in Gemma's tokenizer);
    "plain": an added token that is not special, so decoding with skip_special_tokens keeps it."""
    tok = load_tokenizer(default_model_dir)  # a fresh copy: the session's tokenizer stays as it is
    turn_tokens = ["<start_of_turn>", "<end_of_turn>"]
    if request.param == "special":
        tok.add_special_tokens({"additional_special_tokens": turn_tokens})
    else:
        tok.add_tokens(turn_tokens)
    tok.chat_template = GEMMA_TEMPLATE
    folder = make_tiny_llama(tmp_path_factory.mktemp(f"gemma-{request.param}"), tok)
    assert end_of_turn_token(load_tokenizer(folder)) == "<end_of_turn>" != tok.eos_token
    return folder


@pytest.fixture(scope="module")
def gemma_run(gemma_dir, tmp_path_factory):
    """A LoRA run on `gemma_dir` trained until it answers every question with ANSWER<end_of_turn>."""
    folder = tmp_path_factory.mktemp("gemma-run")
    eval_cfg = {"max_new_tokens": 16, "probe": None, "few_shot": 0}
    return train_to_answer(gemma_dir, folder / "run", ANSWER, "Is order {i} ready?", eval=eval_cfg)


def _spy_generate(monkeypatch, model) -> list[tuple[dict, object]]:
    """Record each `model.generate` call's keyword arguments and output."""
    calls, real = [], model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    return calls


def _stop_ids_used(monkeypatch, model, tok) -> tuple[list[int], list[int]]:
    """The eos ids eval's `generate` and serve/chat's `stream_reply` hand to `model.generate`."""
    from tunekit.data.example import Example, Message

    calls = _spy_generate(monkeypatch, model)
    generate(model, tok, [Example(messages=(Message("user", "hi"), Message("assistant", "x")))], 2)
    pieces, _ = stream_reply(model, tok, [{"role": "user", "content": "hi"}], max_tokens=2)
    "".join(pieces)
    (eval_kwargs, _), (serve_kwargs, _) = calls
    return eval_kwargs["eos_token_id"], serve_kwargs["eos_token_id"]


def test_eval_and_serve_stop_on_the_same_ids_for_chatml(monkeypatch, tiny_model_dir):
    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    in_eval, in_serve = _stop_ids_used(monkeypatch, model, tok)
    assert in_eval == in_serve == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_eval_and_serve_stop_on_the_same_ids_for_a_gemma_style_template(monkeypatch, gemma_dir):
    tok, model = load_tokenizer(gemma_dir), load_model(gemma_dir)
    in_eval, in_serve = _stop_ids_used(monkeypatch, model, tok)
    eot, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id
    assert eot != eos
    assert in_eval == in_serve == [eot, eos]


def test_reply_text_cuts_at_the_first_stop_token(gemma_dir):
    tok = load_tokenizer(gemma_dir)
    stops = stop_token_ids(tok)
    ids = tok(f"{ANSWER}<end_of_turn>\nmore text", add_special_tokens=False)["input_ids"]
    assert reply_text(tok, ids + [tok.pad_token_id] * 3, stops) == ANSWER
    assert reply_text(tok, tok(ANSWER, add_special_tokens=False)["input_ids"], stops) == ANSWER


def test_eval_serve_and_chat_stop_at_the_end_of_turn_token_with_the_same_text(monkeypatch, gemma_run):
    model, tok, _ = load_trained(gemma_run)
    examples = load_test_examples(gemma_run, load_run_config(gemma_run), None)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    answer_ids = tok(ANSWER, add_special_tokens=False)["input_ids"]

    # eval: each row's generation ends right at <end_of_turn>, not at max_new_tokens
    calls = _spy_generate(monkeypatch, model)
    preds = generate(model, tok, examples, max_new_tokens=16)
    assert preds == [ANSWER] * len(examples)
    ((kwargs, out),) = calls
    new = out[:, kwargs["input_ids"].shape[1] :].tolist()
    assert new == [answer_ids + [eot]] * len(examples)

    # serve: the same replies over HTTP, ended by the same token ("stop", the same token count)
    from tunekit.ship.serve import create_app, load_models

    served = load_models([gemma_run])
    (name,) = served
    with running(create_app(served)) as base:
        for ex, pred in zip(examples, preds, strict=True):
            messages = [{"role": m.role, "content": m.content} for m in ex.prompt]
            body = {"model": name, "messages": messages, "temperature": 0, "max_tokens": 16}
            reply = _post(f"{base}/v1/chat/completions", body)
            assert reply["choices"][0]["message"]["content"] == pred
            assert reply["choices"][0]["finish_reason"] == "stop"
            assert reply["usage"]["completion_tokens"] == len(answer_ids) + 1
            streamed = _post_stream(f"{base}/v1/chat/completions", body | {"stream": True})
            assert streamed == pred

    # chat in the terminal
    from tunekit.ship.chat import chat

    history = chat(gemma_run, lines=[examples[0].prompt[-1].content], out=io.StringIO())
    assert history[-1] == {"role": "assistant", "content": preds[0]}


def test_eval_scores_the_right_answer_as_an_exact_match(gemma_run):
    report = evaluate(gemma_run, quiet=True)
    assert report["task_metric"] == "exact_match"
    assert report["contenders"]["finetuned"]["exact_match"] == 1.0
    rows = json.loads((gemma_run / "predictions.json").read_text())
    assert [r["finetuned"] for r in rows] == [ANSWER] * len(rows)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _post_stream(url: str, body: dict) -> str:
    """The text of a streamed (SSE) chat completion."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    text = ""
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    return text
