"""Kahneman-Tversky optimisation (`task: kto`): the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` with `task: kto` and rated answers as data (format `kto`: a
conversation, or a prompt and a completion, with `label: true` for a desirable answer and `false`
for an undesirable one; `Example.desirable` carries the label, `Example.messages` the prompt plus
the answer).

setup (run dir, splits, model as `method` says) -> tokenize each answer after its prompt (loss mask
on the answer tokens only), and a mismatched sequence for the KL estimate -> reference log-probs,
computed once -> the shared loop (train/loop.py) with the KTO loss -> save -> summary.

The loss is eq. (7) of the KTO paper (Ethayarajh et al. 2024), as TRL's KTOTrainer computes it
(`loss_type="kto"`): with the implicit reward r(x, y) = log pi(y|x) - log ref(y|x) and z the KL
estimate,

    desirable:    w_d * (1 - sigmoid(beta * (r - z)))
    undesirable:  w_u * (1 - sigmoid(beta * (z - r)))

averaged over the answers of a step. z = max(0, mean of r(x_i, y_j)) over mismatched pairs: each
prompt with another row's answer (row i's with row i-1's, in the split's order, fixed once as TRL
fixes it at data preparation), without gradient. The step's z is taken over all the micro-batches
of the step (and averaged over processes, as TRL gathers it), so batch 8 x accumulation 1 and batch
1 x accumulation 8 give the same loss.

The reference is dpo.py's: the same model with its adapter switched off (lora, dora, qlora), or the
model itself before the first step (full); its log-probs of both sequences of every row are
computed once, batched and without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunekit.console import err as console
from tunekit.data.example import Example, Message
from tunekit.data.needs import feedback_counts, require
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import model_device, to_device
from tunekit.tasks import Task
from tunekit.train import distributed
from tunekit.train.batching import collate, sequential_batches
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.recipes.dpo import _prompt_and_answer, precompute_reference, sequence_logps
from tunekit.train.setup import build_model, save_trained

if TYPE_CHECKING:
    from tunekit.train.session import RunSession

# ---------------------------------------------------------------------------------------------
# Rated answers to tokens


@dataclass
class Rated:
    """One rated answer as token ids (prompt + answer), the KL sequence (the same prompt with another
    row's answer), and the reference model's log-probs of both."""

    seq: TokenizedExample
    kl: TokenizedExample
    desirable: bool
    where: str = ""
    ref: float = 0.0
    ref_kl: float = 0.0

    @property
    def length(self) -> int:
        return max(len(self.seq.input_ids), len(self.kl.input_ids))


def prompt_and_answer(ex: Example) -> tuple[tuple[Message, ...], tuple[Message, ...]]:
    """The prompt (every turn up to the last user or system turn) and the rated answer after it."""
    k = len(ex.messages)
    while k > 0 and ex.messages[k - 1].role == "assistant":
        k -= 1
    return ex.messages[:k], ex.messages[k:]


def fit(prompt: list[int], answer: list[int], max_length: int) -> tuple[TokenizedExample, bool]:
    """prompt + answer within max_length, loss on the answer only; and whether it was cut. As dpo.py
    cuts a pair: the end of the prompt and the start of the answer survive, the answer keeping at
    least half the budget."""
    answer_budget = max(max_length - len(prompt), max_length // 2)
    a = answer[:answer_budget]
    p = prompt[max(0, len(prompt) - (max_length - len(a))) :]
    cut = len(p) + len(a) < len(prompt) + len(answer)
    return TokenizedExample(p + a, [IGNORE_INDEX] * len(p) + a, truncated=0), cut


def tokenize_rated(tokenizer, examples: list[Example], max_length: int, name: str) -> list[Rated]:
    """Tokenize a split of rated answers; the KL sequence of row i is its prompt with row i-1's
    answer (row 0 takes the last row's). Rows cut by max_length are counted and reported."""
    require("unpaired", examples, name, "kto")
    parts = []
    for ex in examples:
        prompt, answer = prompt_and_answer(ex)
        parts.append(_prompt_and_answer(tokenizer, list(prompt), list(answer), ex.where))
    items, cut = [], 0
    for i, ex in enumerate(examples):
        (p, a), (_, a_other) = parts[i], parts[i - 1]
        seq, was_cut = fit(p, a, max_length)
        kl, _ = fit(p, a_other, max_length)
        cut += was_cut
        items.append(Rated(seq, kl, bool(ex.desirable), where=ex.where))
    if cut:
        console.print(f"[yellow]{name}: {cut} answer(s) longer than train.max_length={max_length} were cut")
    return items


def collate_rated(items: list[Rated], pad_id: int) -> dict[str, torch.Tensor]:
    """B rated answers: input_ids, attention_mask, labels (B, T) of the answers; kl_input_ids,
    kl_attention_mask, kl_labels (B, T') of the KL sequences; desirable (B,) bool; ref_logps and
    ref_kl_logps (B,), the reference's log-probs of both."""
    batch = collate([it.seq for it in items], pad_id)
    batch |= {f"kl_{k}": v for k, v in collate([it.kl for it in items], pad_id).items()}
    batch["desirable"] = torch.tensor([it.desirable for it in items], dtype=torch.bool)
    batch["ref_logps"] = torch.tensor([it.ref for it in items], dtype=torch.float32)
    batch["ref_kl_logps"] = torch.tensor([it.ref_kl for it in items], dtype=torch.float32)
    return batch


# ---------------------------------------------------------------------------------------------
# The loss


@dataclass(frozen=True)
class KtoWeights:
    beta: float
    desirable: float = 1.0
    undesirable: float = 1.0


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    w: KtoWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer losses and implicit rewards beta * (log pi - log ref), each (B,), from the policy's
    and the reference's (B,) log-probs, the (B,) desirable flags and the KL estimate z (no gradient)."""
    logratio = logps - ref_logps
    good = w.desirable * (1 - torch.sigmoid(w.beta * (logratio - kl)))
    bad = w.undesirable * (1 - torch.sigmoid(w.beta * (kl - logratio)))
    return torch.where(desirable, good, bad), (w.beta * logratio).detach()


@torch.no_grad()
def kl_estimate(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """z: the mean log-ratio of policy to reference over the KL sequences of `batches`, averaged over
    processes and clamped at 0 (TRL's `kl`), as a 0-dim tensor."""
    total, n = 0.0, 0
    for b in batches:
        logps = sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_labels"])
        total += float((logps - b["ref_kl_logps"].to(logps.device)).sum())
        n += len(logps)
    return torch.tensor(max(distributed.mean(total / max(n, 1)), 0.0), device=model_device(model))


def _sums(losses, rewards, desirable) -> dict[str, float]:
    """Sums over the answers of a batch (divided by the answer count by the caller). accuracy: the
    reward has the sign of the rating (> 0 desirable, < 0 undesirable; 0 is wrong); signed_reward:
    the reward, negated for undesirable answers, so it rises as either kind moves the right way."""
    signed = torch.where(desirable, rewards, -rewards)
    return {
        "loss": float(losses.detach().sum()),
        "accuracy": float((signed > 0).float().sum()),
        "signed_reward": float(signed.sum()),
    }


def kto_step(model, batches: list[dict[str, torch.Tensor]], w: KtoWeights):
    """Forward and backward over the micro-batches of one optimizer step: the KL estimate over all
    of them first, then the mean loss over all answers of the step; the step's loss and metrics."""
    device = model_device(model)
    batches = [to_device(b, device) for b in batches]
    n = sum(len(b["desirable"]) for b in batches)
    kl = kl_estimate(model, batches)
    if distributed.sharded(model):
        distributed.reshard(model)  # FSDP: the no-grad pass left the root gathered
    sums: dict[str, float] = {}
    for b in batches:
        logps = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
        losses, rewards = kto_loss(logps, b["ref_logps"], b["desirable"], kl, w)
        (losses.sum() / n).backward()
        for k, v in _sums(losses, rewards, b["desirable"]).items():
            sums[k] = sums.get(k, 0.0) + v
    mean = {k: v / n for k, v in sums.items()} | {"kl": float(kl)}
    return mean.pop("loss"), mean


@torch.no_grad()
def score_rated(model, items: list[Rated], pad_id: int, batch_size: int) -> tuple[list[float], list[float]]:
    """`model`'s log-probs of every answer and of every KL sequence (dropout off)."""
    was_training = model.training
    model.eval()
    seq, kl = [], []
    for idx in sequential_batches(len(items), batch_size):
        b = collate_rated([items[i] for i in idx], pad_id)
        seq += sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"]).cpu().tolist()
        kl += sequence_logps(model, b["kl_input_ids"], b["kl_attention_mask"], b["kl_labels"]).cpu().tolist()
    model.train(was_training)
    return seq, kl


def rated_metrics(items: list[Rated], logps: list[float], kl_logps: list[float], w: KtoWeights) -> dict:
    """KTO loss, reward accuracy, KL estimate and mean rewards of each kind over a whole split, from
    the policy's log-probs (the KL estimate is the split's, not a batch's)."""
    ref = torch.tensor([it.ref for it in items])
    desirable = torch.tensor([it.desirable for it in items])
    kl = max(float((torch.tensor(kl_logps) - torch.tensor([it.ref_kl for it in items])).mean()), 0.0)
    losses, rewards = kto_loss(torch.tensor(logps), ref, desirable, kl, w)
    sums = _sums(losses, rewards, desirable)
    n = max(len(items), 1)
    out = {"loss": sums["loss"] / n, "accuracy": sums["accuracy"] / n, "kl": kl}
    good, bad = rewards[desirable], rewards[~desirable]
    if len(good):
        out["reward_desirable"] = float(good.mean())
    if len(bad):
        out["reward_undesirable"] = float(bad.mean())
    return out


def evaluate_rated(model, items: list[Rated], pad_id: int, w: KtoWeights, batch_size: int) -> dict:
    """Validation: `rated_metrics` of `model` on `items`, each key prefixed val_."""
    logps, kl_logps = score_rated(model, items, pad_id, batch_size)
    return {f"val_{k}": v for k, v in rated_metrics(items, logps, kl_logps, w).items()}


def compute_reference_logps(ref, items: list[Rated], pad_id: int, batch_size: int) -> None:
    """Fill in each item's `ref` and `ref_kl` with the log-probs of model `ref` (the reference: see
    dpo.py's `reference`), batched by length so little compute goes into padding."""
    order = sorted(range(len(items)), key=lambda i: items[i].length)
    logps, kl_logps = score_rated(ref, [items[i] for i in order], pad_id, batch_size)
    for j, i in enumerate(order):
        items[i].ref, items[i].ref_kl = logps[j], kl_logps[j]


def _check_balance(items: list[Rated], w: KtoWeights, quiet: bool) -> None:
    """The KTO paper's eq. (8), as TRL warns: desirable_weight * n_desirable should be 1 to 4/3 times
    undesirable_weight * n_undesirable; outside it, say which weight to set and to what."""
    good, bad = feedback_counts([Example((), desirable=it.desirable) for it in items])
    ratio = (w.desirable * good) / (w.undesirable * bad)
    if quiet or 1.0 <= ratio <= 4 / 3:
        return
    lo, hi = bad * w.undesirable / good, 4 / 3 * bad * w.undesirable / good
    console.print(
        f"[yellow]kto: {good} desirable and {bad} undesirable answers with kto.desirable_weight "
        f"{w.desirable} and kto.undesirable_weight {w.undesirable}: the paper (eq. 8) advises "
        f"desirable_weight * {good} to be 1 to 4/3 times undesirable_weight * {bad}; set "
        f"kto.desirable_weight between {lo:.2f} and {hi:.2f}"
    )


# ---------------------------------------------------------------------------------------------
# The recipe


def train_kto(run: RunSession) -> Path:
    """KTO-train `cfg.model` (full, LoRA, DoRA or QLoRA) on the rated answers of `cfg.data`; returns
    the run directory. Validation logs the loss, reward accuracy, KL estimate and mean rewards."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(cfg, model_path, tokenizer=tokenizer, quiet=run.quiet)

    tc, w = cfg.train, KtoWeights(cfg.kto.beta, cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
    train_items = tokenize_rated(tokenizer, splits["train"], tc.max_length, "train")
    val_items = tokenize_rated(tokenizer, splits["validation"], tc.max_length, "validation")
    if not train_items:
        raise TunekitError("data.train: no rated answer left to train on")
    _check_balance(train_items, w, quiet or not distributed.is_main())
    pad_id = tokenizer.pad_token_id

    ref_seconds = precompute_reference(
        model, train_items + val_items, compute_reference_logps, pad_id, cfg.eval.batch_size, "answers", quiet
    )

    recipe = Recipe(
        train=train_items,
        validation=val_items,
        lengths=[it.length for it in train_items],
        collate=lambda items: collate_rated(items, pad_id),
        step=lambda m, batches: kto_step(m, batches, w),
        validate=lambda m, data: evaluate_rated(m, data, pad_id, w, cfg.eval.batch_size),
    )
    run.announce(model, params, len(train_items), len(val_items))
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    run.finish(
        result, model_path=model_path, params=params, saved=saved, reference_seconds=ref_seconds,
        beta=w.beta, desirable_weight=w.desirable, undesirable_weight=w.undesirable,
    )  # fmt: skip
    return run_dir


TASK = Task(
    name="kto",
    summary="Kahneman-Tversky optimisation on answers rated desirable or undesirable, against a frozen reference",
    data="unpaired",
    recipe=train_kto,
    evaluation="tunekit.eval.preference:evaluate_kto",
    generative=True,
)
