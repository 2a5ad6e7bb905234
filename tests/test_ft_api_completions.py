"""`POST /v1/completions` with `logprobs` and `echo`: a served model scored by log-likelihood the way
lm-eval-harness's local-completions model asks (token-id prompts, echo, logprobs 1, max_tokens 1),
checked against the model's own log-probabilities; and through the official `openai` client."""

import json
import urllib.error
import urllib.request

import pytest
import torch

from conftest import make_tiny, running
from tunekit.ship.serve import Served, create_app

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = make_tiny("llama", tmp_path_factory.mktemp("completions"), tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return Served("tiny", folder, model, tokenizer, None, 0)


@pytest.fixture(scope="module")
def url(tiny):
    with running(create_app({"tiny": tiny})) as base:
        yield base


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def model_logprobs(tiny, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(tiny.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_loglikelihood_requests_as_lm_eval_sends_them(url, tiny):
    """lm-eval's parse_logprobs: the continuation's logprob is sum(token_logprobs[ctxlen:-1]), and it is
    greedy when each of those tokens is the top of top_logprobs."""
    context = tiny.tokenizer("The capital of France is")["input_ids"]
    continuation = tiny.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    other = tiny.tokenizer("Two plus two is four")["input_ids"]
    body = {"model": "tiny", "prompt": [context + continuation, other], "max_tokens": 1, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}  # fmt: skip
    status, out = post(url, body)
    assert status == 200, out
    assert [c["index"] for c in out["choices"]] == [0, 1]
    for choice, ids in zip(out["choices"], [context + continuation, other], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens and the one generated
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(model_logprobs(tiny, ids), abs=1e-4)
        for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= tok - 1e-5
    lp = out["choices"][0]["logprobs"]
    ctxlen = len(context)
    expected = sum(model_logprobs(tiny, context + continuation)[ctxlen - 1 :])
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(expected, abs=1e-4)
    assert out["usage"]["prompt_tokens"] == len(context + continuation) + len(other)


def test_a_completion_is_the_greedy_continuation_with_its_logprobs(url, tiny):
    prompt = "Once upon a time"
    status, out = post(
        url, {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    )
    assert status == 200, out
    ids = tiny.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        greedy = tiny.model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)[0, len(ids) :]
    choice = out["choices"][0]
    assert choice["text"] == tiny.tokenizer.decode(greedy, skip_special_tokens=True)
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][0] == 0
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    assert lp["token_logprobs"] == pytest.approx(
        model_logprobs(tiny, ids + greedy.tolist())[len(ids) - 1 :], abs=1e-4
    )


def test_echo_without_new_tokens_through_the_openai_client(url, tiny):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(
        model="tiny", prompt="Hello there, world", max_tokens=0, echo=True, logprobs=0
    )
    ids = tiny.tokenizer("Hello there, world")["input_ids"]
    assert out.choices[0].text == tiny.tokenizer.decode(ids) and out.usage.completion_tokens == 0
    assert out.choices[0].logprobs.token_logprobs[1:] == pytest.approx(model_logprobs(tiny, ids), abs=1e-4)
    assert out.choices[0].logprobs.top_logprobs[1] == {}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": 6}, "logprobs"),
        ({"prompt": [[1, 10**9]]}, "prompt"),
        ({"stream": True}, "stream"),
        ({"echo": "yes"}, "echo"),
        ({"max_tokens": 2000}, "prompt"),  # past the 1024-token context
    ],
)
def test_bad_completion_requests_are_400s(url, body, param):
    status, out = post(url, {"model": "tiny", "prompt": "hi", "max_tokens": 1} | body)
    assert status == 400 and out["error"]["param"] == param, out


def test_an_unknown_model_is_404(url):
    status, out = post(url, {"model": "nope", "prompt": "hi"})
    assert status == 404 and out["error"]["code"] == "model_not_found"
