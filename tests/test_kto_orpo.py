"""Preference formats and tasks beyond DPO: OpenAI's DPO JSONL reads into the same pairs as TRL's
preference rows; KTO feedback (a rated answer) reads from LLaMA-Factory's and TRL's shapes with
line-numbered errors, goes through the data check and the split; `task: kto` and `task: orpo`
compute TRL's losses on the same batch, train a tiny model, evaluate on held-out data, and their
policies export, merge and serve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import jsonl, write
from conftest import shared_data as shared
from test_export_policies import _base_logits, _catch_saved_policy, _check_policy_ships
from tunekit.config import config_from_dict, load_config
from tunekit.data import load_examples, read_examples, split_examples
from tunekit.data.check import check_data
from tunekit.data.example import Example, Message
from tunekit.data.needs import require
from tunekit.errors import DataError
from tunekit.eval.evaluate import evaluate
from tunekit.tasks import get_task
from tunekit.train.recipes.dpo import collate_pairs, reference, tokenize_pairs
from tunekit.train.recipes.kto import (
    KtoWeights,
    collate_rated,
    compute_reference_logps,
    kto_step,
    tokenize_rated,
)
from tunekit.train.recipes.orpo import answer_logps, odds_ratio_loss, orpo_step
from tunekit.train.session import train
from tunekit.train.setup import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def m(role: str, content: str, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def roles(messages) -> list[tuple[str, str]]:
    return [(x.role, x.content) for x in messages or ()]


def where(problems) -> list[tuple[int, str, str]]:
    return [(p.line, p.kind, p.field) for p in problems]


# ---- OpenAI DPO JSONL ---------------------------------------------------------------------------


def openai_row(prompt: list[dict], good: str, bad: str, **input_extra) -> dict:
    return {
        "input": {"messages": prompt, "tools": [], "parallel_tool_calls": True, **input_extra},
        "preferred_output": [m("assistant", good)],
        "non_preferred_output": [m("assistant", bad)],
    }


def test_openai_dpo_rows_read_into_the_same_pairs_as_trl_preference_rows(tmp_path):
    system = m("system", "Answer briefly.")
    rows = [
        openai_row([m("user", "2+2?")], "4", "5"),
        openai_row([system, m("user", "Capital of France?")], "Paris", "Lyon"),
        openai_row([m("user", "Hi"), m("assistant", "Hello"), m("user", "Bye?")], "Bye!", "No."),
    ]
    trl = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [system, m("user", "Capital of France?")], "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": [m("user", "Hi"), m("assistant", "Hello"), m("user", "Bye?")], "chosen": "Bye!",
         "rejected": "No."},
    ]  # fmt: skip
    ours, problems = read_examples(write(tmp_path, "openai.jsonl", jsonl(*rows)))
    theirs = load_examples(write(tmp_path, "trl.jsonl", jsonl(*trl)))
    assert problems == [] and {e.format for e in ours} == {"openai_dpo"}
    assert [(roles(a.messages), roles(a.rejected)) for a in ours] == [
        (roles(b.messages), roles(b.rejected)) for b in theirs
    ]
    assert [a.pair() for a in ours] == [b.pair() for b in theirs]
    assert [a.content_hash() for a in ours] == [b.content_hash() for b in theirs]  # dedup sees them alike


def test_openai_dpo_errors_name_the_line_and_the_field(tmp_path):
    good = openai_row([m("user", "2+2?")], "4", "5")
    rows = [
        good,
        openai_row([m("user", "2+2?")], "4", "5", tools=[{"type": "function", "function": {"name": "add"}}]),
        {**good, "preferred_output": [m("user", "4")]},
        {**good, "non_preferred_output": "5"},
        {**good, "input": {"tools": []}},
        {**good, "input": {"messages": [m("user", "2+2?"), m("assistant", "hm")]}},
        {**good, "input": [m("user", "2+2?")]},
    ]
    path = write(tmp_path, "bad.jsonl", jsonl(*rows))
    examples, problems = read_examples(path)
    assert [e.line for e in examples] == [1]
    assert where(problems) == [
        (2, "unsupported_field", "input.tools"),
        (3, "unknown_role", "preferred_output[0].role"),
        (4, "wrong_type", "non_preferred_output"),
        (5, "missing_field", "input.messages"),
        (6, "consecutive_roles", "preferred_output[0].role"),
        (7, "wrong_type", "input"),
    ]
    assert all(str(p).startswith(f"{path}:{p.line}: {p.field}: ") for p in problems)
    # A key the format does not read, inside `input` too, is a warning (the row is kept).
    _, warned = read_examples(
        write(tmp_path, "extra.jsonl", jsonl({**good, "input": {**good["input"], "user": "x"}}))
    )
    assert where(warned) == [(1, "unused_key", "input.user")]


# ---- KTO feedback -------------------------------------------------------------------------------


def test_kto_rows_read_from_each_shape_into_one_rated_answer(tmp_path):
    convo = [m("user", "2+2?"), m("assistant", "4")]
    rows = [
        {"messages": convo, "label": True},  # LLaMA-Factory's kto_en_demo
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "label": True},
        {"prompt": "2+2?", "completion": "4", "label": True},  # TRL's unpaired preference, standard
        {"prompt": [m("user", "2+2?")], "completion": [m("assistant", "4")], "label": True},  # conversational
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    examples, problems = read_examples(write(tmp_path, "kto.jsonl", jsonl(*rows)))
    assert problems == [] and {e.format for e in examples} == {"kto"}
    assert [e.desirable for e in examples] == [True, True, True, True, False]
    assert all(roles(e.messages) == [("user", "2+2?"), ("assistant", "4")] for e in examples[:4])
    assert examples[4].target == "5" and examples[4].rejected is None and examples[4].label is None
    # A CSV has no booleans: with data.format kto its cells true/false are the labels.
    csv = write(tmp_path, "kto.csv", "prompt,completion,label\n2+2?,4,true\n2+2?,5,FALSE\n")
    assert [e.desirable for e in load_examples(csv, format="kto")] == [True, False]
    # A string label on a conversation is a class, as before: chat, not kto.
    [chat] = load_examples(write(tmp_path, "chat.jsonl", jsonl({"messages": convo, "label": "yes"})))
    assert (chat.format, chat.label, chat.desirable) == ("chat", "yes", None)


def test_kto_errors_name_the_line_and_the_field(tmp_path):
    good = {"messages": [m("user", "2+2?"), m("assistant", "4")], "label": True}
    rows = [
        good,
        {**good, "label": "yes"},
        {"messages": good["messages"]},
        {"messages": [m("user", "2+2?")], "label": False},
        {**good, "prompt": "2+2?"},
        {"prompt": "2+2?", "label": True},
        {"prompt": "2+2?", "completion": "", "label": False},
        {**good, "label": 1},
    ]
    path = write(tmp_path, "bad.jsonl", jsonl(*rows))
    examples, problems = read_examples(path)
    assert [e.line for e in examples] == [1]
    assert where(problems) == [
        (2, "bad_label", "label"),
        (3, "format_mismatch", "label"),  # a chat row in a kto file
        (4, "no_target", "messages"),
        (5, "format_mismatch", "prompt"),
        (6, "missing_field", "completion"),
        (7, "empty_content", "completion"),
        (8, "bad_label", "label"),
    ]
    assert "must be true (a desirable answer) or false" in problems[0].message
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert info.value.problems == [str(p) for p in problems]


def test_canonical_rows_carry_the_rating_and_read_back(tmp_path):
    ex = Example(messages=(Message("user", "2+2?"), Message("assistant", "5")), desirable=False)
    assert ex.to_dict()["desirable"] is False
    [back] = load_examples(write(tmp_path, "split.jsonl", jsonl(ex.to_dict())), format="chat")
    assert (back.desirable, roles(back.messages)) == (False, roles(ex.messages))
    flipped = Example(messages=ex.messages, desirable=True)
    assert flipped.content_hash() != ex.content_hash()  # one answer rated both ways: two rows


def test_data_check_counts_ratings_and_warns_one_sided_and_conflicting(tmp_path):
    rows = [{"prompt": f"q{i}?", "completion": f"a{i}", "label": True} for i in range(4)]
    rows.append({"prompt": "q0?", "completion": "a0", "label": False})  # line 5 rates line 1's answer
    report = check_data([write(tmp_path, "kto.jsonl", jsonl(*rows))])
    assert (report.kept, report.rejected, report.stats["feedback"]) == (
        5,
        0,
        {"desirable": 4, "undesirable": 1},
    )
    assert [(w.line, w.kind) for w in report.warnings if w.kind == "conflicting_feedback"] == [
        (5, "conflicting_feedback")
    ]
    assert [d["lines"] for d in report.duplicates if d["kind"] == "exact"] == [[1, 5]]
    one_sided = check_data([write(tmp_path, "good.jsonl", jsonl(*rows[:4]))])
    [warning] = [w for w in one_sided.warnings if w.kind == "one_sided_feedback"]
    assert "4 desirable and 0 undesirable" in warning.message and warning.severity == "warning"


def test_the_train_split_needs_both_kinds_and_the_split_keeps_both():
    rated = [
        Example(
            (Message("user", f"q{i}"), Message("assistant", f"a{i}")),
            desirable=i < 8,
            source="x.jsonl",
            line=i + 1,
        )
        for i in range(10)
    ]
    require("unpaired", rated, "train", "kto")
    with pytest.raises(DataError, match=r"task: kto needs both desirable and undesirable") as info:
        require("unpaired", rated[:8], "train", "kto")
    assert info.value.problems == ["x.jsonl: 8 desirable and 0 undesirable answers in the train split"]
    require("unpaired", rated[:8], "validation", "kto")  # held-out data may be one kind
    with pytest.raises(DataError, match=r"x.jsonl:1: no desirable/undesirable label"):
        require("unpaired", [Example(rated[0].messages, source="x.jsonl", line=1)], "train", "kto")
    # Stratified by the rating: 8 desirable and 2 undesirable at 0.5/0.25/0.25 put 4 + 1 in train
    # (unstratified, train could get 0 or 2 of the undesirable).
    parts = split_examples(rated, (0.5, 0.25, 0.25), seed=0)
    assert sorted(e.desirable for e in parts["train"]) == [False, True, True, True, True]
    held = parts["validation"] + parts["test"]
    assert sorted(e.desirable for e in held) == [False, True, True, True, True]


def test_real_llamafactory_kto_demo_is_kto_feedback():
    path = shared("llamafactory-demo/kto_en_demo.json")
    examples = load_examples(path)
    assert len(examples) == 300 and {e.format for e in examples} == {"kto"}
    assert sum(e.desirable for e in examples) == 150
    assert all(e.messages[-1].role == "assistant" and e.messages[-2].role == "user" for e in examples)
    report = check_data([path])
    assert report.exit_code == 0 and report.stats["feedback"] == {"desirable": 150, "undesirable": 150}
    assert not [w for w in report.warnings if w.kind in ("one_sided_feedback", "conflicting_feedback")]


# ---- the losses against TRL's -------------------------------------------------------------------


def rated_file(tmp_path, n=32) -> Path:
    """n rated answers a tiny model can separate: CODE-k is desirable, NOPE-k undesirable."""
    rows = [
        {"prompt": f"What is the code for item {i}?", "completion": f"{'CODE' if i % 2 else 'NOPE'}-{i % 4}",
         "label": bool(i % 2)}
        for i in range(n)
    ]  # fmt: skip
    return write(tmp_path, "kto.jsonl", jsonl(*rows))


def _cfg(model_dir, data, out, task, method="lora", **extra):
    return config_from_dict(
        {
            "model": str(model_dir),
            "method": method,
            "task": task,
            "data": {"train": str(data), "split": [0.75, 0.125, 0.125]},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"epochs": 2, "learning_rate": 1e-2, "batch_size": 8, "max_length": 64, "seed": 0,
                      "eval_every": 3, "warmup_ratio": 0.0},
            "eval": {"max_new_tokens": 6},
            "output_dir": str(out),
        }
        | extra
    )  # fmt: skip


def _random_adapter(model, seed: int) -> None:
    """A non-zero LoRA update, so the policy differs from its reference (the adapter switched off)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()


def test_kto_loss_equals_trl_kto_trainer_on_the_same_batch(tiny_model_dir, tokenizer, tmp_path):
    """TRL's KTOTrainer (loss_type kto, reference = adapter off, KL from the mismatched sequences)
    computes our loss on our batch; and split into micro-batches the step's loss is the same."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    w = KtoWeights(beta=0.3, desirable=1.2, undesirable=0.8)
    cfg = _cfg(tiny_model_dir, rated_file(tmp_path), tmp_path / "run", "kto")
    model, _ = build_model(cfg, tiny_model_dir)
    pad = tokenizer.pad_token_id
    items = tokenize_rated(tokenizer, load_examples(rated_file(tmp_path))[:6], 64, "test")
    for seed in range(20):  # an adapter whose KL estimate is above its clamp at 0, so z is tested too
        _random_adapter(model, seed)
        with reference(model) as ref:
            compute_reference_logps(ref, items, pad, 8)
        b = collate_rated(items, pad)
        ours, extra = kto_step(model, [b], w)
        model.zero_grad()
        if extra["kl"] > 0.01:
            break
    assert extra["kl"] > 0.01
    split, _ = kto_step(model, [collate_rated(items[:2], pad), collate_rated(items[2:], pad)], w)
    model.zero_grad()
    assert split == pytest.approx(ours, abs=1e-6)

    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), beta=w.beta, desirable_weight=w.desirable,
        undesirable_weight=w.undesirable, bf16=False, use_cpu=True, report_to=[],
        gradient_checkpointing=False, precompute_ref_log_probs=False,
    )  # fmt: skip
    data = Dataset.from_list(
        [
            {"prompt": "a", "completion": "b", "label": True},
            {"prompt": "c", "completion": "d", "label": False},
        ]
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.delete_adapter("ref")  # TRL's copy of the adapter; ours is the base (adapter off)
    inputs = {
        "input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
        "completion_mask": (b["labels"] != -100).long(),
        "KL_input_ids": b["kl_input_ids"], "KL_attention_mask": b["kl_attention_mask"],
        "KL_completion_mask": (b["kl_labels"] != -100).long(),
        "label": b["desirable"],
    }  # fmt: skip
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert float(theirs) == pytest.approx(ours, abs=1e-5)
    # The same KL estimate z (logged under "eval": the model is in eval mode, dropout off).
    assert trainer._metrics["eval"]["kl"][-1] == pytest.approx(extra["kl"], abs=1e-4)


def test_orpo_loss_equals_trl_odds_ratio_loss_on_the_same_logits(
    tiny_model_dir, tokenizer, pairs_file, tmp_path
):
    """TRL's ORPOTrainer functions (per-token mean log-probs, odds_ratio_loss) on the logits of our
    batch give our loss; the NLL is the chosen answers' (TRL also counts the prompt's tokens)."""
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    model, _ = build_model(_cfg(tiny_model_dir, pairs_file, tmp_path / "run", "orpo"), tiny_model_dir)
    _random_adapter(model, 0)
    pairs = tokenize_pairs(tokenizer, load_examples(pairs_file)[:4], 64, "test")
    b = collate_pairs(pairs, tokenizer.pad_token_id)
    ours, extra = orpo_step(model, [b], beta)
    model.zero_grad()

    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    means = ORPOTrainer.get_batch_logps(logits, b["labels"], average_log_prob=True)
    c, r = means.chunk(2)
    trl_self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, _, _, _, log_odds = ORPOTrainer.odds_ratio_loss(trl_self, c, r)
    chosen = b["labels"][:4]
    nll = F.cross_entropy(
        logits[:4, :-1].reshape(-1, logits.shape[-1]), chosen[:, 1:].reshape(-1), ignore_index=-100
    )
    assert ours == pytest.approx(float(nll - losses.mean()), abs=1e-5)
    assert extra["log_odds"] == pytest.approx(float(log_odds), abs=1e-5)
    with torch.no_grad():  # our own pieces, one by one
        logps, counts = answer_logps(model, b)
        mine, _ = odds_ratio_loss(*(logps / counts).chunk(2), beta)
    torch.testing.assert_close(mine, -losses, rtol=1e-5, atol=1e-6)
    split, _ = orpo_step(model, [collate_pairs(pairs[:1], 0), collate_pairs(pairs[1:], 0)], beta)
    assert split == pytest.approx(ours, abs=1e-5)  # micro-batches: the same step loss


def test_orpo_odds_ratio_stays_finite_when_the_model_is_certain():
    losses, log_odds = odds_ratio_loss(torch.tensor([0.0, -1e-9]), torch.tensor([-2.0, -3.0]), 0.1)
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all() and (log_odds > 0).all()


# ---- tiny runs: train, evaluate, export, serve --------------------------------------------------


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_kto_run_trains_evaluates_exports_and_serves(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    import tunekit.train.recipes.kto as kto

    caught = _catch_saved_policy(monkeypatch, kto)
    run = train(_cfg(tiny_model_dir, rated_file(tmp_path), tmp_path / "kto", "kto"), quiet=True)
    metrics = _losses(run)
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    # A zero-initialised adapter starts at the reference: every reward 0, loss w * (1 - sigmoid(0)).
    assert train_losses[0] == pytest.approx(0.5, abs=1e-4) and all(map(math.isfinite, train_losses))
    assert train_losses[-1] < 0.4
    val = [r for r in metrics if "val_accuracy" in r][-1]
    assert val["val_accuracy"] >= 0.75 and val["val_reward_desirable"] > 0 > val["val_reward_undesirable"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["task"] == "kto" and summary["saved"] == "adapter"

    report = evaluate(run, quiet=True)
    assert report["task_metric"] == "reward_accuracy" and report["n_test"] == 4
    policy, ref = report["contenders"]["policy"], report["contenders"]["reference"]
    assert ref["reward_accuracy"] == 0.0 and policy["reward_accuracy"] >= 0.75
    assert "rated answers" in (run / "report.md").read_text()
    assert get_task("kto").generative
    _check_policy_ships(run, caught["logits"], tmp_path, [_base_logits(tiny_model_dir, tokenizer)])


def test_a_tiny_orpo_run_trains_evaluates_exports_and_serves(
    tiny_model_dir, tokenizer, pairs_file, tmp_path, monkeypatch
):
    import tunekit.train.recipes.orpo as orpo

    caught = _catch_saved_policy(monkeypatch, orpo)
    run = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "orpo", "orpo"), quiet=True)
    metrics = _losses(run)
    train_losses = [r["loss"] for r in metrics if "loss" in r]
    assert all(map(math.isfinite, train_losses)) and train_losses[-1] < train_losses[0] - 1
    report = evaluate(run, quiet=True)
    assert report["task_metric"] == "preference_accuracy"
    base, policy = report["contenders"]["base"], report["contenders"]["policy"]
    assert policy["log_odds_ratio"] > base["log_odds_ratio"] and policy["nll_chosen"] < base["nll_chosen"]
    assert policy["preference_accuracy"] == 1.0
    _check_policy_ships(run, caught["logits"], tmp_path, [_base_logits(tiny_model_dir, tokenizer)])


def test_a_full_orpo_run_needs_no_reference_copy(tiny_model_dir, pairs_file, tmp_path):
    run = train(_cfg(tiny_model_dir, pairs_file, tmp_path / "full", "orpo", method="full",
                     train={"max_steps": 2, "learning_rate": 1e-4, "batch_size": 4, "max_length": 64}), quiet=True)  # fmt: skip
    assert (run / "model" / "config.json").is_file()
    assert all(math.isfinite(r["loss"]) for r in _losses(run) if "loss" in r)


# ---- the examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "task", "kind"), [("kto_demo", "kto", "unpaired"), ("orpo_pairs", "orpo", "pairs")]
)
def test_the_examples_validate_and_their_data_is_what_the_task_reads(name, task, kind, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / f"{name}.yaml"
    cfg = load_config(path)
    assert cfg.task == task and get_task(task).data == kind
    assert path.read_text().startswith(f"# Run as: tunekit train examples/{name}.yaml")
    if not cfg.data.train.exists():
        pytest.skip(f"../shared/data not present ({cfg.data.train})")
    examples = load_examples(cfg.data.train, format=cfg.data.format)
    require(kind, examples, "train", task)
