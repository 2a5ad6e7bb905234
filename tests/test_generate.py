"""Batched greedy generation (eval/generate.py) against one prompt at a time, on the tiny model."""

from __future__ import annotations

import torch

from conftest import varied_length_questions
from tunekit.data.tokenize import render_prompt
from tunekit.eval.generate import generate
from tunekit.models.stops import stop_token_ids


def test_batched_equals_one_at_a_time_in_input_order(tiny_model_dir):
    from tunekit.models import load_model, load_tokenizer

    tok, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    examples = varied_length_questions(7)
    batched = generate(model, tok, examples, max_new_tokens=6, batch_size=3)
    assert len(set(batched)) == len(batched)  # all different: a mixed-up order would show
    stops = stop_token_ids(tok, model)
    with torch.no_grad():
        for ex, got in zip(examples, batched, strict=True):
            enc = tok(render_prompt(tok, ex), add_special_tokens=False, return_tensors="pt")
            gen = model.generate(
                **enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stops
            )
            alone = tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            assert got == alone
