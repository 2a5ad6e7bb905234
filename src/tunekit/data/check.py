"""`tunekit data check`: find every defect in a data set before training costs anything.

    report = check_data(["train.jsonl", "test.jsonl"], model="smollm2-135m-instruct")
    report.exit_code   # 0 clean (warnings allowed), 1 errors found, 2 a file cannot be read

Per row: the reader's and normalizer's errors (invalid JSON, missing fields, unknown roles, ...,
and rows no task can train on: no prompt before the first answer, e.g. raw `text` rows), plus
warnings (no system or user message, longer than max_length, a very short target, control
characters, a key given twice, a key the format does not use). Tool calls are checked against the
row's declared tools as each row is read (data/tools.py: invalid JSON arguments, an unknown function,
a missing required argument, ... each an error naming the file, line and field). KTO feedback: a data set rated only one
way, and one answer rated both ways, are warnings. Per file: no rows at all is an error. Per file: exact and near duplicates. Across files: leakage (the same or nearly the
same example in two files, e.g. train and test). Statistics: turns, tokens with the model's
tokenizer, labels. Every row is accounted for: kept + rejected == total.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.data.example import Example
from tunekit.data.needs import NO_PROMPT, feedback_counts, untrainable
from tunekit.data.packing import document_text, documents_ids
from tunekit.data.problems import Problem
from tunekit.errors import TunekitError

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_NEAR_PAIRS = 10_000  # near-duplicate pairs listed per file
SHORT_TARGET_CHARS = 2  # a target this short is usually a mistake, except for labels


@dataclass
class FileCheck:
    """One file's examples and problems."""

    path: str
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    unreadable: str | None = None  # set when the file could not be read at all

    @property
    def rejected_lines(self) -> set[int]:
        return {p.line for p in self.problems if p.severity == "error" and p.line}


@dataclass
class CheckReport:
    files: list[FileCheck]
    warnings: list[Problem]
    duplicates: list[dict[str, Any]]
    leakage: list[dict[str, Any]]
    stats: dict[str, Any]
    estimate: dict[str, Any] | None = None
    token_lengths: list[int] | None = None  # per kept example, files in order; None without a model

    @property
    def errors(self) -> list[Problem]:
        return [p for f in self.files for p in f.problems if p.severity == "error"]

    @property
    def kept(self) -> int:
        return sum(len(f.examples) for f in self.files)

    @property
    def rejected(self) -> int:
        return sum(len(f.rejected_lines) for f in self.files)

    @property
    def exit_code(self) -> int:
        if any(f.unreadable for f in self.files):
            return 2
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.kept + self.rejected,
            "kept": self.kept,
            "rejected": self.rejected,
            "files": [
                {
                    "file": f.path,
                    "kept": len(f.examples),
                    "rejected": len(f.rejected_lines),
                    "unreadable": f.unreadable,
                }
                for f in self.files
            ],
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "duplicates": self.duplicates,
            "leakage": self.leakage,
            "stats": self.stats,
            "estimate": self.estimate,
            "exit_code": self.exit_code,
        }


def read_file(
    path: str | Path, format: str, columns: Mapping[str, str] | None, labels, kind: str = "conversations"
) -> FileCheck:
    """Read and normalize one file, keeping every problem; a file that cannot be read is noted. `kind`
    is the data the task trains on (tasks.py: conversations, ..., documents), which decides the
    rows it cannot train on (needs.untrainable)."""
    from tunekit.data.formats import read_examples

    fc = FileCheck(str(path))
    try:
        fc.examples, fc.problems = read_examples(path, format=format, columns=columns)
    except TunekitError as e:
        fc.unreadable = str(e)
        return fc
    if labels:
        fc.examples, bad = _check_labels(fc.examples, set(labels))
        fc.problems += bad
    fc.examples, bad = _check_trainable(fc.examples, kind)
    fc.problems = sorted(fc.problems + bad, key=lambda p: p.line)
    if not fc.examples and not fc.rejected_lines:
        fc.problems.insert(0, _empty(fc.path))
    return fc


def _check_trainable(examples: list[Example], kind: str) -> tuple[list[Example], list[Problem]]:
    kept, bad = [], []
    for ex in examples:
        why = untrainable(ex, kind)
        if why:
            bad.append(Problem(ex.source, ex.line, "messages", NO_PROMPT, why))
        else:
            kept.append(ex)
    return kept, bad


def _empty(path: str) -> Problem:
    """A file with no rows at all: training on it would train on nothing (or a split of nothing)."""
    msg = (
        "no rows: the file is empty or holds only blank lines (a CSV only its header row); add "
        "examples, or leave the file out"
    )
    return Problem(path, 0, "", "empty_file", msg)


def _check_labels(examples: list[Example], allowed: set[str]) -> tuple[list[Example], list[Problem]]:
    kept, bad = [], []
    for ex in examples:
        if ex.label is not None and ex.label not in allowed:
            msg = f"label {ex.label!r} is not in the declared label set ({', '.join(sorted(allowed))}); fix the label or add it to data.labels"
            bad.append(Problem(ex.source, ex.line, "label", "bad_label", msg))
        else:
            kept.append(ex)
    return kept, bad


def row_warnings(ex: Example, n_tokens: int | None, max_length: int) -> list[Problem]:
    """Warnings for one example that is valid but probably not what the user meant."""
    w = []
    roles = {m.role for m in ex.messages}

    def warn(field: str, kind: str, msg: str) -> None:
        w.append(Problem(ex.source, ex.line, field, kind, msg, "warning"))

    conversational = ex.format in ("chat", "sharegpt")
    # Declared tools are written into a system turn (data/tokenize.py), which replaces the default one.
    if conversational and "system" not in roles and not ex.tools:
        warn("messages", "no_system", "no system message; the model's default system prompt will be used")
    if ex.format != "text" and "user" not in roles:
        warn("messages", "no_user", "no user message: the model learns to answer nothing")
    if n_tokens is not None and n_tokens > max_length:
        warn(
            "",
            "too_long",
            f"{n_tokens} tokens, over max_length {max_length}: {n_tokens - max_length} would be cut",
        )
    if ex.label is None and ex.format != "text" and len(ex.target.strip()) < SHORT_TARGET_CHARS:
        warn("target", "short_target", f"the target is only {len(ex.target.strip())} character(s)")
    if any(CONTROL.search(m.content) for m in ex.messages):
        warn("", "control_chars", "control characters in the text; remove them unless they are intended")
    return w


def example_text(ex: Example) -> str:
    """One string per example for duplicate detection: every user and assistant turn, the rejected
    answer included. System prompts are left out: a data set usually repeats one in every row, and
    a long shared prompt would make every short example a near duplicate of every other."""
    turns = list(ex.messages) + list(ex.rejected or ())
    return "\n".join(m.reply for m in turns if m.role != "system")  # tool calls count as text


def feedback_warnings(examples: list[Example]) -> list[Problem]:
    """KTO feedback that trains badly: rated only one way (task: kto refuses such a train split), or
    the same answer to the same prompt rated both ways (the two cancel out)."""
    rated = [e for e in examples if e.desirable is not None]
    if not rated:
        return []
    out = []
    good, bad = feedback_counts(rated)
    if not (good and bad):
        missing = "undesirable (label false)" if good else "desirable (label true)"
        msg = (
            f"{good} desirable and {bad} undesirable answers: KTO learns from the contrast of both kinds, "
            f"and task: kto refuses a train split without either; add {missing} examples"
        )
        out.append(Problem(rated[0].source, 0, "label", "one_sided_feedback", msg, "warning"))
    first: dict[str, Example] = {}
    for ex in rated:
        seen = first.setdefault(example_text(ex), ex)
        if seen.desirable != ex.desirable:
            msg = (
                f"the same answer to the same prompt is rated {'desirable' if seen.desirable else 'undesirable'} "
                f"at {seen.where} and the opposite here, so the two cancel out; keep the right rating"
            )
            out.append(Problem(ex.source, ex.line, "label", "conflicting_feedback", msg, "warning"))
    return out


def find_duplicates(fc: FileCheck, threshold: float) -> list[dict[str, Any]]:
    from tunekit.data.dedup import find_duplicates as exact_and_near

    lines = [e.line for e in fc.examples]
    groups, pairs = exact_and_near([example_text(e) for e in fc.examples], threshold=threshold)
    out: list[dict[str, Any]] = [
        {"file": fc.path, "kind": "exact", "lines": [lines[i] for i in g]} for g in groups
    ]
    # A pathological file (every row nearly the same) has O(n^2) pairs: list a bounded number.
    out += [
        {"file": fc.path, "kind": "near", "lines": [lines[i], lines[j]], "similarity": round(s, 4)}
        for i, j, s in pairs[:MAX_NEAR_PAIRS]
    ]
    if len(pairs) > MAX_NEAR_PAIRS:
        out.append(
            {
                "file": fc.path,
                "kind": "near_truncated",
                "lines": [],
                "not_listed": len(pairs) - MAX_NEAR_PAIRS,
            }
        )
    return out


def find_leakage(a: FileCheck, b: FileCheck, threshold: float) -> list[dict[str, Any]]:
    from tunekit.data.dedup import cross_pairs

    exact, near = cross_pairs(
        [example_text(e) for e in a.examples], [example_text(e) for e in b.examples], threshold
    )
    la, lb = [e.line for e in a.examples], [e.line for e in b.examples]
    out = [
        {"kind": "exact", "a": {"file": a.path, "line": la[i]}, "b": {"file": b.path, "line": lb[j]}}
        for i, j in exact
    ]
    out += [
        {
            "kind": "near",
            "a": {"file": a.path, "line": la[i]},
            "b": {"file": b.path, "line": lb[j]},
            "similarity": round(s, 4),
        }
        for i, j, s in near
    ]
    return out


def token_lengths(tokenizer, examples: Sequence[Example]) -> list[int]:
    """Tokens per example as training would see them: the chat template, then the tokenizer in batch."""
    from tunekit.data.tokenize import render

    if not examples:
        return []
    texts = [render(tokenizer, e.messages, tools=e.tools) for e in examples]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if hasattr(backend, "encode_batch_fast"):
        # The Rust tokenizer without offsets or Python-side conversion: about 1.6x faster here.
        return [len(enc) for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def tool_rendering_of(tokenizer) -> str:
    """How the tokenizer's chat template writes tool use: by itself, or through the fallback."""
    from tunekit.data.tokenize import supports_tools

    if supports_tools(tokenizer):
        return "the chat template's own"
    return "the fallback (tools in the system turn, <tool_call> blocks, <tool_response> user turns)"


def _summary(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    return {
        "min": s[0],
        "median": statistics.median(s),
        "p95": s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))],
        "max": s[-1],
        "mean": round(sum(s) / len(s), 2),
    }


def compute_stats(examples: list[Example], lengths: list[int] | None) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "examples": len(examples),
        "formats": dict(Counter(e.format for e in examples)),
        "turns_per_example": _summary([len(e.messages) for e in examples]),
    }
    if lengths is not None:
        stats["tokens_per_example"] = _summary(lengths)
        stats["total_tokens"] = sum(lengths)
    calls = [c.name for e in examples for m in e.messages for c in m.tool_calls]
    if calls or any(e.tools for e in examples):  # tool use: how much of it, which functions
        stats["tool_calls"] = {
            "examples_with_tools": sum(bool(e.tools) for e in examples),
            "examples_with_calls": sum(any(m.tool_calls for m in e.messages) for e in examples),
            "calls": len(calls),
            "functions_called": len(set(calls)),
        }
    thinking = sum(bool(m.reasoning) for e in examples for m in e.messages)
    if thinking:
        stats["reasoning_turns"] = thinking
    good, bad = feedback_counts(examples)
    if good or bad:  # KTO feedback: how many answers are rated each way
        stats["feedback"] = {"desirable": good, "undesirable": bad}
    labels = Counter(e.label for e in examples if e.label is not None)
    if labels:
        stats["labels"] = dict(labels.most_common())
        stats["label_imbalance_ratio"] = round(max(labels.values()) / min(labels.values()), 3)
    return stats


def check_data(
    files: Sequence[str | Path],
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    labels: Sequence[str] | None = None,
    model: str | None = None,
    max_length: int = 512,
    near_threshold: float = 0.8,
    chat_template: str | None = None,
    kind: str = "conversations",
) -> CheckReport:
    """Check `files` (e.g. train, validation, test): rows, duplicates within each, leakage between them.
    With a model, the chat template (`chat_template`: see models/templates.py) must render every kind
    of conversation in the data with a correct loss mask (data/tokenize.py `check_template`).
    kind "documents" (task: pretrain): raw text, counted without the template and never cut (a long
    document is split into chunks: data/packing.py), so no too_long warning."""
    checks = [read_file(p, format, columns, labels, kind) for p in files]
    examples = [e for fc in checks for e in fc.examples]
    lengths, tool_rendering = None, None
    if model is not None and examples:
        from tunekit.data.tokenize import check_template
        from tunekit.models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(model), chat_template)
        if kind == "documents":
            lengths = [len(ids) for ids in documents_ids(tokenizer, [document_text(e) for e in examples])]
        else:
            check_template(tokenizer, examples)
            lengths = token_lengths(tokenizer, examples)
            tool_rendering = tool_rendering_of(tokenizer)
    cut = lengths if lengths and kind != "documents" else None
    warnings = [
        w for k, ex in enumerate(examples) for w in row_warnings(ex, cut[k] if cut else None, max_length)
    ]
    warnings += [p for fc in checks for p in fc.problems if p.severity == "warning"]
    warnings += feedback_warnings(examples)
    duplicates = [d for fc in checks for d in find_duplicates(fc, near_threshold)]
    leakage = [
        d for i, a in enumerate(checks) for b in checks[i + 1 :] for d in find_leakage(a, b, near_threshold)
    ]
    stats = compute_stats(examples, lengths)
    if "tool_calls" in stats and tool_rendering:
        stats["tool_calls"]["rendering"] = tool_rendering
    stats["max_length"] = max_length
    if cut:
        stats["over_max_length"] = sum(n > max_length for n in cut)
    return CheckReport(checks, warnings, duplicates, leakage, stats, token_lengths=lengths)


def check_config(cfg, kind: str = "conversations") -> CheckReport:
    """Check the data a config trains on, with its model, max_length and label set; `kind`: the data
    its task trains on (tasks.py)."""
    d = cfg.data
    files = [p for p in (d.train, d.validation, d.test) if p is not None]
    report = check_data(
        files,
        format=d.format,
        columns=d.columns or None,
        labels=d.labels,
        model=cfg.model,
        max_length=cfg.train.max_length,
        chat_template=cfg.chat_template,
        kind=kind,
    )
    return report


def write_json(report: CheckReport, path: str | Path) -> None:
    """The full report as JSON at `path` (never over one of the checked files)."""
    from tunekit.io import atomic_write_json, check_output

    check_output(path, "--json", inputs=[f.path for f in report.files])
    atomic_write_json(path, report.to_dict())


def write_clean(report: CheckReport, out_dir: str | Path) -> dict[str, str]:
    """Write each file's kept rows (as they were) and a rejects file with the reasons for each row:
    STEM.clean.jsonl and STEM.rejects.jsonl in `out_dir`. Refuses (`TunekitError`), before writing
    anything, an `out_dir` that is a file or under one, two checked files with the same stem (one
    would overwrite the other's), and an output that is one of the checked files."""
    from tunekit.data.readers import read_records
    from tunekit.io import atomic_write_jsonl, check_output

    out_dir = check_output(out_dir, "--write-clean", folder=True)
    files = [fc for fc in report.files if not fc.unreadable]
    outputs = _clean_outputs(files, out_dir)
    written = {}
    for fc in files:
        clean, rejects_path = outputs[fc.path]
        raw_by_line = dict(read_records(fc.path)[0])
        reasons: dict[int, list[str]] = {}
        for p in fc.problems:
            if p.severity == "error" and p.line:
                reasons.setdefault(p.line, []).append(f"{p.kind}: {p}")
        rejects = [
            {"file": fc.path, "line": ln, "reasons": r, "record": raw_by_line.get(ln)}
            for ln, r in sorted(reasons.items())
        ]
        atomic_write_jsonl(clean, [e.raw for e in fc.examples])
        atomic_write_jsonl(rejects_path, rejects)
        written[fc.path] = str(clean)
    return written


def _clean_outputs(files: list[FileCheck], out_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Each file's (clean, rejects) output paths, checked before anything is written."""
    from tunekit.io import check_output

    stems: dict[str, str] = {}
    outputs = {}
    for fc in files:
        stem = Path(fc.path).stem
        if stem in stems:
            raise TunekitError(
                f"--write-clean: {stems[stem]} and {fc.path} would both write {stem}.clean.jsonl; "
                "check them one at a time, or rename one"
            )
        stems[stem] = fc.path
        pair = (out_dir / f"{stem}.clean.jsonl", out_dir / f"{stem}.rejects.jsonl")
        for out in pair:
            check_output(out, "--write-clean", inputs=[f.path for f in files])
        outputs[fc.path] = pair
    return outputs
