"""Odds-ratio preference optimisation (`task: orpo`): the recipe, top to bottom.

Run as: `tunekit train CONFIG.yaml` with `task: orpo` and preference pairs as data (the same rows as
`task: dpo`: `Example.messages` is the prompt plus the chosen answer, `Example.rejected` the
rejected answer's turns).

setup (run dir, splits, model as `method` says) -> tokenize each pair as dpo.py does (loss mask on
the answer tokens only) -> the shared loop (train/loop.py) with the ORPO loss -> save -> summary.
There is no reference model: nothing is computed before training, and full fine-tuning holds one
copy of the weights.

The loss is eqs. (4) to (7) of the ORPO paper (Hong et al. 2024), as TRL's ORPOTrainer computes it:
with P(y|x) the per-token mean log-prob of an answer (exponentiated), odds(y|x) = P / (1 - P) and
lambda = orpo.beta,

    loss = NLL(chosen) - lambda * mean over pairs of log sigmoid(log odds(chosen) - log odds(rejected))

NLL(chosen) is the mean cross-entropy over the chosen answers' tokens of the step. One difference
from TRL, on purpose: TRL (and the paper's code) take that NLL over the prompt's tokens too; here it
covers the answer tokens only, as every tunekit task's loss does (the odds-ratio term is the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.errors import TunekitError
from tunekit.models import load_tokenizer, resolve_model
from tunekit.models.device import model_device, to_device
from tunekit.tasks import Task
from tunekit.train.batching import sequential_batches
from tunekit.train.loop import Recipe, run_loop
from tunekit.train.recipes.dpo import collate_pairs, sequence_logps, tokenize_pairs
from tunekit.train.setup import build_model, save_trained

if TYPE_CHECKING:
    from tunekit.train.session import RunSession

# The largest mean log-prob the odds take: log(1 - P) is -inf at P = 1 exactly (an answer the model
# is certain of, token by token), which would make the loss NaN; TRL has no guard. exp(-1e-6) is a
# probability of 0.999999: the clamp changes nothing a real model reaches.
MAX_MEAN_LOGP = -1e-6


def answer_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's answer tokens and the number of those tokens, each (2B,), chosen
    rows first (dpo.py's `collate_pairs` layout)."""
    logps = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).to(logps.device)
    return logps, counts


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012; TRL's `log1mexp`)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_loss(
    mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The odds-ratio term of each pair, -beta * log sigmoid(log odds ratio), and the log odds ratio
    log(odds(chosen) / odds(rejected)), each (B,), from the per-token mean log-probs of the answers."""
    c = mean_chosen.float().clamp(max=MAX_MEAN_LOGP)
    r = mean_rejected.float().clamp(max=MAX_MEAN_LOGP)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds), log_odds


def _pair_sums(logps, counts, beta) -> dict[str, torch.Tensor]:
    """A batch's sums: the chosen answers' NLL over their tokens and the token count, the odds-ratio
    losses, and the sums of the metrics over the pairs."""
    means = logps / counts.clamp(min=1)
    mean_c, mean_r = means.chunk(2)
    or_losses, log_odds = odds_ratio_loss(mean_c, mean_r, beta)
    logp_c, _ = logps.chunk(2)
    n_c, _ = counts.chunk(2)
    return {
        "nll": -logp_c.sum(),
        "tokens": n_c.sum(),
        "or": or_losses.sum(),
        "accuracy": (log_odds > 0).float().sum(),
        "log_odds": log_odds.detach().sum(),
        "logp_chosen": mean_c.detach().sum(),
        "logp_rejected": mean_r.detach().sum(),
    }


def _means(sums: dict[str, float], n_pairs: int) -> dict[str, float]:
    """The step's (or split's) figures: NLL per chosen token, the rest per pair; loss = nll + or."""
    out = {k: v / n_pairs for k, v in sums.items() if k not in ("nll", "tokens")}
    out["nll"] = sums["nll"] / max(sums["tokens"], 1)
    out["loss"] = out["nll"] + out["or"]
    return out


def orpo_step(model, batches: list[dict[str, torch.Tensor]], beta: float):
    """Forward and backward over the micro-batches of one optimizer step: NLL over all chosen-answer
    tokens of the step plus the mean odds-ratio term over all its pairs, so k micro-batches of n pairs
    give the gradient of one batch of k*n; the step's loss and metrics."""
    n_pairs = sum(len(b["input_ids"]) // 2 for b in batches)
    n_tokens = sum(int((b["labels"][: len(b["labels"]) // 2, 1:] != IGNORE_INDEX).sum()) for b in batches)
    sums: dict[str, float] = {}
    for b in batches:
        s = _pair_sums(*answer_logps(model, to_device(b, model_device(model))), beta)
        (s["nll"] / max(n_tokens, 1) + s["or"] / n_pairs).backward()
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    mean = _means(sums, n_pairs)
    return mean.pop("loss"), mean


@torch.no_grad()
def score_pairs(model, pairs, pad_id: int, beta: float, batch_size: int) -> tuple[dict, list[float]]:
    """ORPO loss, its NLL and odds-ratio parts, preference accuracy (log odds ratio > 0) and the mean
    log odds ratio of `model` on `pairs` (dropout off); and each pair's log odds ratio."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    per_pair: list[float] = []
    for idx in sequential_batches(len(pairs), batch_size):
        logps, counts = answer_logps(model, collate_pairs([pairs[i] for i in idx], pad_id))
        for k, v in _pair_sums(logps, counts, beta).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        mean_c, mean_r = (logps / counts.clamp(min=1)).chunk(2)
        per_pair += odds_ratio_loss(mean_c, mean_r, beta)[1].cpu().tolist()
    model.train(was_training)
    return _means(sums, max(len(pairs), 1)), per_pair


def evaluate_pairs(model, pairs, pad_id: int, beta: float, batch_size: int) -> dict[str, float]:
    """Validation: `score_pairs`'s figures, each key prefixed val_."""
    return {f"val_{k}": v for k, v in score_pairs(model, pairs, pad_id, beta, batch_size)[0].items()}


# ---------------------------------------------------------------------------------------------
# The recipe


def train_orpo(run: RunSession) -> Path:
    """ORPO-train `cfg.model` (full, LoRA, DoRA or QLoRA) on the preference pairs of `cfg.data`;
    returns the run directory. Validation logs the loss, its parts and the preference accuracy."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.chat_template)
    model, params = build_model(cfg, model_path, tokenizer=tokenizer, quiet=run.quiet)

    tc, beta = cfg.train, cfg.orpo.beta
    train_pairs = tokenize_pairs(tokenizer, splits["train"], tc.max_length, "train")
    val_pairs = tokenize_pairs(tokenizer, splits["validation"], tc.max_length, "validation")
    if not train_pairs:
        raise TunekitError("data.train: no preference pair has answer tokens within train.max_length")
    pad_id = tokenizer.pad_token_id

    recipe = Recipe(
        train=train_pairs,
        validation=val_pairs,
        lengths=[p.length for p in train_pairs],
        collate=lambda items: collate_pairs(items, pad_id),
        step=lambda m, batches: orpo_step(m, batches, beta),
        validate=lambda m, data: evaluate_pairs(m, data, pad_id, beta, cfg.eval.batch_size),
    )
    run.announce(model, params, len(train_pairs), len(val_pairs))
    result = run_loop(model, params, recipe, tc, run_dir, quiet, resume=run.resume)
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    run.finish(result, model_path=model_path, params=params, saved=saved, beta=beta)
    return run_dir


TASK = Task(
    name="orpo",
    summary="odds-ratio preference optimisation: SFT on the chosen answer plus a log-odds penalty, no reference",
    data="pairs",
    recipe=train_orpo,
    evaluation="tunekit.eval.preference:evaluate_orpo",
    generative=True,
)
