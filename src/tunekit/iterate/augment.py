"""`tunekit data augment`: draft new examples for the weak labels or failure groups, for a person to review.

Self-instruct style: for each target group (a label, or a field=value of JSON targets such as
"priority=P1"), K seed examples of that group go into a prompt, and a local model writes one new
example in a fixed format after the prefilled "Input:":

    Input: My new card has not come yet, it has been ten days.
    Output: card_arrival

Each draft is parsed, then put through the data check (the row normalizes in the input's format,
still belongs to its group, fits max_length, has no control characters, duplicates neither the
existing data, the test split included, nor another draft). Drafts that pass go to the candidates
file, marked `"review": "pending"`; every other draft goes to the rejected file with its reason, so
drafted == kept + rejected. Nothing is ever written into the training data.

    result = augment("runs/banking77", per_group=5, seeds=3)
    result.summary["totals"]   # {"drafted": 50, "unparseable": 12, "rejected": 20, "kept": 18}
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.data.example import Example, Message
from tunekit.errors import TunekitError

ALL = "(all)"  # the one target of data with neither labels nor JSON targets: every example
SMALLEST_GROUPS = 5  # targets chosen for a data file without an evaluation: its smallest groups
TOP_P = 0.95  # nucleus sampling cut: drops the long tail of junk tokens a small model samples
NEAR_THRESHOLD = 0.8  # the data check's near-duplicate Jaccard
# Row warnings of the data check that reject a draft (a person would not keep such a row).
REJECT_WARNINGS = ("too_long", "control_chars")
# The formats a draft can be written back in: single-turn input -> output rows.
WRITABLE = ("chat", "prompt_completion", "alpaca", "classification", "sharegpt")
PARSE_KINDS = ("no_input", "no_output", "empty_output", "truncated")  # the "unparseable" reasons

# A draft callable: rendered prompts in, (generated text, ended on a stop token) out, in order.
Drafter = Callable[[list[str]], list[tuple[str, bool]]]


@dataclass
class Source:
    """What augmentation reads: seeds, the data drafts must not duplicate, and how to write drafts."""

    path: Path
    train: list[Example]  # seeds come from here
    # (split, example) pairs drafts must duplicate none of: a run's three splits, or the file's rows
    reference: list[tuple[str, Example]]
    format: str  # the training file's format: drafts are written in it
    columns: dict[str, str]  # canonical -> source column names of the training file
    train_file: str  # the file a person adds reviewed rows to
    model: str
    max_length: int
    report: dict | None = None  # a run's report.json
    skipped_rows: int = 0  # rows of a data file with errors (left out as seeds)


@dataclass
class Target:
    group: str
    pool: list[Example]  # single-turn training examples of the group: the seeds are drawn from here
    why: str  # why it is a target, for the summary
    label: str | None = None  # set when the group is a label: drafts carry it
    fixed_output: str | None = None  # the group's one output (classification): drafts write only inputs
    multiline_output: bool = False  # a seed's output holds a blank line: do not cut drafts at one


@dataclass
class Draft:
    index: int  # 1-based, in the order drafted: how the summary and the files name a draft
    target: Target
    seeds: list[Example]
    prompt: str = ""
    text: str = ""  # what the model wrote after the prefilled "Input:"
    finished: bool = True  # ended on a stop token (not cut by max_new_tokens)
    example: Example | None = None
    record: dict[str, Any] | None = None
    reason: str | None = None  # None: kept
    message: str = ""


@dataclass
class AugmentResult:
    candidates: Path
    rejected: Path
    summary_path: Path
    summary: dict[str, Any] = field(default_factory=dict)


# ---- reading the source -------------------------------------------------------------------------


def load_source(
    path: str | Path,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    model: str | None = None,
    max_length: int | None = None,
) -> Source:
    """A data file, or a run directory (its train split for seeds, all three splits as reference)."""
    from tunekit.models.load import DEFAULT_MODEL

    path = Path(path)
    if path.is_dir():
        return _run_source(path, model, max_length)
    from tunekit.data.formats import read_examples

    examples, problems = read_examples(path, format=format, columns=columns)
    if not examples:
        raise TunekitError(
            f"{path}: no readable examples to draw seeds from (run `tunekit data check {path}`)"
        )
    fmt = examples[0].format
    _check_writable(fmt, path)
    return Source(
        path=path,
        train=examples,
        reference=[("data", e) for e in examples],
        format=fmt,
        columns=dict(columns or {}),
        train_file=str(path),
        model=model or DEFAULT_MODEL,
        max_length=max_length or 512,
        skipped_rows=len({p.line for p in problems if p.severity == "error"}),
    )


def _run_source(run_dir: Path, model: str | None, max_length: int | None) -> Source:
    from tunekit.runs.directory import SPLITS, load_run_config, read_split
    from tunekit.tasks import get_task

    cfg = load_run_config(run_dir)
    if get_task(cfg.task).data in ("pairs", "unpaired"):
        raise TunekitError(
            f"{run_dir}: a task: {cfg.task} run; augment drafts input -> output examples "
            "(conversations or labelled text), not preference pairs or rated answers"
        )
    splits = {s: read_split(run_dir, s) for s in SPLITS}
    if not splits["train"]:
        raise TunekitError(f"{run_dir}: the train split is empty: no seeds to draft from")
    manifest = run_dir / "data" / "manifest.json"
    fmt = json.loads(manifest.read_text()).get("format", "chat") if manifest.is_file() else "chat"
    fmt = fmt if fmt in WRITABLE else "chat"
    report_path = run_dir / "report.json"
    return Source(
        path=run_dir,
        train=splits["train"],
        reference=[(s, e) for s in SPLITS for e in splits[s]],
        format=fmt,
        columns=dict(cfg.data.columns or {}),
        train_file=str(cfg.data.train),
        model=model or cfg.model,
        max_length=max_length or cfg.train.max_length,
        report=json.loads(report_path.read_text()) if report_path.is_file() else None,
    )


def _check_writable(fmt: str, path: Path) -> None:
    if fmt not in WRITABLE:
        raise TunekitError(
            f"{path}: {fmt} data; augment drafts single-turn input -> output examples, in one of "
            f"{', '.join(WRITABLE)}: preference pairs and raw text are not supported"
        )


# ---- choosing the targets -----------------------------------------------------------------------


def groups_of(examples: Sequence[Example]) -> dict[str, list[Example]]:
    """Group -> its examples, as the failure triage groups them: by label, or by each field=value of a
    JSON target. Data with neither has one group, ALL."""
    from tunekit.eval.failures import group_keys

    groups: dict[str, list[Example]] = {}
    for ex in examples:
        for g in group_keys(ex.target, ex.label):
            groups.setdefault(g, []).append(ex)
    return groups or {ALL: list(examples)}


def choose_targets(source: Source, labels: Sequence[str] | None) -> list[tuple[str, str]]:
    """(group, why) for each target: `labels` when given, else the evaluation's weak groups (a run
    directory), else the data's smallest groups."""
    groups = groups_of(source.train)
    if labels:
        unknown = [g for g in labels if g not in groups]
        if unknown:
            raise TunekitError(_unknown_groups(unknown, groups))
        return [(g, "--labels") for g in dict.fromkeys(labels)]
    if source.path.is_dir():
        return _weak_groups(source)
    if list(groups) == [ALL]:
        return [(ALL, "the data has no labels or JSON targets: every example is a seed")]
    smallest = sorted(groups, key=lambda g: (len(groups[g]), g))[:SMALLEST_GROUPS]
    return [(g, f"{len(groups[g])} examples: one of the smallest groups (no evaluation)") for g in smallest]


def _unknown_groups(unknown: list[str], groups: Mapping[str, list]) -> str:
    known = sorted(groups)
    hint = difflib.get_close_matches(unknown[0], known, n=1)
    shown = ", ".join(known[:30]) + (f", ... ({len(known)} in all)" if len(known) > 30 else "")
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return (
        f"--labels: {', '.join(map(repr, unknown))}: not among the training data's labels or groups"
        f"{did_you_mean} Known: {shown}"
    )


def _weak_groups(source: Source) -> list[tuple[str, str]]:
    """The groups `tunekit eval` found weakest: failure_analysis.weak_groups (sft) or the labels with
    the lowest recall in the confusion matrix (classify)."""
    run = source.path
    report = source.report
    if report is None:
        raise TunekitError(
            f"{run}: no report.json, so no failure groups to target; run `tunekit eval {run}` first, "
            "or name the targets with --labels"
        )
    if "failure_analysis" in report:
        weak = [
            (g["group"], f"{g['accuracy']:.0%} right on {g['test_examples']} test examples")
            for g in report["failure_analysis"]["weak_groups"]
        ]
    elif "confusion" in report:
        weak = _weak_labels(report["confusion"])
    else:
        raise TunekitError(f"{run}/report.json has no failure groups; name the targets with --labels")
    if not weak:
        raise TunekitError(
            f"{run}/report.json: no failure groups (every group scored 100%); name targets with --labels"
        )
    return weak


def _weak_labels(confusion: dict) -> list[tuple[str, str]]:
    """Labels with a failure, lowest recall first (at most 10, as the sft triage lists)."""
    rows = []
    for lab, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        n, right = sum(row), row[confusion["labels"].index(lab)]
        if n and right < n:
            rows.append((right / n, -n, lab))
    return [(lab, f"{acc:.0%} right on {-neg} test examples") for acc, neg, lab in sorted(rows)[:10]]


def build_targets(source: Source, chosen: list[tuple[str, str]]) -> tuple[list[Target], dict[str, str]]:
    """The targets that have seeds, and {group: why skipped} for those that have none."""
    groups = groups_of(source.train)
    targets, skipped = [], {}
    for g, why in chosen:
        pool = [ex for ex in groups.get(g, []) if _single_turn(ex)]
        if not pool:
            skipped[g] = "no single-turn training example of this group to use as a seed"
            continue
        is_label = all(ex.label == g for ex in pool)
        outputs = {ex.target for ex in pool}
        fixed = outputs.pop() if is_label and len(outputs) == 1 else None
        multiline = any("\n\n" in ex.target for ex in pool)
        targets.append(Target(g, pool, why, g if is_label else None, fixed, multiline))
    return targets, skipped


def _single_turn(ex: Example) -> bool:
    roles = [m.role for m in ex.messages if m.role != "system"]
    return roles == ["user", "assistant"] and ex.rejected is None


# ---- prompts, drafting, parsing ----------------------------------------------------------------


def input_of(ex: Example) -> str:
    return next(m.content for m in ex.messages if m.role == "user")


def prompt_text(target: Target, seeds: Sequence[Example]) -> str:
    """The user message that asks for one new example of `target`, shown `seeds`."""
    shown = "\n\n".join(f"Input: {input_of(s)}\nOutput: {s.target}" for s in seeds)
    if target.fixed_output is not None:
        head = f'Here are examples of inputs whose output is "{target.fixed_output}":'
        ask = (
            f'Write one new input whose output is also "{target.fixed_output}". Make it different '
            "from the examples, as a real user would write it. Answer in exactly this format:\n"
            f"Input: <the new input>\nOutput: {target.fixed_output}"
        )
    else:
        group = "" if target.group == ALL else f" (every output has {target.group})"
        also = "" if target.group == ALL else f", whose output also has {target.group}"
        head = f"Here are examples of inputs and the outputs expected for them{group}:"
        ask = (
            f"Write one new example of the same kind{also}: a new input, different from these, "
            "and the output expected for it. Answer in exactly this format:\n"
            "Input: <the new input>\nOutput: <its output>"
        )
    return f"{head}\n\n{shown}\n\n{ask}"


PREFILL = "Input:"  # the reply starts here, so the model writes in the format from its first token


def render_draft_prompt(tokenizer, target: Target, seeds: Sequence[Example]) -> str:
    """The chat-template prompt with the assistant's reply opened by PREFILL."""
    from tunekit.data.tokenize import render

    user = (Message("user", prompt_text(target, seeds)),)
    return render(tokenizer, user, add_generation_prompt=True) + PREFILL


_NEXT_INPUT = re.compile(r"^[ \t*#]*input[ \t*]*:", re.I | re.M)  # a second example begins
_OUTPUT = re.compile(r"[*#_]*\boutput[ \t*_]*:[ \t*_]*", re.I)


class ParseError(ValueError):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def parse_draft(
    text: str, fixed_output: str | None = None, finished: bool = True, multiline: bool = False
) -> tuple[str, str]:
    """(input, output) from what the model wrote after "Input:", or ParseError(kind, message).

    Only the first example counts: text from a second "Input:" on is dropped, and (unless
    `multiline`) the output ends at its first blank line, where small models start to comment. With
    `fixed_output` (a label) only the input is needed; an "Output:" naming another label is off target.
    """
    from tunekit.eval.metrics import normalize

    nxt = _NEXT_INPUT.search(text, 1)
    body = text[: nxt.start()] if nxt is not None else text
    out = _OUTPUT.search(body)
    inp = _unquote(body[: out.start()] if out else body)
    rest = body[out.end() :].lstrip() if out else ""
    # The draft ended: on a stop token, where a next example began, or where the model went on to
    # something else after the output (a blank line; for a label, the end of its line).
    ended = finished or nxt is not None
    if not multiline and "\n\n" in rest:
        rest, ended = rest.split("\n\n", 1)[0], True
    if fixed_output is not None and "\n" in rest:
        rest, ended = rest.split("\n", 1)[0], True
    said = _unquote(rest)
    if not ended:
        raise ParseError("truncated", "the draft hit --max-new-tokens before it ended; raise it")
    if not inp:
        raise ParseError("no_input", "nothing after 'Input:'")
    if fixed_output is not None:
        if said and normalize(said) != normalize(fixed_output):
            raise ParseError("off_target", f"the output {said[:60]!r} is not {fixed_output!r}")
        return inp, fixed_output
    if out is None:
        raise ParseError("no_output", "no 'Output:' after the input")
    if not said:
        raise ParseError("empty_output", "nothing after 'Output:'")
    return inp, said


def _unquote(s: str) -> str:
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    return s


def model_drafter(
    path: Path, tokenizer, *, temperature: float, max_new_tokens: int, batch_size: int, seed: int
) -> Drafter:
    """A Drafter sampling from the local model at `path` (a GPU when there is one)."""
    import torch

    from tunekit.models import load_model

    model = load_model(path).eval()  # on the GPU when there is one (models/device.py)

    def draft(prompts: list[str]) -> list[tuple[str, bool]]:
        torch.manual_seed(seed)
        return sample(model, tokenizer, prompts, temperature, max_new_tokens, batch_size)

    return draft


def sample(model, tokenizer, prompts: list[str], temperature: float, max_new_tokens: int, batch_size: int):
    """(text, ended on a stop token) for each rendered prompt, in order; batched, padded on the left.

    Prompts are sorted by length so a batch pads little. temperature 0 is greedy.
    """
    from tunekit.eval.generate import generate_ids
    from tunekit.models.stops import reply_text, stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": TOP_P, "top_k": 0}
    rows = generate_ids(
        model, tokenizer, prompts, max_new_tokens, batch_size, stops, **(sampling if temperature > 0 else {})
    )
    return [(reply_text(tokenizer, ids, stops), any(t in stops for t in ids)) for ids in rows]


def default_max_new_tokens(tokenizer, drafts: Sequence[Draft]) -> int:
    """Twice the longest seed's "Input: ... Output: ..." block in tokens, plus room: 32 to 512."""
    longest = max(
        len(tokenizer(f"{input_of(s)}\nOutput: {s.target}", add_special_tokens=False)["input_ids"])
        for d in drafts
        for s in d.seeds
    )
    return min(512, max(32, 2 * longest + 16))


# ---- the check ----------------------------------------------------------------------------------


def to_record(ex: Example, fmt: str, columns: Mapping[str, str]) -> dict[str, Any]:
    """A single-turn example as a row of `fmt`, with the training file's own column names."""
    system = [m.content for m in ex.messages if m.role == "system"]
    user, output = input_of(ex), ex.target
    if fmt == "chat":
        record = ex.to_dict()
    elif fmt == "classification":
        record = {"text": user, "label": ex.label if ex.label is not None else output}
    elif fmt == "prompt_completion":
        record = {"prompt": user, "completion": output}
    elif fmt == "alpaca":
        record = {"instruction": user, "output": output} | ({"system": system[0]} if system else {})
    else:  # sharegpt
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        record = {"conversations": [{"from": names[m.role], "value": m.content} for m in ex.messages]}
    return {columns.get(k, k): v for k, v in record.items()}


def check_drafts(drafts: list[Draft], source: Source, tokenizer) -> None:
    """Set `reason` on every draft that fails parsing or the data check; the rest are kept."""
    from tunekit.data.check import row_warnings, token_lengths

    for d in drafts:
        if d.reason is None:
            _check_row(d, source)
    alive = [d for d in drafts if d.reason is None]
    lengths = token_lengths(tokenizer, [d.example for d in alive]) if tokenizer is not None else []
    for k, d in enumerate(alive):
        n = lengths[k] if lengths else None
        bad = [w for w in row_warnings(d.example, n, source.max_length) if w.kind in REJECT_WARNINGS]
        if bad:
            d.reason, d.message = bad[0].kind, bad[0].message
    _reject_duplicates([d for d in drafts if d.reason is None], source)


def _check_row(d: Draft, source: Source) -> None:
    """Parse the draft, build the row in the input's format, and read it back as that format does."""
    from dataclasses import replace

    from tunekit.data.formats import FORMATS, FieldError
    from tunekit.eval.failures import group_keys

    t = d.target
    try:
        inp, output = parse_draft(d.text, t.fixed_output, d.finished, t.multiline_output)
    except ParseError as e:
        d.reason, d.message = e.kind, e.message
        return
    system = [m for m in d.seeds[0].messages if m.role == "system"][:1]
    ex = Example((*system, Message("user", inp), Message("assistant", output)), label=t.label)
    d.record = to_record(ex, source.format, source.columns)
    canonical = {k: d.record[v] for k, v in source.columns.items() if v in d.record}
    try:
        back = FORMATS[source.format](
            {k: v for k, v in d.record.items() if k not in source.columns.values()} | canonical
        )
    except FieldError as e:
        d.reason, d.message = e.kind, f"{e.field}: {e.message}"
        return
    d.example = replace(back, source="draft", format=source.format)
    if t.group != ALL and t.group not in group_keys(d.example.target, d.example.label):
        d.reason, d.message = "off_target", f"the output is not in the group {t.group}: {output[:80]!r}"


def _reject_duplicates(drafts: list[Draft], source: Source) -> None:
    """Drafts that duplicate (exactly or nearly) a row of the existing data, or an earlier draft."""
    from tunekit.data.check import example_text
    from tunekit.data.dedup import cross_pairs, find_duplicates

    texts = [example_text(d.example) for d in drafts]
    ref = source.reference
    exact, near = cross_pairs(texts, [example_text(e) for _, e in ref], NEAR_THRESHOLD)
    for i, j in exact:
        _duplicate(drafts[i], ref[j], "exact", 1.0)
    for i, j, s in near:
        _duplicate(drafts[i], ref[j], "near", s)
    alive = [k for k, d in enumerate(drafts) if d.reason is None]
    groups, pairs = find_duplicates([texts[k] for k in alive], NEAR_THRESHOLD)
    for g in groups:
        for k in g[1:]:
            _same_as_draft(drafts[alive[k]], drafts[alive[g[0]]], 1.0)
    for a, b, s in pairs:
        if drafts[alive[a]].reason is None:
            _same_as_draft(drafts[alive[b]], drafts[alive[a]], s)


def _duplicate(d: Draft, ref: tuple[str, Example], kind: str, similarity: float) -> None:
    if d.reason is not None:
        return
    split, ex = ref
    leak = split in ("validation", "test")
    d.reason = "leaks_into_held_out" if leak else "duplicate"
    what = "the same as" if kind == "exact" else f"a near duplicate (Jaccard {similarity:.2f}) of"
    d.message = f"{what} {ex.where}" + (": it would leak held-out data into training" if leak else "")


def _same_as_draft(d: Draft, first: Draft, similarity: float) -> None:
    if d.reason is None:
        d.reason = "duplicate_draft"
        what = "the same as" if similarity >= 1.0 else f"a near duplicate (Jaccard {similarity:.2f}) of"
        d.message = f"{what} draft {first.index}"


# ---- the command --------------------------------------------------------------------------------


def augment(
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    per_group: int = 5,
    seeds: int = 3,
    model: str | None = None,
    out: str | Path | None = None,
    seed: int = 42,
    temperature: float = 0.8,
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
    drafter: Drafter | None = None,
    tokenizer=None,
) -> AugmentResult:
    """Draft `per_group` candidates for each target of the data file or run directory at `path`.

    Writes the candidates (marked "review": "pending"), the rejected drafts with their reasons and a
    summary; never the training data. `drafter` and `tokenizer` replace the local model (tests).
    """
    _check_args(per_group, seeds, temperature, max_new_tokens, batch_size)
    source = load_source(path, format, columns, model, max_length)
    targets, skipped = build_targets(source, choose_targets(source, labels))
    if not targets:
        raise TunekitError("no target has seeds: " + "; ".join(f"{g}: {why}" for g, why in skipped.items()))
    out_path = _out_path(source, out, overwrite)
    rng = random.Random(seed)
    picks = [(t, rng.sample(t.pool, min(seeds, len(t.pool)))) for t in targets for _ in range(per_group)]
    drafts = [Draft(i, t, chosen) for i, (t, chosen) in enumerate(picks, start=1)]
    if drafter is None:
        from tunekit.models import load_tokenizer, resolve_model

        model_path = resolve_model(source.model)
        tokenizer = load_tokenizer(model_path)
        max_new_tokens = max_new_tokens or default_max_new_tokens(tokenizer, drafts)
        drafter = model_drafter(
            model_path,
            tokenizer,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            seed=seed,
        )
    for d in drafts:
        d.prompt = (
            render_draft_prompt(tokenizer, d.target, d.seeds) if tokenizer else prompt_text(d.target, d.seeds)
        )
    for d, (text, finished) in zip(drafts, drafter([d.prompt for d in drafts]), strict=True):
        d.text, d.finished = text, finished
    check_drafts(drafts, source, tokenizer)
    settings = {
        "model": source.model,
        "per_group": per_group,
        "seeds": seeds,
        "seed": seed,
        "temperature": temperature,
        "top_p": TOP_P,
        "max_new_tokens": max_new_tokens,
    }
    return _write(out_path, source, targets, skipped, drafts, settings)


def _check_args(per_group: int, seeds: int, temperature: float, max_new_tokens, batch_size: int) -> None:
    problems = [
        f"{flag} must be at least {low}, found {value}"
        for flag, value, low in (
            ("--per-group", per_group, 1),
            ("--seeds", seeds, 1),
            ("--batch-size", batch_size, 1),
            ("--max-new-tokens", 1 if max_new_tokens is None else max_new_tokens, 1),
        )
        if value < low
    ]
    if temperature < 0:
        problems.append(f"--temperature must be 0 (greedy) or more, found {temperature}")
    if problems:
        raise TunekitError("; ".join(problems))


def _out_path(source: Source, out: str | Path | None, overwrite: bool) -> Path:
    if out is None:
        p = source.path
        out = p / "augment" / "candidates.jsonl" if p.is_dir() else p.with_name(f"{p.stem}.candidates.jsonl")
    out = Path(out)
    data_files = {Path(source.train_file).resolve()} | {Path(e.source).resolve() for _, e in source.reference}
    if out.resolve() in data_files:
        raise TunekitError(
            f"--out {out}: that is the training data; augment writes candidates for review elsewhere"
        )
    if out.suffix != ".jsonl":
        raise TunekitError(f"--out {out}: the candidates file is JSON Lines; give a path ending in .jsonl")
    if out.exists() and not overwrite:
        raise TunekitError(
            f"{out} exists (from an earlier augment, perhaps under review); pass --overwrite, "
            "or another --out FILE.jsonl"
        )
    return out


def sibling(out: Path, what: str) -> Path:
    """candidates.jsonl -> candidates.rejected.jsonl, candidates.summary.json."""
    return out.with_name(f"{out.stem}.{what}")


def _write(out: Path, source: Source, targets, skipped, drafts: list[Draft], settings) -> AugmentResult:
    from tunekit.io import atomic_write_json, atomic_write_jsonl

    kept = [
        d.record
        | {
            "review": "pending",
            "augment": {"draft": d.index, "target": d.target.group, "seeds": [s.where for s in d.seeds]},
        }
        for d in drafts
        if d.reason is None
    ]
    rejected = [
        {
            "draft": d.index,
            "target": d.target.group,
            "stage": "parse" if d.reason in PARSE_KINDS else "check",
            "reason": d.reason,
            "message": d.message,
            "generated": PREFILL + d.text,
            "record": d.record,
            "seeds": [s.where for s in d.seeds],
        }
        for d in drafts
        if d.reason is not None
    ]
    result = AugmentResult(out, sibling(out, "rejected.jsonl"), sibling(out, "summary.json"))
    result.summary = _summary(source, targets, skipped, drafts, settings, result)
    try:
        atomic_write_jsonl(result.candidates, kept)
        atomic_write_jsonl(result.rejected, rejected)
        atomic_write_json(result.summary_path, result.summary)
    except OSError as e:
        raise TunekitError(
            f"cannot write {out.parent} ({e.strerror}); choose another folder with --out"
        ) from None
    return result


def _summary(source: Source, targets, skipped, drafts: list[Draft], settings, result) -> dict[str, Any]:
    groups = groups_of(source.train)
    per_target = {}
    for t in targets:
        mine = [d for d in drafts if d.target is t]
        unparseable = sum(d.reason in PARSE_KINDS for d in mine)
        kept = sum(d.reason is None for d in mine)
        per_target[t.group] = {
            "why": t.why,
            "train_examples": len(groups.get(t.group, [])),
            "drafted": len(mine),
            "unparseable": unparseable,
            "rejected": len(mine) - kept - unparseable,
            "kept": kept,
        }
    totals = {
        k: sum(v[k] for v in per_target.values()) for k in ("drafted", "unparseable", "rejected", "kept")
    }
    return {
        "source": str(source.path),
        "train_file": source.train_file,
        "format": source.format,
        "columns": source.columns,
        "settings": settings,
        "targets": per_target,
        "skipped_targets": skipped,
        "skipped_rows": source.skipped_rows,
        "totals": totals,
        "reasons": dict(Counter(d.reason for d in drafts if d.reason is not None).most_common()),
        "candidates": str(result.candidates),
        "rejected": str(result.rejected),
    }


def print_summary(result: AugmentResult) -> None:
    """The per-target counts, where the files are, and how to review and add the candidates."""
    from rich.table import Table

    from tunekit.console import out

    s = result.summary
    t = Table(title=f"augment {s['source']} with {s['settings']['model']}")
    for c in ("target", "why", "train examples", "drafted", "unparseable", "rejected", "kept"):
        t.add_column(c, overflow="fold")
    for g, v in s["targets"].items():
        t.add_row(
            g,
            v["why"],
            *(str(v[k]) for k in ("train_examples", "drafted", "unparseable", "rejected", "kept")),
        )
    out.print(t)
    for g, why in s["skipped_targets"].items():
        out.print(f"skipped {g}: {why}")
    if s["skipped_rows"]:
        out.print(f"{s['skipped_rows']} rows of {s['source']} have errors and were not used as seeds")
    n = s["totals"]
    reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "none"
    out.print(
        f'candidates: {result.candidates} ({n["kept"]} of {n["drafted"]} drafts, each marked "review": "pending")'
    )
    out.print(f"rejected:   {result.rejected} ({n['unparseable'] + n['rejected']}: {reasons})")
    out.print(f"summary:    {result.summary_path}")
    columns = "".join(f" --column {k}={v}" for k, v in s["columns"].items())
    out.print(
        "review then add: read every candidate, fix or delete it; then check the kept ones against the "
        f"training data with `tunekit data check {s['train_file']} {result.candidates}{columns}`, add them to "
        f"{s['train_file']} yourself, and train again. Nothing was added to the training data."
    )
