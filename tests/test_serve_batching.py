"""Batched serving (ship/batching.py): concurrent requests decode together, one forward pass per
token, adapters of one base mixed in one batch, and every reply is the one it would be alone.

The models here are the tiny random model in float64 (so a padded batch and a lone prompt agree to
the last token, not just within float32's noise), two LoRA adapters on it with random weights (so
they answer differently, at length), and a second copy of the base served as a full model."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import running
from tunekit.ship.api import Served
from tunekit.ship.serve import create_app

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

# Prompts of different lengths, so the batch is left-padded.
QUESTIONS = ["Hi", "Is the order on its way to Berlin yet?", "Refund?", "Tell me about the weather there."]


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> dict[str, Served]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    peft = get_peft_model(base, lora, adapter_name="north")
    peft.add_adapter("south", lora)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (the adapter changes nothing): make them differ
            p.data.normal_(0, 0.5)
    peft.eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    here = Path(tiny_model_dir)
    return {
        "a": Served("a", here, peft, tok, "north", 0),
        "b": Served("b", here, peft, tok, "south", 0),
        "plain": Served("plain", here, plain, tok, None, 0),
    }


def alone(s: Served, question: str, max_tokens: int, **sampling) -> str:
    """The reply transformers' own `generate` gives this prompt by itself (ship/generation.py)."""
    from tunekit.ship.generation import Generation

    if s.adapter is not None:
        s.model.set_adapter(s.adapter)
    gen = Generation(s.model, s.tokenizer, [{"role": "user", "content": question}], max_tokens, **sampling)
    return "".join(gen.pieces)


def ask(client, model: str, question: str, max_tokens: int, stream: bool = False, **fields):
    messages = [{"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, **fields
        )
        return r.choices[0].message.content, r.usage.completion_tokens
    chunks = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True, **fields
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None


@contextmanager
def held(model):
    """While inside, the model's next forward pass waits (it is busy): requests queue up behind it.
    Yields the event that lets it go."""
    go = threading.Event()
    first = {"waited": False}

    def wait(module, args, out):
        if not first["waited"]:
            first["waited"] = True
            go.wait(30)

    handle = model.get_output_embeddings().register_forward_hook(wait)
    try:
        yield go
    finally:
        go.set()
        handle.remove()


def waves(app, s: Served) -> list[int]:
    """The sizes of the waves decoded on `s`'s model so far (none before its first request)."""
    batcher = app.state.batchers.get(s.model)
    return batcher.waves if batcher is not None else []


def queued(app, s: Served) -> int:
    batcher = app.state.batchers.get(s.model)
    return len(batcher.queued) if batcher is not None else 0


def until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("mixing", ["gathered", "peft"])
def test_concurrent_requests_decode_in_one_batch_and_answer_as_alone(served, mixing, monkeypatch):
    """Requests that arrive while the model is busy join its running batch at the next token (as
    many as fit; the rest as rows finish), adapters mixed (tunekit's gathered LoRA update, or
    PEFT's `adapter_names` where that cannot run); each reply (streamed or not) is token for token
    what `generate` gives its prompt alone."""
    from tunekit.ship import batching

    gathered = []
    over = batching._GatheredLora.over
    if mixing == "peft":
        monkeypatch.setattr(batching._GatheredLora, "over", classmethod(lambda cls, model: None))
    else:
        monkeypatch.setattr(
            batching._GatheredLora, "over", classmethod(lambda cls, model: gathered.append(1) or over(model))
        )
    want = {(m, q): alone(served[m], q, 12) for m in ("a", "b") for q in QUESTIONS}
    assert len(set(want.values())) > 4  # the adapters and prompts really answer differently
    app = create_app(served)
    with running(app) as base, ThreadPoolExecutor(16) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with held(served["a"].model) as go:
            first = pool.submit(ask, client, "a", "Hello", 3)
            until(lambda: waves(app, served["a"]))
            jobs = {
                (m, q, streamed): pool.submit(ask, client, m, q, 12, streamed)
                for m in ("a", "b")
                for q in QUESTIONS
                for streamed in (False, True)
                if (q == QUESTIONS[0]) or not streamed
            }
            until(lambda: queued(app, served["a"]) == len(jobs))
            go.set()
            first.result(timeout=30)
            got = {key: job.result(timeout=60) for key, job in jobs.items()}
    batcher = app.state.batchers[served["a"].model]
    # The first wave started alone; the others joined it at its next token, as many as fit.
    assert batcher.waves[0] == 1 and batcher.largest == 8, (batcher.waves, batcher.largest)
    assert sum(batcher.waves) + batcher.joined == 1 + len(jobs)
    assert bool(gathered) == (mixing == "gathered")
    for (m, q, _), (text, tokens) in got.items():
        assert text == want[(m, q)], (m, q)
        assert tokens in (None, 12)  # the random model never stops early: max_tokens it is


def test_models_and_adapters_that_cannot_share_a_batch_get_waves_of_their_own(served):
    """A full model is a batch queue of its own; adapters PEFT cannot mix (DoRA) join only a
    batch of their own adapter. Replies are still what they are alone."""
    app = create_app(served, max_batch=3)
    with running(app) as base, ThreadPoolExecutor(16) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        for model in ("a", "plain"):  # each model's queue exists before it is held
            ask(client, model, "warm up", 1)
        assert app.state.batchers[served["a"].model].mix  # LoRA adapters share a batch
        app.state.batchers[served["a"].model].mix = False  # as DoRA ones cannot (below)
        with held(served["a"].model) as go:
            first = pool.submit(ask, client, "a", "Hello", 2)
            until(lambda: len(waves(app, served["a"])) == 2)
            jobs = [pool.submit(ask, client, m, q, 6) for m in ("b", "a") for q in QUESTIONS[:2]]
            jobs += [pool.submit(ask, client, "plain", q, 6) for q in QUESTIONS]
            until(lambda: queued(app, served["a"]) == 4 and queued(app, served["plain"]) == 4)
            go.set()
            first.result(timeout=30)
            replies = [job.result(timeout=60)[0] for job in jobs]
    # One adapter's two, then the other's. None joined the running wave: the full model was
    # waiting for its turn, and a batch takes no more rows while anything else waits.
    assert waves(app, served["a"])[2:] == [2, 2] and app.state.batchers[served["a"].model].joined == 0
    plain = app.state.batchers[served["plain"].model]
    assert sum(plain.waves) + plain.joined == 1 + len(QUESTIONS) and plain.largest <= 3  # max_batch
    wanted = [alone(served[m], q, 6) for m in ("b", "a") for q in QUESTIONS[:2]]
    wanted += [alone(served["plain"], q, 6) for q in QUESTIONS]
    assert replies == wanted


def test_a_seeded_sample_does_not_depend_on_its_batch(served):
    """Each row samples from its own generator: the same seed gives the same reply alone or
    beside others."""
    app = create_app(served)
    sample = {"temperature": 1.0, "seed": 1234}
    with running(app) as base, ThreadPoolExecutor(16) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

        def sampled(q):
            r = client.chat.completions.create(
                model="b", messages=[{"role": "user", "content": q}], max_tokens=10, **sample
            )
            return r.choices[0].message.content

        lone = sampled(QUESTIONS[1])
        with held(served["a"].model) as go:
            first = pool.submit(ask, client, "a", "Hello", 2)
            until(lambda: len(waves(app, served["a"])) == 2)  # after `lone`'s
            jobs = [pool.submit(sampled, QUESTIONS[1])] + [pool.submit(sampled, q) for q in QUESTIONS]
            until(lambda: queued(app, served["a"]) == len(jobs))
            go.set()
            first.result(timeout=30)
            got = [job.result(timeout=60) for job in jobs]
    assert got[0] == lone == got[2]  # alone, beside others, and twice in one batch


def test_a_client_that_hangs_up_leaves_its_batch_and_the_others_finish(served):
    """A stream closed mid-reply leaves the wave at its next token; the rest of the wave goes on
    to its end and the model is free afterwards."""
    import http.client
    import urllib.parse

    app = create_app(served)
    with running(app) as base, ThreadPoolExecutor(4) as pool:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        url = urllib.parse.urlsplit(base)
        with held(served["a"].model) as go:
            first = pool.submit(ask, client, "a", "Hello", 2)
            until(lambda: waves(app, served["a"]))
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            body = {"model": "b", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 400,
                    "temperature": 0, "stream": True}  # fmt: skip
            conn.request(
                "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            others = [pool.submit(ask, client, "a", q, 30) for q in QUESTIONS[:2]]
            until(lambda: queued(app, served["a"]) == 3)
            go.set()
            first.result(timeout=30)
            response = conn.getresponse()
            assert response.status == 200
            response.read1(64)  # the reply has started
            conn.close()  # and its client hangs up
            replies = [job.result(timeout=60)[0] for job in others]
        assert replies == [alone(served["a"], q, 30) for q in QUESTIONS[:2]]
        until(lambda: app.state.turns.current is None and not app.state.turns.lock.locked())
        assert ask(client, "b", "after", 2)[1] == 2


def test_dora_adapters_are_known_not_to_mix(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunekit.ship.batching import Batcher

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert not Batcher(dora, turns=None).mix
