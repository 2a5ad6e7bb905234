"""The forgetting probe: general knowledge asked of the base and of the fine-tuned model.

A fine-tune that wins its task but loses what the base knew is a bad trade, so `tunekit eval`
asks both models the same general questions and reports the drop. Two kinds of question:

- multiple choice, MMLU-style CSV without header (question, A, B, C, D, answer letter):
  `What is the capital of France?,Berlin,Madrid,Paris,Rome,C`. Scored by log-likelihood: each
  option is scored as the assistant's reply to the question, by mean log-probability per token,
  and the most likely option is the model's answer (no generation, so no parsing of replies);
- short open questions, JSONL `{"question": ..., "answer": [...]}` (NQ-open's shape): the model
  answers by greedy generation; scored by exact match after SQuAD-style normalisation (case,
  punctuation, articles), and by `contains` (a gold answer appears in the reply).

`eval.probe` is `builtin` (probes/ next to this file, 40 + 40 easy questions), a CSV, a folder of
CSVs (e.g. MMLU's `dev/`), or a JSONL.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from tunekit.data.example import Example, Message
from tunekit.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_example
from tunekit.errors import DataError
from tunekit.models.device import autocast, model_device, to_device
from tunekit.train.batching import collate, sequential_batches
from tunekit.train.loss import target_states

LETTERS = "ABCD"
OPEN_INSTRUCTION = "Answer with only the answer: a word, a name or a number, not a sentence."


@dataclass
class Probe:
    source: str
    # (question, [four options], index of the right one)
    multiple_choice: list[tuple[str, list[str], int]] = field(default_factory=list)
    # (question, [accepted answers])
    open: list[tuple[str, list[str]]] = field(default_factory=list)


def builtin_probe_dir() -> Path:
    return Path(str(resources.files("tunekit.eval") / "probes"))


def read_mc_csv(path: Path) -> list[tuple[str, list[str], int]]:
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            if len(row) != 6 or row[5].strip().upper() not in LETTERS:
                raise DataError(
                    [
                        f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer letter A-D), "
                        f"got {len(row)}: {row[:2]}..."
                    ],
                    header="eval.probe: not an MMLU-style CSV",
                )
            out.append((row[0], row[1:5], LETTERS.index(row[5].strip().upper())))
    return out


def read_open_jsonl(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row["answer"]
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            out.append((str(row["question"]), answers))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(
                [f'{path}:{line_no}: expected {{"question": "...", "answer": ["..."]}}, got {line[:80]!r}'],
                header="eval.probe: not a JSONL of open questions",
            ) from None
    return out


def load_probe(spec: str | Path, max_questions: int | None = None, seed: int = 0) -> Probe:
    """The probe `spec` names, with at most `max_questions` of each kind (a seeded sample)."""
    path = builtin_probe_dir() if str(spec) == "builtin" else Path(spec)
    if not path.exists():
        raise DataError(
            [f"eval.probe: no such file or folder: {path}"],
            header="give a CSV (question,A,B,C,D,answer), a folder of them, a JSONL of open questions, "
            "or 'builtin' (or 'none' for no probe)",
        )
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    probe = Probe(source="builtin" if str(spec) == "builtin" else str(path))
    for f in files:
        if f.suffix == ".csv":
            probe.multiple_choice += read_mc_csv(f)
        elif f.suffix in (".jsonl", ".json"):
            probe.open += read_open_jsonl(f)
    if not (probe.multiple_choice or probe.open):
        raise DataError([f"eval.probe: {path} holds no .csv or .jsonl probe file"])
    rng = random.Random(seed)
    if max_questions and len(probe.multiple_choice) > max_questions:
        probe.multiple_choice = rng.sample(probe.multiple_choice, max_questions)
    if max_questions and len(probe.open) > max_questions:
        probe.open = rng.sample(probe.open, max_questions)
    return probe


@torch.no_grad()
def target_logprobs(model, items: list[TokenizedExample], pad_id: int, batch_size: int = 16):
    """(sum of log-probabilities of the target tokens, their count) for each item, in order.

    Only positions that predict a target token are projected onto the vocabulary (as in the
    training loss), so scoring long prompts costs no (B, T, V) logits. Batches go to the model's
    device; the forward runs under `autocast` (bf16 on CUDA, fp32 on CPU).
    """
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    device = model_device(model)
    for idx in sequential_batches(len(items), batch_size):
        b = to_device(collate([items[i] for i in idx], pad_id), device)
        targets = b["labels"][:, 1:]  # (B, T-1)
        keep = targets != IGNORE_INDEX
        ids, mask = b["input_ids"], b["attention_mask"]  # (B, T)
        with autocast(device):
            h, head = target_states(model, ids, mask, keep)
            logits = h if head is None else head(h)  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, targets[keep][:, None])[:, 0]  # (N,)
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(len(idx), device=device).index_add_(0, rows, logp)
        counts = keep.sum(dim=1)
        out += [(float(s), int(c)) for s, c in zip(sums.cpu(), counts.cpu(), strict=True)]
    model.train(was_training)
    return out


def _qa(question: str, answer: str) -> Example:
    return Example(messages=(Message("user", question), Message("assistant", answer)))


def score_multiple_choice(model, tokenizer, questions, batch_size: int = 16) -> list[float]:
    """1/0 per question: is the right option the most likely reply (mean log-prob per token)?

    Each question's prompt is encoded once and its options scored against its KV cache
    (`continuation_logprobs`); the scores are those of a full forward per option (the plain path,
    still taken where a question's options do not share its prompt's tokens or the model's cache
    cannot be copied)."""
    from tunekit.eval.generate import prefix_cache_supported
    from tunekit.eval.label_scoring import continuation_logprobs, split_item

    items = [
        [tokenize_example(tokenizer, _qa(q, opt), 1024) for opt in options] for q, options, _ in questions
    ]
    parts = [[split_item(it) for it in options] for options in items]
    shared = all(p is not None and p[0] == ps[0][0] for ps in parts for p in ps)
    longest = max((len(it.input_ids) for options in items for it in options), default=0)
    if shared and questions and prefix_cache_supported(model, longest):
        prompts = [ps[0][0] for ps in parts]
        replies = [[p[1] for p in ps] for ps in parts]
        scores = continuation_logprobs(model, prompts, replies, tokenizer.pad_token_id, batch_size)
    else:
        flat = target_logprobs(
            model, [it for options in items for it in options], tokenizer.pad_token_id, batch_size
        )
        rest = iter(flat)
        scores = [[next(rest) for _ in options] for options in items]
    out = []
    for per_option, (_, options, right) in zip(scores, questions, strict=True):
        per_token = [s / max(n, 1) for s, n in per_option]
        out.append(float(max(range(len(options)), key=per_token.__getitem__) == right))
    return out


def squad_normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD / NQ-open convention)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def score_open(
    model, tokenizer, questions, batch_size: int = 16
) -> tuple[list[float], list[float], list[str]]:
    """(exact match, contains, replies) per question, greedy replies of at most 24 tokens."""
    from tunekit.eval.generate import generate

    examples = [_qa(f"{OPEN_INSTRUCTION}\nQuestion: {q}", "") for q, _ in questions]
    replies = generate(model, tokenizer, examples, 24, batch_size)
    em, contains = [], []
    for reply, (_, answers) in zip(replies, questions, strict=True):
        r = squad_normalize(reply)
        golds = [squad_normalize(a) for a in answers]
        em.append(float(r in golds))
        contains.append(float(any(g and re.search(rf"\b{re.escape(g)}\b", r) for g in golds)))
    return em, contains, replies


def run_probe(model, tokenizer, probe: Probe, batch_size: int = 16) -> dict[str, list[float]]:
    """Per-question scores of one model: {'multiple_choice': [...], 'open_exact_match': [...], ...}."""
    out: dict[str, list] = {}
    if probe.multiple_choice:
        out["multiple_choice"] = score_multiple_choice(model, tokenizer, probe.multiple_choice, batch_size)
    if probe.open:
        em, contains, replies = score_open(model, tokenizer, probe.open, batch_size)
        out |= {"open_exact_match": em, "open_contains": contains, "open_replies": replies}
    return out


def forgetting_report(probe: Probe, base: dict, finetuned: dict) -> dict:
    """Base vs fine-tuned on each probe part: accuracies with 95% CIs, and the drop with its p-value."""
    from tunekit.eval.stats import mean_ci, paired_difference

    parts = {}
    for name in ("multiple_choice", "open_exact_match", "open_contains"):
        if name not in base:
            continue
        b, lo_b, hi_b = mean_ci(base[name])
        f, lo_f, hi_f = mean_ci(finetuned[name])
        diff = paired_difference(finetuned[name], base[name])  # base - finetuned: the drop
        parts[name] = {
            "n": len(base[name]),
            "base": b,
            "base_ci_low": lo_b,
            "base_ci_high": hi_b,
            "finetuned": f,
            "finetuned_ci_low": lo_f,
            "finetuned_ci_high": hi_f,
            "drop": diff["difference"],
            "drop_ci_low": diff["ci_low"],
            "drop_ci_high": diff["ci_high"],
            "p_value": diff["p_value"],
            "significant": diff["significant"],
        }
    open_examples = [
        {"question": q, "answers": a, "base": rb, "finetuned": rf}
        for (q, a), rb, rf in zip(
            probe.open, base.get("open_replies", []), finetuned.get("open_replies", []), strict=False
        )
    ][:10]
    return {"source": probe.source, "parts": parts, "open_examples": open_examples}
