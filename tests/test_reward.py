"""The reward recipe on a tiny random llama: Bradley-Terry training, what trains, save/load, data checks."""

import json

import pytest
import torch

from tunekit.config import config_from_dict
from tunekit.data import load_examples
from tunekit.errors import DataError, TunekitError
from tunekit.models import load_tokenizer
from tunekit.models.device import model_device, to_device
from tunekit.runs.directory import read_metrics
from tunekit.train.recipes.reward import (
    bradley_terry_step,
    collate_pairs,
    load_reward_model,
    pairwise_accuracy,
    score_texts,
    tokenize_pair,
    validate_pairs,
)
from tunekit.train.session import train
from tunekit.train.setup import build_model


def _pairs(path, n, offset=0):
    """Pairs a tiny model can learn: the chosen answer is always 'yes ...', the rejected 'no ...'."""
    rows = [
        {"prompt": f"Is item {i} in stock?", "chosen": f"yes, item {i}", "rejected": f"no, item {i}"}
        for i in range(offset, offset + n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny_model_dir, tmp_path, method="lora", **train):
    t = {"epochs": 3, "learning_rate": 5e-3, "batch_size": 4, "max_length": 64, "seed": 0} | train
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": "reward",
            "method": method,
            "data": {
                "train": str(_pairs(tmp_path / "train.jsonl", 24)),
                "validation": str(_pairs(tmp_path / "val.jsonl", 8, offset=100)),
                "test": str(_pairs(tmp_path / "test.jsonl", 8, offset=200)),
            },
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": t,
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_bradley_terry_loss_is_the_mean_negative_logsigmoid_margin(tiny_model_dir, tokenizer, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    model, _ = build_model(cfg, tiny_model_dir, head="score", num_labels=1)
    pairs = [tokenize_pair(tokenizer, ex, 64) for ex in load_examples(tmp_path / "train.jsonl")[:4]]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    loss, extra = bradley_terry_step(model, [batch])
    with torch.no_grad():
        r = model(**to_device(batch, model_device(model))).logits[:, 0].cpu()
    expected = float(-torch.nn.functional.logsigmoid(r[:4] - r[4:]).mean())
    assert loss == pytest.approx(expected, rel=1e-5)
    assert extra["accuracy"] == pytest.approx(float((r[:4] > r[4:]).float().mean()))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_training_learns_pairs_and_changes_the_right_weights(
    tiny_model_dir, tokenizer, tmp_path, method
):
    cfg = _cfg(tiny_model_dir, tmp_path, method)
    model, params = build_model(cfg, tiny_model_dir, head="score", num_labels=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = [tokenize_pair(tokenizer, ex, 64) for ex in load_examples(tmp_path / "train.jsonl")]
    val = [tokenize_pair(tokenizer, ex, 64) for ex in load_examples(tmp_path / "val.jsonl")]
    opt = torch.optim.AdamW(params, lr=5e-3)
    for step in range(12):
        bradley_terry_step(model, [collate_pairs(train[(step % 6) * 4 : (step % 6) * 4 + 4], 0)])
        opt.step()
        opt.zero_grad()
    model.eval()
    assert validate_pairs(model, val, tokenizer.pad_token_id, 8)["val_accuracy"] == 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    score = {n for n in before if ".score." in n or n.startswith("score.")}
    assert score & changed, "the score head must train"
    if method == "full":
        assert changed == set(before)
    else:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert changed == trainable
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_train_reward_end_to_end_and_reload(tiny_model_dir, tmp_path):
    run_dir = train(_cfg(tiny_model_dir, tmp_path), quiet=True)
    metrics = read_metrics(run_dir)
    assert metrics[-1]["val_accuracy"] == 1.0
    assert metrics[-1]["val_loss"] < metrics[0]["loss"]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["task"] == "reward" and summary["saved"] == "adapter"

    # Save/load round trip: the reloaded model scores the validation pairs exactly as training did.
    model, tok = load_reward_model(run_dir)
    val = [tokenize_pair(tok, ex, 64) for ex in load_examples(tmp_path / "val.jsonl")]
    again = validate_pairs(model, val, tok.pad_token_id, 8)
    assert again["val_loss"] == pytest.approx(metrics[-1]["val_loss"], abs=1e-5)

    test = load_examples(tmp_path / "test.jsonl")
    acc = pairwise_accuracy(model, tok, test, batch_size=3)
    assert acc["accuracy"] == 1.0 and acc["mean_margin"] > 0
    # score_texts takes message dicts or Examples, and batching does not change a score.
    convs = [
        [{"role": "user", "content": "Is item 5 in stock?"}, {"role": "assistant", "content": a}]
        for a in ("yes", "no")
    ]
    one = score_texts(model, tok, convs, batch_size=1)
    assert score_texts(model, tok, convs, batch_size=2) == pytest.approx(one, abs=1e-5)
    assert one[0] > one[1]
    assert score_texts(model, tok, test[:2]) == pytest.approx(
        score_texts(model, tok, [[m.__dict__ for m in ex.messages] for ex in test[:2]]), abs=1e-6
    )


def test_reward_on_data_without_pairs_fails_naming_the_file(tiny_model_dir, chat_file, tmp_path):
    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "task": "reward",
            "data": {"train": str(chat_file)},
            "output_dir": str(tmp_path / "run"),
        }
    )
    with pytest.raises(DataError, match="no preference pairs") as e:
        train(cfg, quiet=True)
    assert str(chat_file) in str(e.value) and "preference" in str(e.value)


def test_load_reward_model_refuses_other_tasks(tiny_model_dir, chat_file, tmp_path):
    from tunekit.train.session import train

    cfg = config_from_dict(
        {
            "model": str(tiny_model_dir),
            "data": {"train": str(chat_file)},
            "train": {"max_steps": 1, "batch_size": 4},
            "output_dir": str(tmp_path / "sft"),
        }
    )
    with pytest.raises(TunekitError, match="not a reward model"):
        load_reward_model(train(cfg, quiet=True))


def test_tokenize_pair_keeps_the_end_of_long_conversations(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    ex = load_examples(_pairs(tmp_path / "p.jsonl", 1))[0]
    full_c, full_r = tokenize_pair(tok, ex, None)
    c, r = tokenize_pair(tok, ex, 8)
    assert c == full_c[-8:] and r == full_r[-8:] and c != r
