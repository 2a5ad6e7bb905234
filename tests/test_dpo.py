"""DPO on a tiny random llama: the loss is the paper's formula (and TRL's), only the adapter trains,
the reference log-probs never move, preference accuracy rises, the saved adapter reloads."""

import json
import math

import pytest
import torch

from tunekit.config import config_from_dict
from tunekit.data import load_examples
from tunekit.data.example import Example, Message
from tunekit.errors import DataError
from tunekit.models.device import default_device
from tunekit.runs.directory import create_run_dir
from tunekit.train.recipes.dpo import (
    collate_pairs,
    compute_reference_logps,
    dpo_loss,
    dpo_step,
    reference,
    sequence_logps,
    tokenize_pair,
    tokenize_pairs,
)
from tunekit.train.session import train
from tunekit.train.setup import build_model, load_trained, save_trained


@pytest.fixture
def pairs_file(tmp_path):
    """32 pairs with a learnable preference: answers starting 'CODE' beat answers starting 'NOPE'."""
    rows = [
        {"prompt": f"What is the code for item {i}?", "chosen": f"CODE-{i % 4}", "rejected": f"NOPE-{i % 4}"}
        for i in range(32)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(tiny_model_dir, pairs_file, tmp_path, method="lora", **train):
    t = {"epochs": 1, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0} | train
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "method": method,
            "task": "dpo",
            "data": {"train": str(pairs_file), "split": [0.75, 0.25, 0.0]},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "dpo": {"beta": 0.1},
            "train": t,
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_loss_is_the_papers_formula():
    logps = torch.tensor([-3.0, -5.0, -4.0, -4.5])  # policy: chosen 1, chosen 2, rejected 1, rejected 2
    ref = torch.tensor([-3.5, -4.0, -4.2, -4.0])
    beta, eps = 0.2, 0.1
    losses, rc, rr = dpo_loss(logps, ref, beta, eps)
    for i, (pc, pr, qc, qr) in enumerate([(-3.0, -4.0, -3.5, -4.2), (-5.0, -4.5, -4.0, -4.0)]):
        z = beta * ((pc - qc) - (pr - qr))
        sig = 1 / (1 + math.exp(-z))
        want = -(1 - eps) * math.log(sig) - eps * math.log(1 - sig)
        assert losses[i].item() == pytest.approx(want, rel=1e-6)
        assert rc[i].item() == pytest.approx(beta * (pc - qc)) and rr[i].item() == pytest.approx(
            beta * (pr - qr)
        )
    # Without smoothing: TRL's sigmoid loss, -log sigmoid(beta * delta).
    losses0, _, _ = dpo_loss(logps, ref, beta, 0.0)
    delta = (logps[:2] - ref[:2]) - (logps[2:] - ref[2:])
    torch.testing.assert_close(losses0, -torch.nn.functional.logsigmoid(beta * delta))


def test_loss_equals_trl_dpo_trainer_on_the_same_tokens(tiny_model_dir, tokenizer, pairs_file, tmp_path):
    """TRL's DPOTrainer (sigmoid loss, reference = adapter off) computes the same loss on our batch."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path)
    model, params = build_model(cfg, tiny_model_dir)
    with torch.no_grad():  # a non-zero adapter, so policy and reference differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model.eval()
    pairs = tokenize_pairs(tokenizer, load_examples(pairs_file)[:4], 64, "test")
    with reference(model) as ref:
        compute_reference_logps(ref, pairs, tokenizer.pad_token_id, 8)
    b = collate_pairs(pairs, tokenizer.pad_token_id)
    ours, _ = dpo_step(model, [b], beta=0.1, label_smoothing=0.0)
    model.zero_grad()

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), beta=0.1, bf16=False, use_cpu=True, report_to=[],
        gradient_checkpointing=False, precompute_ref_log_probs=False,
    )  # fmt: skip
    data = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    # Handed a PEFT model, TRL copies its adapter as the reference ("ref"); ours is the base (adapter
    # off), which TRL uses when that copy is absent.
    trainer.model.delete_adapter("ref")
    inputs = {
        "input_ids": b["input_ids"],
        "attention_mask": b["attention_mask"],
        "completion_mask": (b["labels"] != -100).long(),
    }
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    assert float(theirs) == pytest.approx(ours, rel=1e-4)


def test_pair_tokens_share_the_prompt_and_mask_only_answers(tokenizer):
    ex = Example(
        messages=(Message("user", "Pick one."), Message("assistant", "The first.")),
        rejected=(Message("assistant", "No idea, really."),),
    )
    pair, cut = tokenize_pair(tokenizer, ex, 256)
    assert not cut
    c, r = pair.chosen, pair.rejected
    n_prompt = c.labels.index(next(x for x in c.labels if x != -100))
    assert c.input_ids[:n_prompt] == r.input_ids[:n_prompt]
    assert tokenizer.decode([x for x in c.labels if x != -100]).startswith("The first.<|im_end|>")
    assert tokenizer.decode([x for x in r.labels if x != -100]).startswith("No idea, really.<|im_end|>")
    # Too long: the prompt's end and the answers' starts survive, both within max_length.
    long = Example(
        messages=(Message("user", "word " * 200), Message("assistant", "yes " * 50)), rejected=ex.rejected
    )
    pair, cut = tokenize_pair(tokenizer, long, 64)
    assert cut and len(pair.chosen.input_ids) <= 64 and len(pair.rejected.input_ids) <= 64
    assert pair.chosen.n_loss_tokens == 32 and pair.rejected.n_loss_tokens < 32
    assert tokenizer.decode(pair.chosen.input_ids).rstrip().endswith("yes")


def test_non_pairs_are_a_data_error(tokenizer):
    ex = Example(messages=(Message("user", "hi"), Message("assistant", "hello")), source="x.jsonl", line=3)
    with pytest.raises(DataError, match=r"x.jsonl:3: no rejected answer"):
        tokenize_pairs(tokenizer, [ex], 64, "data.train")


def test_steps_train_the_adapter_only_and_the_reference_stays(
    tiny_model_dir, tokenizer, pairs_file, tmp_path
):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path)
    model, params = build_model(cfg, tiny_model_dir)
    pad = tokenizer.pad_token_id
    pairs = tokenize_pairs(tokenizer, load_examples(pairs_file)[:8], 64, "train")
    with reference(model) as ref:
        compute_reference_logps(ref, pairs, pad, 4)
    ref_before = [x for p in pairs for x in (p.ref_chosen, p.ref_rejected)]
    # With a zero-initialised LoRA the policy starts as the reference: the loss is log 2.
    b = collate_pairs(pairs, pad)
    with torch.no_grad():
        logps = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    torch.testing.assert_close(logps.cpu(), b["ref_logps"], rtol=1e-5, atol=1e-4)

    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        dpo_step(model, [b], 0.1, 0.0)
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed), changed

    with reference(model) as ref:
        compute_reference_logps(ref, pairs, pad, 4)
    assert [x for p in pairs for x in (p.ref_chosen, p.ref_rejected)] == pytest.approx(ref_before, abs=1e-4)
    with torch.no_grad():
        after = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    assert not torch.allclose(after.cpu(), b["ref_logps"], atol=1e-3)

    # Round trip: the saved adapter, reloaded on its base, scores the pairs exactly as trained.
    run = create_run_dir(cfg)
    save_trained(model, tokenizer, run, cfg.method)
    reloaded, _, is_adapter = load_trained(run)
    with torch.no_grad():
        again = sequence_logps(reloaded, b["input_ids"], b["attention_mask"], b["labels"])
    assert is_adapter
    torch.testing.assert_close(again, after)


def test_train_dpo_raises_preference_accuracy_and_reloads(tiny_model_dir, tokenizer, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, epochs=2, batch_size=8, eval_every=3)
    run = train(cfg, quiet=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(metrics[0])
    # The first step is taken at policy == reference: every reward ties, loss log 2. The ties are
    # exact on the CPU (accuracy 0); on CUDA the policy and reference passes run at different batch
    # shapes, whose kernels round differently, so margins are ~1e-6 either side of 0 (measured on
    # an H100: accuracy 0.5 in fp32).
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(metrics[0]["margin"]) < 1e-3
    if default_device().type == "cpu":
        assert metrics[0]["accuracy"] == 0.0
    val = [m for m in metrics if "val_accuracy" in m]
    assert {"val_loss", "val_margin"} <= set(val[0])
    assert val[-1]["val_accuracy"] >= 0.75 and val[-1]["val_margin"] > 0
    assert val[-1]["val_loss"] < math.log(2)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["task"] == "dpo" and summary["saved"] == "adapter"


def test_train_dpo_full_method_leaves_the_reference_copy_out(tiny_model_dir, pairs_file, tmp_path):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path, method="full", max_steps=2, learning_rate=1e-4)
    run = train(cfg, quiet=True)
    assert (run / "model" / "config.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The first step starts at policy == reference: loss log 2, zero rewards.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
