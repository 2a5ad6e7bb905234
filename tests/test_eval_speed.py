"""Fast evaluation (issue 22 item 4): the shared prompt prefix encoded once, label scoring in place
of free generation for label data, the probe scored against each question's cache. Each fast path
is checked against the plain computation it replaces, on the tiny model."""

from __future__ import annotations

import pytest
import torch

from conftest import varied_length_questions
from tunekit.data.example import Example, Message
from tunekit.data.tokenize import render_prompt
from tunekit.eval.evaluate import with_shots
from tunekit.eval.generate import SharedPrefix, generate_ids
from tunekit.models.stops import stop_token_ids


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from tunekit.models import load_model, load_tokenizer

    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_shared_prefix_generation_gives_the_plain_replies(tiny):
    """Zero-shot and few-shot prompts: the prefix's cache reused by every batch, rows padded in the
    middle, gives the same greedy tokens as plain left-padded batches."""
    model, tok = tiny
    examples = varied_length_questions(7)
    shots = [
        Example(messages=(Message("user", f"shot {k} " * 5), Message("assistant", f"answer {k}")))
        for k in range(3)
    ]
    stops = stop_token_ids(tok, model)
    for exs in (examples, [with_shots(ex, shots) for ex in examples]):
        prompts = [render_prompt(tok, ex) for ex in exs]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        assert SharedPrefix.build(model, ids, 100) is not None  # the fast path is taken
        fast = generate_ids(model, tok, prompts, 8, 3, stops)
        plain = generate_ids(model, tok, prompts, 8, 3, stops, share_prefix=False)
        assert fast == plain
        assert len({tuple(r) for r in fast}) > 1  # the replies differ: a mixed-up order would show


LABELS = ["card", "card_arrival", "card_arrival_late", "top_up", "x", "lost_or_stolen_card", "refund"]


def _labelled(n: int, shots: list[Example] | None = None) -> list[Example]:
    texts = ["where is my card", "I lost it yesterday on the train", "top up failed", "refund please now"]
    out = []
    for i in range(n):
        ex = Example(
            messages=(
                Message("user", texts[i % 4] + " ." * (i % 3)),
                Message("assistant", LABELS[(i * 3) % len(LABELS)]),
            ),
            label=LABELS[(i * 3) % len(LABELS)],
        )
        out.append(with_shots(ex, shots) if shots else ex)
    return out


def _brute_force(model, tok, example: Example, seq_lengths: dict[str, int]) -> dict[str, float]:
    """Each label's sum of log-probs through its end-of-turn token, by one plain full forward of
    the whole conversation per label: no cache, no trie, no search."""
    from tunekit.data.tokenize import IGNORE_INDEX, tokenize_example

    out = {}
    for label in LABELS:
        item = tokenize_example(tok, Example(messages=(*example.prompt, Message("assistant", label))), 4096)
        first = next(i for i, lab in enumerate(item.labels) if lab != IGNORE_INDEX)
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        span = range(first, first + seq_lengths[label])
        out[label] = sum(float(logp[k - 1, item.input_ids[k]]) for k in span)
    return out


def _setup(model, tok, examples):
    from tunekit.data.tokenize import tokenize_example
    from tunekit.eval.label_scoring import Candidates, label_scoring_unsupported

    cands = Candidates.build(tok, examples[0], LABELS, stop_token_ids(tok, model))
    items = [tokenize_example(tok, ex, 1 << 16) for ex in examples]
    assert label_scoring_unsupported(model, items, cands) is None
    return cands, items


@pytest.mark.parametrize("n_shots", [0, 2])
def test_label_scoring_picks_the_brute_force_argmax(tiny, n_shots):
    """The search's label is the argmax of the per-label sums a full forward per label gives;
    exhaustive scoring gives every label's sum; labels that are prefixes of others (card,
    card_arrival, card_arrival_late) and of different token lengths are told apart."""
    from tunekit.eval.label_scoring import score_labels

    model, tok = tiny
    shots = _labelled(n_shots) if n_shots else None
    examples = _labelled(9, shots)
    cands, items = _setup(model, tok, examples)
    lengths = {label: len(seq) for label, seq in zip(LABELS, cands.seqs, strict=True)}
    assert len(set(lengths.values())) > 2  # labels of different token lengths
    assert cands.n_nodes < sum(lengths.values())  # the prefixes share trie nodes
    fast = score_labels(model, items, cands, tok.pad_token_id, batch_size=4)
    full = score_labels(model, items, cands, tok.pad_token_id, batch_size=4, exhaustive=True)
    picked = []
    for k, ex in enumerate(examples):
        brute = _brute_force(model, tok, ex, lengths)
        best = max(LABELS, key=brute.__getitem__)
        assert fast.predictions[k] == full.predictions[k] == best
        got = {label: s for label, (s, _) in zip(LABELS, full.all_scores[k], strict=True)}
        assert got == pytest.approx(brute, abs=1e-3)
        picked.append(best)
    assert set(fast.predictions) <= set(LABELS)
    assert sum(fast.expanded) < sum(full.expanded)  # the search scored fewer than all labels
    assert len(set(picked)) > 1  # not one label for everything: the comparison means something


def test_label_scoring_gives_the_reference_test_loss(tiny):
    """The reference's (sum, count) from the scoring forward equals target_logprobs on the same
    example, so the report's test loss keeps its meaning without a second pass."""
    from tunekit.eval.label_scoring import score_labels
    from tunekit.eval.probe import target_logprobs

    model, tok = tiny
    examples = _labelled(6)
    cands, items = _setup(model, tok, examples)
    got = score_labels(model, items, cands, tok.pad_token_id, batch_size=4).reference_logprobs
    want = target_logprobs(model, items, tok.pad_token_id, 4)
    assert [n for _, n in got] == [n for _, n in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-3)


def test_the_label_a_model_prefers_wins_even_the_longest(tiny):
    """A model steered towards the longest label (after each of its tokens, and after the prompt's
    last token, the logit of the token that follows it in the label is raised by 20) predicts it
    for every prompt: the sum of log-probs does not simply favour short labels, and every
    prediction is a label of the set."""
    from tunekit.eval.label_scoring import score_labels, split_item

    model, tok = tiny
    examples = _labelled(5)
    cands, items = _setup(model, tok, examples)
    seq = cands.seqs[LABELS.index("lost_or_stolen_card")]
    assert len(seq) == max(map(len, cands.seqs))
    last_prompt_token = split_item(items[0])[0][-1]  # the assistant header's newline, in every prompt
    follows: dict[int, list[int]] = {}
    for a, b in zip((last_prompt_token, *seq), seq, strict=False):
        follows.setdefault(a, []).append(b)

    def steer(_module, _args, kwargs, out):
        fed = kwargs["input_ids"][:, -out.logits.shape[1] :]  # the tokens before each kept logit
        for a, nexts in follows.items():
            out.logits[:, :, nexts] += 20.0 * (fed == a)[..., None]
        return out

    hook = model.register_forward_hook(steer, with_kwargs=True)
    try:
        got = score_labels(model, items, cands, tok.pad_token_id, batch_size=2).predictions
    finally:
        hook.remove()
    assert got == ["lost_or_stolen_card"] * len(examples)


def test_probe_multiple_choice_scored_against_each_question_gives_the_plain_scores(tiny):
    """Each question's prompt encoded once and its options fed against its cache: the same (sum,
    count) per option as a full forward per option, so the same answers."""
    from tunekit.data.tokenize import tokenize_example
    from tunekit.eval.label_scoring import continuation_logprobs, split_item
    from tunekit.eval.probe import _qa, load_probe, score_multiple_choice, target_logprobs

    model, tok = tiny
    questions = load_probe("builtin").multiple_choice[:10]
    items = [[tokenize_example(tok, _qa(q, opt), 1024) for opt in options] for q, options, _ in questions]
    plain = [target_logprobs(model, options, tok.pad_token_id, 16) for options in items]
    prompts = [split_item(options[0])[0] for options in items]
    replies = [[split_item(it)[1] for it in options] for options in items]
    fast = continuation_logprobs(model, prompts, replies, tok.pad_token_id, batch_size=3)
    for f, p in zip(fast, plain, strict=True):
        assert [n for _, n in f] == [n for _, n in p]
        assert [s for s, _ in f] == pytest.approx([s for s, _ in p], abs=1e-3)
    want = [
        float(max(range(4), key=lambda k, p=p: p[k][0] / p[k][1]) == right)
        for p, (_, _, right) in zip(plain, questions, strict=True)
    ]
    assert score_multiple_choice(model, tok, questions, batch_size=4) == want


@pytest.fixture(scope="module")
def label_run(tiny_model_dir, tmp_path_factory):
    """A run on classification data (text -> one of four codes), briefly trained on the tiny model."""
    import json

    from tunekit.config import config_from_dict
    from tunekit.train.session import train

    tmp = tmp_path_factory.mktemp("label-run")
    rows = [{"text": f"What is the code for item {i}?", "label": f"CODE-{i % 4}"} for i in range(40)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": "sft",  # a generative run on label data (its label set: the training labels)
            "data": {"train": str(tmp / "train.jsonl")},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 3, "learning_rate": 1e-2, "batch_size": 8, "max_length": 64, "seed": 0},
            "eval": {"max_new_tokens": 6, "probe": None, "few_shot": 2},
            "output_dir": str(tmp / "run"),
        }
    )
    return train(cfg, quiet=True)


def test_eval_scores_labels_and_keeps_the_test_loss(label_run):
    """`tunekit eval` on label data scores the labels (the report says so, every prediction is a
    label); --generate generates; the test loss is the same both ways for every contender."""
    import json

    from tunekit.eval.evaluate import evaluate

    generated = evaluate(label_run, quiet=True, label_scoring=False)
    scored = evaluate(label_run, quiet=True)
    assert scored["prediction"]["mode"] == "label_scoring" and scored["prediction"]["candidates"] == 4
    assert generated["prediction"]["mode"] == "generation"
    assert "labels scored: 4 candidates" in (label_run / "report.md").read_text()
    rows = json.loads((label_run / "predictions.json").read_text())
    codes = {f"CODE-{k}" for k in range(4)}
    assert all(r[name] in codes for r in rows for name in ("base", "base_few_shot", "finetuned"))
    for name in ("base", "base_few_shot", "finetuned"):
        assert scored["contenders"][name]["test_loss"] == pytest.approx(
            generated["contenders"][name]["test_loss"], rel=1e-4
        )


@pytest.mark.parametrize("budget", [None, 3])
def test_the_prediction_does_not_depend_on_the_reference(tiny, budget):
    """The reference's path is computed with the prompt, but the search reads it only when it gets
    there: the same prompts with other references give the same predictions, exact or budgeted
    (a budget of 3 nodes: most searches settle for the greedy descent)."""
    from dataclasses import replace

    from tunekit.eval.label_scoring import score_labels

    model, tok = tiny
    examples = _labelled(6)
    cands, items = _setup(model, tok, examples)
    runs = []
    for shift in (0, 1, 4):
        others = [
            replace(ex, messages=(*ex.prompt, Message("assistant", LABELS[(k + shift) % len(LABELS)])))
            for k, ex in enumerate(examples)
        ]
        _, items = _setup(model, tok, others)
        runs.append(score_labels(model, items, cands, tok.pad_token_id, batch_size=3, budget=budget))
    assert runs[0].predictions == runs[1].predictions == runs[2].predictions
    if budget is not None:
        assert not all(runs[0].exact)  # the budget did cut searches short
