"""The forgetting probe: reading probe files (the builtin one, MMLU CSVs, NQ-open) and scoring."""

import pytest

from conftest import shared_data
from tunekit.errors import DataError
from tunekit.eval.probe import (
    forgetting_report,
    load_probe,
    score_multiple_choice,
    squad_normalize,
    target_logprobs,
)


def test_builtin_probe_ships_both_kinds():
    probe = load_probe("builtin")
    assert probe.source == "builtin" and len(probe.multiple_choice) == 40 and len(probe.open) == 40
    q, options, right = probe.multiple_choice[0]
    assert q == "What is the capital of France?" and options[right] == "Paris"


def test_user_probes_from_shared_data():
    mmlu = load_probe(shared_data("mmlu/dev"), max_questions=50)
    assert len(mmlu.multiple_choice) == 50 and not mmlu.open
    assert all(len(o) == 4 and 0 <= r < 4 for _, o, r in mmlu.multiple_choice)
    nq = load_probe(shared_data("nq-open/NQ-open.dev.jsonl"), max_questions=30)
    assert len(nq.open) == 30 and all(answers for _, answers in nq.open)
    # the sample is seeded: the same questions every time
    assert load_probe(shared_data("mmlu/dev"), 50).multiple_choice == mmlu.multiple_choice


def test_bad_probe_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("What?,a,b,c,d,A\nWhy?,a,b,E\n")
    with pytest.raises(DataError, match=r"bad.csv:2: expected 6 columns"):
        load_probe(bad)
    bad_open = tmp_path / "bad.jsonl"
    bad_open.write_text('{"question": "q", "answer": ["a"]}\n{"q": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        load_probe(bad_open)
    with pytest.raises(DataError, match="no such file"):
        load_probe(tmp_path / "missing.csv")


def test_squad_normalize():
    assert squad_normalize("The  Pacific Ocean.") == "pacific ocean"


def test_target_logprobs_match_the_training_loss(tiny_model_dir, tokenizer):
    """Per-example log-likelihoods sum to the loss the training code computes on the same batch."""
    from transformers import AutoModelForCausalLM

    from tunekit.data import Example, Message
    from tunekit.data.tokenize import tokenize_example
    from tunekit.train.recipes.sft import evaluate_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    items = [
        tokenize_example(tokenizer, Example((Message("user", f"q {i}"), Message("assistant", "a" * i))), 64)
        for i in range(1, 5)
    ]
    scores = target_logprobs(model, items, tokenizer.pad_token_id, batch_size=3)
    assert [n for _, n in scores] == [it.n_loss_tokens for it in items]
    mean_loss = -sum(s for s, _ in scores) / sum(n for _, n in scores)
    assert mean_loss == pytest.approx(evaluate_loss(model, items, tokenizer.pad_token_id), rel=1e-4)


def test_multiple_choice_picks_the_most_likely_option(tiny_model_dir, tokenizer):
    """Each question's options are scored independently: putting the model's favourite option in
    the 'right' slot makes it right, whatever the slot."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = ("Pick one", ["alpha", "beta", "gamma", "delta"], 0)
    fav = [r for r in range(4) if score_multiple_choice(model, tokenizer, [(q[0], q[1], r)])[0] == 1.0]
    assert len(fav) == 1


def test_forgetting_report_measures_the_drop():
    probe = load_probe("builtin")
    base = {"multiple_choice": [1.0] * 30 + [0.0] * 10}
    tuned = {"multiple_choice": [1.0] * 20 + [0.0] * 20}
    part = forgetting_report(probe, base, tuned)["parts"]["multiple_choice"]
    assert part["base"] == 0.75 and part["finetuned"] == 0.5 and part["drop"] == pytest.approx(0.25)
    assert part["drop_ci_low"] > 0 and part["significant"]


def test_a_mistyped_probe_fails_before_any_model_loads(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """A wrong --probe path used to fail only after the base model had answered the whole test set."""
    from tunekit.config import config_from_dict, config_to_yaml
    from tunekit.errors import DataError
    from tunekit.eval import evaluate as evaluate_module

    run = tmp_path / "run"
    run.mkdir()
    cfg = config_from_dict(
        {"model": str(tiny_model_dir), "data": {"train": str(chat_file)}, "output_dir": str(run)}
    )
    (run / "config.yaml").write_text(config_to_yaml(cfg))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the probe was read")

    monkeypatch.setattr(evaluate_module, "load_test_examples", no_model)
    monkeypatch.setattr(evaluate_module, "load_trained", no_model, raising=False)
    with pytest.raises(DataError, match="no such file or folder"):
        evaluate_module.evaluate(run, quiet=True, probe=str(tmp_path / "nope.csv"))
    # `none` turns the probe off: evaluation goes on to the model (here: the stand-in that raises)
    with pytest.raises(AssertionError, match="before the probe"):
        evaluate_module.evaluate(run, quiet=True, probe="none")
