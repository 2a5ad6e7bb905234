"""Direct preference optimisation (`task: dpo`): the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` with `task: dpo` and preference pairs as data (rows with
`chosen` and `rejected`: `Example.messages` is the prompt plus the chosen answer, `Example.rejected`
the rejected answer's turns).

setup (run dir, splits, model as `method` says) -> tokenize each pair (loss mask on the answer
tokens only) -> reference log-probs, computed once -> the shared loop (train/loop.py) with the DPO
loss -> save the adapter or model -> summary.

The loss is the sigmoid loss of the DPO paper (Rafailov et al. 2023, eq. 7) with the label
smoothing of conservative DPO (cDPO, Mitchell 2023): with the implicit reward
r(y) = beta * (log pi(y|x) - log ref(y|x)) and z = r(chosen) - r(rejected),

    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

The reference never changes, so its log-probs are computed once before training, batched and
without gradients (TRL's `precompute_ref_log_probs`). For lora, dora and qlora the reference is
the same model with its adapter switched off; for full fine-tuning it is the model itself before
the first step: no second copy of the weights is ever held.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunekit.console import err as console
from tunekit.data.example import Example
from tunekit.data.needs import require
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample, render
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import autocast, model_device, to_device
from tunekit.tasks import Task
from tunekit.train.batching import collate, sequential_batches
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.loss import target_states
from tunekit.train.setup import build_model, save_trained

if TYPE_CHECKING:
    from tunekit.train.session import RunSession

# ---------------------------------------------------------------------------------------------
# Pairs to tokens


@dataclass
class Pair:
    """One preference pair as token ids, plus the reference model's log-probs of both answers."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    where: str = ""
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _prompt_and_answer(tokenizer, prompt, answer, where: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt (with the assistant header) and of the answer after it,
    cut from one tokenization of the whole conversation, so the ids are those the model sees."""
    prompt_text = render(tokenizer, prompt, add_generation_prompt=True)
    text = render(tokenizer, [*prompt, *answer])
    if not text.startswith(prompt_text):
        raise TunekitError(
            f"{where}: the model's chat template renders the prompt differently once an answer follows, "
            "so the answer's tokens cannot be located. Use a model with a standard chat template."
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # The first token that starts inside the answer: everything before it is prompt.
    k = next((i for i, (s, _) in enumerate(enc["offset_mapping"]) if s >= len(prompt_text)), len(ids))
    return ids[:k], ids[k:]


def tokenize_pair(tokenizer, ex: Example, max_length: int) -> tuple[Pair, bool]:
    """The pair as two sequences, loss only on the answer tokens; and whether it had to be cut.

    A pair longer than max_length keeps the end of the prompt (the question, not the system
    prompt's start) and the start of each answer, with at least half the budget for the answers;
    both answers get the same prompt budget, so they are compared on the same context.
    """
    prompt, chosen, rejected = ex.pair()
    p_c, a_c = _prompt_and_answer(tokenizer, prompt, chosen, ex.where)
    p_r, a_r = _prompt_and_answer(tokenizer, prompt, rejected, ex.where)
    answer_budget = max(max_length - max(len(p_c), len(p_r)), max_length // 2)
    prompt_budget = max_length - min(max(len(a_c), len(a_r)), answer_budget)

    def seq(p: list[int], a: list[int]) -> TokenizedExample:
        p, a = p[max(0, len(p) - prompt_budget) :], a[:answer_budget]
        return TokenizedExample(p + a, [IGNORE_INDEX] * len(p) + a, truncated=0)

    pair = Pair(seq(p_c, a_c), seq(p_r, a_r), where=ex.where)
    cut = len(pair.chosen.input_ids) < len(p_c) + len(a_c) or len(pair.rejected.input_ids) < len(p_r) + len(
        a_r
    )
    return pair, cut


def tokenize_pairs(tokenizer, examples: list[Example], max_length: int, name: str) -> list[Pair]:
    """Tokenize a split of pairs; pairs cut by max_length are counted and reported."""
    require("pairs", examples, name, "dpo")
    pairs, cut = [], 0
    for ex in examples:
        pair, was_cut = tokenize_pair(tokenizer, ex, max_length)
        cut += was_cut
        pairs.append(pair)
    if cut:
        console.print(f"[yellow]{name}: {cut} pair(s) longer than train.max_length={max_length} were cut")
    return pairs


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected of B pairs in one batch of 2B rows (chosen first): one forward pass.
    Adds `ref_logps` (2B,), the reference log-probs in the same order."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["ref_logps"] = torch.tensor(
        [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float32
    )
    return batch


# ---------------------------------------------------------------------------------------------
# Log-probs and the loss


def sequence_logps(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Summed log-prob of each row's target tokens, (B,), on the model's device (the inputs move
    there; the forward runs under `autocast`). Only positions that predict a target are projected
    onto the vocabulary (as train/loss.py does): the (B, T, V) logits are never built."""
    device = model_device(model)
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    targets = labels[:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE_INDEX
    with autocast(device):
        h, head = target_states(model, input_ids, attention_mask, keep)
        logits = (h if head is None else head(h)).float()  # (N, V)
        token_logps = -F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]  # the row of each target, in the same (row-major) order
    zeros = torch.zeros(len(input_ids), dtype=token_logps.dtype, device=device)
    return zeros.index_add(0, rows, token_logps)


def dpo_loss(
    logps: torch.Tensor, ref_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and implicit rewards of chosen and rejected, each (B,), from (2B,) log-probs
    (chosen rows first) of the policy and the reference."""
    policy_c, policy_r = logps.chunk(2)
    ref_c, ref_r = ref_logps.chunk(2)
    reward_c = beta * (policy_c - ref_c)
    reward_r = beta * (policy_r - ref_r)
    z = reward_c - reward_r
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, reward_c.detach(), reward_r.detach()


def _pair_metrics(losses, reward_c, reward_r) -> dict[str, float]:
    """Sums over the pairs of a batch (divided by the pair count by the caller)."""
    return {
        "loss": float(losses.detach().sum()),
        "accuracy": float((reward_c > reward_r).float().sum()),
        "margin": float((reward_c - reward_r).sum()),
        "reward_chosen": float(reward_c.sum()),
        "reward_rejected": float(reward_r.sum()),
    }


def dpo_step(model, batches: list[dict[str, torch.Tensor]], beta: float, label_smoothing: float):
    """Forward and backward over the micro-batches of one optimizer step: the mean loss over all
    pairs of the step (k micro-batches of n pairs give the gradient of one batch of k*n), and the
    step's preference accuracy, reward margin and mean rewards."""
    n_pairs = sum(len(b["ref_logps"]) // 2 for b in batches)
    sums: dict[str, float] = {}
    device = model_device(model)
    for b in batches:
        b = to_device(b, device)
        logps = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        losses, reward_c, reward_r = dpo_loss(logps, b["ref_logps"], beta, label_smoothing)
        (losses.sum() / n_pairs).backward()
        for k, v in _pair_metrics(losses, reward_c, reward_r).items():
            sums[k] = sums.get(k, 0.0) + v
    mean = {k: v / n_pairs for k, v in sums.items()}
    return mean.pop("loss"), mean


@torch.no_grad()
def evaluate_pairs(
    model, pairs: list[Pair], pad_id: int, beta: float, label_smoothing: float, batch_size: int
):
    """DPO loss, preference accuracy (implicit reward of chosen > rejected) and mean reward margin
    of `model` on `pairs` against their stored reference log-probs (dropout off)."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for idx in sequential_batches(len(pairs), batch_size):
        b = to_device(collate_pairs([pairs[i] for i in idx], pad_id), model_device(model))
        logps = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        for k, v in _pair_metrics(*dpo_loss(logps, b["ref_logps"], beta, label_smoothing)).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    n = max(len(pairs), 1)
    return {
        "val_loss": sums["loss"] / n,
        "val_accuracy": sums["accuracy"] / n,
        "val_margin": sums["margin"] / n,
    }


@contextmanager
def reference(model) -> Iterator:
    """The reference policy: a PEFT model with its adapter switched off, else the model as it is
    (call this before training, when a full model still is its own reference)."""
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        yield model


@torch.no_grad()
def compute_reference_logps(ref, pairs: list[Pair], pad_id: int, batch_size: int) -> None:
    """Fill in each pair's `ref_chosen` and `ref_rejected` with the log-probs of model `ref` (the
    reference: see `reference`): one batched no-grad pass, dropout off. Pairs are batched by
    length, so little compute goes into padding."""
    was_training = ref.training
    ref.eval()
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        b = collate_pairs([pairs[i] for i in idx], pad_id)
        logps = sequence_logps(ref, b["input_ids"], b["attention_mask"], b["labels"]).cpu().tolist()
        for j, i in enumerate(idx):
            pairs[i].ref_chosen, pairs[i].ref_rejected = logps[j], logps[len(idx) + j]
    ref.train(was_training)


def precompute_reference(
    model, items: list, compute, pad_id: int, batch_size: int, noun: str, quiet: bool
) -> float:
    """`compute(ref, items, pad_id, batch_size)` (a task's compute_reference_logps) with `model` as its
    own reference (see `reference`), before training; says how long it took and returns the seconds."""
    t0 = time.perf_counter()
    with reference(model) as ref:
        compute(ref, items, pad_id, batch_size)
    seconds = time.perf_counter() - t0
    if not quiet:
        console.print(f"reference log-probs of {len(items)} {noun} in {seconds:.0f}s")
    return seconds


# ---------------------------------------------------------------------------------------------
# The recipe


def train_dpo(run: RunSession) -> Path:
    """DPO-train `cfg.model` (full, LoRA, DoRA or QLoRA) on the preference pairs of `cfg.data`;
    returns the run directory. Validation logs loss, preference accuracy and reward margin."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(cfg, model_path, tokenizer=tokenizer, quiet=run.quiet)

    tc, beta, smoothing = cfg.train, cfg.dpo.beta, cfg.dpo.label_smoothing
    train_pairs = tokenize_pairs(tokenizer, splits["train"], tc.max_length, "train")
    val_pairs = tokenize_pairs(tokenizer, splits["validation"], tc.max_length, "validation")
    if not train_pairs:
        raise TunekitError("data.train: no preference pair has answer tokens within train.max_length")
    pad_id = tokenizer.pad_token_id

    ref_seconds = precompute_reference(
        model, train_pairs + val_pairs, compute_reference_logps, pad_id, cfg.eval.batch_size, "pairs", quiet
    )

    recipe = Recipe(
        train=train_pairs,
        validation=val_pairs,
        lengths=[p.length for p in train_pairs],
        collate=lambda items: collate_pairs(items, pad_id),
        step=lambda m, batches: dpo_step(m, batches, beta, smoothing),
        validate=lambda m, data: evaluate_pairs(m, data, pad_id, beta, smoothing, cfg.eval.batch_size),
    )
    run.announce(model, params, len(train_pairs), len(val_pairs))
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    run.finish(
        result, model_path=model_path, params=params, saved=saved,
        reference_seconds=ref_seconds, beta=beta, label_smoothing=smoothing,
    )  # fmt: skip
    return run_dir


TASK = Task(
    name="dpo",
    summary="direct preference optimisation of the policy against a frozen reference",
    data="pairs",
    recipe=train_dpo,
    evaluation="tunekit.eval.preference:evaluate_dpo",
    generative=True,
    eval_options=("reward_model",),
)
