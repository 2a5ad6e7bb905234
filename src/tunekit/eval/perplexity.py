"""`tunekit eval RUN_DIR` for task: pretrain: held-out perplexity, the fine-tuned model against its base.

Each held-out document is tokenized and cut into chunks exactly as training saw its documents
(data/packing.py), and both models score every target token: all but the document's first. Per
document that gives a summed negative log-likelihood (NLL) and a token count, and from them:

- perplexity = exp(sum NLL / sum tokens) over the test set, with a 95% bootstrap interval over
  documents (the documents are the independent units; tokens within one are not);
- the paired comparison on the same documents: the per-token NLL difference (fine-tuned minus base),
  exp of it being the perplexity ratio, with its bootstrap interval and a two-sided sign-flip
  permutation test on the per-document NLL differences (with the token counts fixed, their mean is
  the per-token difference times a constant, so the test is on the very statistic reported).

Writes report.json (`task_metric: perplexity`, `contenders`, `paired`), report.md, and
document_nll.json (each document's tokens and NLL under both models).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tunekit.console import err as console
from tunekit.data.needs import require
from tunekit.data.packing import Chunk, chunk_document, document_text, documents_ids
from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.eval.report import comparison_table
from tunekit.eval.stats import N_BOOT, ratio_ci, sign_flip_p
from tunekit.io import atomic_write_json, atomic_write_text
from tunekit.models.device import autocast, model_device
from tunekit.runs.directory import load_run_config, load_test_examples
from tunekit.train.loss import target_states
from tunekit.train.setup import load_base, load_trained

PROJECT_ROWS = 1024  # target positions projected onto the vocabulary at a time


def evaluate_perplexity(run_dir: str | Path, data: str | Path | None = None, quiet: bool = False) -> dict:
    """Perplexity of the base and the fine-tuned model on the held-out documents (or `data`), with CIs
    and a paired test; writes report.json, report.md and document_nll.json."""
    from tunekit.models import resolve_model

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    examples = load_test_examples(run_dir, cfg, data)
    require("documents", examples, "test", cfg.task)
    t0 = time.perf_counter()
    model, tokenizer, is_adapter = load_trained(run_dir)
    docs = documents_ids(tokenizer, [document_text(ex) for ex in examples])
    chunks = [c for d, ids in enumerate(docs) for c in chunk_document(d, ids, cfg.train.max_length)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bs = cfg.eval.batch_size
    tuned = document_nll(model, chunks, len(docs), pad_id, bs)
    if is_adapter:
        with model.disable_adapter():
            base = document_nll(model, chunks, len(docs), pad_id, bs)
    else:
        del model  # a full fine-tune: its base is another model of the same size
        base = document_nll(load_base(resolve_model(cfg.model), "full").eval(), chunks, len(docs), pad_id, bs)
    tokens = np.array([len(ids) - 1 for ids in docs], dtype=float)  # targets: all but the first
    report = perplexity_report(base, tuned, tokens)
    report = {
        "task": cfg.task,
        "task_metric": "perplexity",
        "n_test": len(docs),
        "unit": "documents",
        "test_data": str(data) if data is not None else str(run_dir / "data" / "test.jsonl"),
        "tokens": int(tokens.sum()),
        "chunks": len(chunks),
        "max_length": cfg.train.max_length,
        "seconds": time.perf_counter() - t0,
    } | report
    rows = [
        {"source": ex.where, "tokens": int(n), "base_nll": float(b), "finetuned_nll": float(f)}
        for ex, n, b, f in zip(examples, tokens, base, tuned, strict=True)
    ]
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_json(run_dir / "document_nll.json", rows)
    atomic_write_text(run_dir / "report.md", markdown(report))
    if not quiet:
        p = report["paired"]
        console.print(
            f"eval pretrain: perplexity base {report['contenders']['base']['perplexity']:.3f} -> fine-tuned "
            f"{report['contenders']['finetuned']['perplexity']:.3f} (ratio {p['perplexity_ratio']:.3f} "
            f"[{p['ratio_ci_low']:.3f}, {p['ratio_ci_high']:.3f}], p = {p['p_value']:.4f}) on {len(docs)} "
            f"documents, {report['tokens']:,} tokens ({report['seconds']:.0f}s)"
        )
    return report


@torch.no_grad()
def document_nll(model, chunks: list[Chunk], n_docs: int, pad_id: int, batch_size: int) -> np.ndarray:
    """(n_docs,) summed NLL of each document's target tokens: every chunk runs alone (right-padded,
    attention-masked), its first token context only, and its NLL goes to its document."""
    device = model_device(model)
    out = torch.zeros(n_docs, dtype=torch.float64)
    for s in range(0, len(chunks), batch_size):
        batch = chunks[s : s + batch_size]
        width = max(len(c.input_ids) for c in batch)
        ids = torch.tensor(
            [c.input_ids + [pad_id] * (width - len(c.input_ids)) for c in batch], device=device
        )
        mask = torch.tensor([[1] * len(c.input_ids) + [0] * (width - len(c.input_ids)) for c in batch])
        labels = torch.where(mask.bool(), ids.cpu(), IGNORE_INDEX)
        labels[:, 0] = IGNORE_INDEX
        keep = (labels[:, 1:] != IGNORE_INDEX).to(device)  # (B, T-1): positions whose next token is a target
        targets = labels[:, 1:].to(device)[keep]
        doc_of = torch.tensor([c.doc for c in batch], device=device)[:, None].expand_as(keep)[keep]
        with autocast(device):
            h, head = target_states(model, ids, mask.to(device), keep)
            for a in range(0, len(targets), PROJECT_ROWS):
                logits = (
                    head(h[a : a + PROJECT_ROWS]) if head is not None else h[a : a + PROJECT_ROWS]
                ).float()
                nll = F.cross_entropy(logits, targets[a : a + PROJECT_ROWS], reduction="none")
                out.index_add_(0, doc_of[a : a + PROJECT_ROWS].cpu(), nll.double().cpu())
    return out.numpy()


def perplexity_report(base: np.ndarray, tuned: np.ndarray, tokens: np.ndarray, seed: int = 0) -> dict:
    """The contenders' perplexities with bootstrap CIs over documents, and the paired comparison.
    base, tuned: (D,) summed NLL per document; tokens: (D,) its target tokens."""
    contenders = {}
    for name, nll in (("base", base), ("finetuned", tuned)):
        mean, lo, hi = ratio_ci(nll, tokens, seed=seed)
        contenders[name] = {
            "perplexity": math.exp(mean),
            "perplexity_ci_low": math.exp(lo),
            "perplexity_ci_high": math.exp(hi),
            "nll_per_token": mean,
        }
    diff, lo, hi = ratio_ci(tuned - base, tokens, seed=seed)
    p = sign_flip_p(tuned - base, seed=seed)
    paired = {
        "metric": "perplexity",
        "nll_difference_per_token": diff,
        "perplexity_ratio": math.exp(diff),
        "ratio_ci_low": math.exp(lo),
        "ratio_ci_high": math.exp(hi),
        "p_value": p,
        "test": "paired_permutation",
        "significant": bool(p < 0.05),
        "bootstrap_resamples": N_BOOT,
    }
    return {"contenders": contenders, "paired": paired}


def markdown(report: dict) -> str:
    """report.md: what was measured, the table with CIs, and the paired comparison in words."""
    c, p = report["contenders"], report["paired"]
    lower = "lower" if p["perplexity_ratio"] < 1 else "higher"
    verdict = "significant" if p["significant"] else "not significant"
    return "\n".join(
        [
            "# Evaluation report\n",
            f"Task `{report['task']}`, held-out test: {report['n_test']} documents ({report['tokens']:,} "
            f"target tokens, {report['chunks']} chunks of at most {report['max_length']} tokens) from "
            f"`{report['test_data']}`.\n",
            f"Task metric **perplexity** (lower is better): base {c['base']['perplexity']:.3f}, fine-tuned "
            f"{c['finetuned']['perplexity']:.3f}.\n",
            comparison_table(report) + "\n",
            f"Paired on the same documents: the fine-tuned model's perplexity is {p['perplexity_ratio']:.3f}x "
            f"the base's (95% CI [{p['ratio_ci_low']:.3f}, {p['ratio_ci_high']:.3f}]), {lower}; "
            f"p = {p['p_value']:.4f} (sign-flip permutation test over documents), {verdict} at 0.05.\n",
            "Perplexity is exp of the mean NLL per target token (every token after a document's first, "
            "the end-of-sequence token included); its interval is a bootstrap over documents.\n",
        ]
    )
