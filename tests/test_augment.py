"""`tunekit data augment`: prompts, parsing, target choice, the check of drafts, and that nothing is ever
written into the training data. Canned drafts test the accounting exactly; the tiny random model
(gibberish) tests it through real generation; one slow test drafts with the real default model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import jsonl, shared_data, write
from tunekit.config import config_from_dict
from tunekit.data.example import Example, Message
from tunekit.data.formats import FORMATS
from tunekit.errors import TunekitError
from tunekit.iterate.augment import (
    ALL,
    Target,
    augment,
    choose_targets,
    load_source,
    parse_draft,
    prompt_text,
    render_draft_prompt,
    to_record,
)

TEXTS = {
    "card_arrival": [
        "my card still has not arrived after {i} weeks",
        "when will the card you posted on day {i} get here",
        "still waiting on my new card from order {i}",
        "the card I ordered {i} days ago never came",
    ],
    "card_linking": [
        "how do I link card {i} to my account",
        "where in the app can I add my card number {i}",
    ],
    "exchange_rate": [
        "what exchange rate do you use for transfer {i}",
        "is the euro rate for payment {i} the market one",
        "how are currency rates set for order {i}",
    ],
}


def _rows(n_per_text: int, offset: int = 0) -> list[dict]:
    return [
        {"text": t.format(i=i + offset), "category": label}
        for label, texts in TEXTS.items()
        for t in texts
        for i in range(n_per_text)
    ]


def _csv(path, rows):
    path.write_text("text,category\n" + "".join(f"{r['text']},{r['category']}\n" for r in rows))
    return path


@pytest.fixture
def data_file(tmp_path):
    return _csv(tmp_path / "train.csv", _rows(3))


def _run_dir(tmp_path, model_dir, report: bool = True):
    """A run directory as `tunekit train` leaves it (config, splits), plus a report.json made by the
    real failure triage: card_linking always wrong, exchange_rate half wrong."""
    from tunekit.eval.failures import analyze_failures, train_group_counts
    from tunekit.runs.directory import create_run_dir, prepare_splits

    cfg = config_from_dict(
        {
            "model": str(model_dir),
            "data": {
                "train": str(_csv(tmp_path / "train.csv", _rows(3))),
                "validation": str(_csv(tmp_path / "val.csv", _rows(1, offset=100))),
                "test": str(_csv(tmp_path / "test.csv", _rows(2, offset=200))),
                "format": "classification",
                "columns": {"label": "category"},
            },
            "output_dir": str(tmp_path / "run"),
        }
    )
    run = create_run_dir(cfg)
    splits = prepare_splits(cfg, run)
    if report:
        rows = []
        for k, ex in enumerate(splits["test"]):
            right = ex.label == "card_arrival" or (ex.label == "exchange_rate" and k % 2 == 0)
            pred = ex.target if right else "card_arrival"
            rows.append(
                {"source": ex.where, "prompt": ex.prompt[-1].content, "reference": ex.target}
                | {"label": ex.label, "finetuned": pred, "finetuned_correct": right}
            )
        fa = analyze_failures(rows, set(TEXTS), train_group_counts(splits["train"]))
        (run / "report.json").write_text(json.dumps({"task_metric": "exact_match", "failure_analysis": fa}))
    return run, splits


def canned(*replies):
    """A drafter that answers the prompts in order with `replies`: text, or (text, finished)."""
    seen = []

    def draft(prompts):
        seen.extend(prompts)
        assert len(prompts) == len(replies)
        return [r if isinstance(r, tuple) else (r, True) for r in replies]

    draft.prompts = seen
    return draft


# ---- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fixed", "finished", "expected"),
    [
        (
            " where is my card?\nOutput: card_arrival",
            "card_arrival",
            True,
            ("where is my card?", "card_arrival"),
        ),
        (
            ' "where is my card?"',
            "card_arrival",
            True,
            ("where is my card?", "card_arrival"),
        ),  # no Output line
        (" 2+3?\nOutput: 5", None, True, ("2+3?", "5")),
        (" 2+3?\nOutput: 5\n\nInput: 4+4?\nOutput: 8", None, False, ("2+3?", "5")),  # first example only
        (" 2+3?\nOutput: 5\n\nI hope this helps!", None, False, ("2+3?", "5")),  # chatter cut
        (" q?\n**Output:** a", None, True, ("q?", "a")),
        (" lost card\nOutput: card_arrival\nmore text", "card_arrival", False, ("lost card", "card_arrival")),
    ],
)
def test_parse_well_formed_drafts(text, fixed, finished, expected):
    assert parse_draft(text, fixed, finished) == expected


@pytest.mark.parametrize(
    ("text", "fixed", "finished", "kind"),
    [
        (" some words that never end", None, False, "truncated"),
        ("   \nOutput: 5", None, True, "no_input"),
        (" 2+3?", None, True, "no_output"),
        (" 2+3?\nOutput:   ", None, True, "empty_output"),
        (" where is my card?\nOutput: exchange_rate", "card_arrival", True, "off_target"),
    ],
)
def test_parse_errors_name_the_kind(text, fixed, finished, kind):
    from tunekit.iterate.augment import ParseError

    with pytest.raises(ParseError) as e:
        parse_draft(text, fixed, finished)
    assert e.value.kind == kind


def test_multiline_outputs_keep_their_blank_lines():
    assert parse_draft(" q\nOutput: a\n\nb", multiline=True) == ("q", "a\n\nb")


# ---- prompts and targets ------------------------------------------------------------------------


def _ex(user, answer, label=None, system=None):
    msgs = ((Message("system", system),) if system else ()) + (
        Message("user", user),
        Message("assistant", answer),
    )
    return Example(msgs, label=label, source="t.jsonl", line=1)


def test_prompt_shows_the_seeds_and_asks_for_the_format(tokenizer):
    seeds = [
        _ex("where is my card", "card_arrival", "card_arrival"),
        _ex("card not here", "card_arrival", "card_arrival"),
    ]
    label = Target("card_arrival", seeds, "--labels", "card_arrival", fixed_output="card_arrival")
    text = prompt_text(label, seeds)
    assert "Input: where is my card\nOutput: card_arrival" in text and "Input: card not here" in text
    assert text.endswith("Input: <the new input>\nOutput: card_arrival")
    rendered = render_draft_prompt(tokenizer, label, seeds)
    assert rendered.endswith("<|im_start|>assistant\nInput:")  # the reply is opened in the format

    records = [_ex("ticket 1", '{"priority": "P1"}'), _ex("ticket 2", '{"priority": "P1", "x": 1}')]
    group = Target("priority=P1", records, "weak")
    text = prompt_text(group, records)
    assert "every output has priority=P1" in text and text.endswith("Output: <its output>")


def test_explicit_labels_and_a_clean_error_for_an_unknown_one(data_file):
    source = load_source(data_file, columns={"label": "category"})
    assert choose_targets(source, ["exchange_rate", "card_linking"]) == [
        ("exchange_rate", "--labels"),
        ("card_linking", "--labels"),
    ]
    with pytest.raises(TunekitError, match="did you mean 'card_arrival'"):
        choose_targets(source, ["card_arival"])


def test_a_data_file_targets_its_smallest_groups_or_everything(data_file, tmp_path):
    source = load_source(data_file, columns={"label": "category"})
    assert [g for g, _ in choose_targets(source, None)] == ["card_linking", "exchange_rate", "card_arrival"]
    plain = write(
        tmp_path, "qa.jsonl", jsonl(*({"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)))
    )
    assert [g for g, _ in choose_targets(load_source(plain), None)] == [ALL]


def test_a_run_directory_targets_the_reports_weak_groups(tmp_path, tiny_model_dir):
    run, _ = _run_dir(tmp_path, tiny_model_dir)
    targets = choose_targets(load_source(run), None)
    assert [g for g, _ in targets] == ["card_linking", "exchange_rate"]  # lowest accuracy first
    assert targets[0][1].startswith("0% right on")


def test_a_classify_report_targets_the_labels_with_the_lowest_recall(tmp_path, tiny_model_dir):
    from tunekit.eval.classify import confusion

    run, _ = _run_dir(tmp_path, tiny_model_dir, report=False)
    refs = ["card_arrival"] * 4 + ["card_linking"] * 2 + ["exchange_rate"] * 4
    preds = ["card_arrival"] * 4 + ["card_arrival", "card_linking"] + ["card_arrival"] * 3 + ["exchange_rate"]
    (run / "report.json").write_text(
        json.dumps({"task": "classify", "confusion": confusion(preds, refs, sorted(TEXTS))})
    )
    assert [g for g, _ in choose_targets(load_source(run), None)] == ["exchange_rate", "card_linking"]


def test_a_run_without_a_report_says_to_evaluate_first(tmp_path, tiny_model_dir):
    run, _ = _run_dir(tmp_path, tiny_model_dir, report=False)
    with pytest.raises(TunekitError, match="tunekit eval"):
        choose_targets(load_source(run), None)


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "alpaca", "classification", "sharegpt"])
def test_a_draft_is_written_back_in_the_inputs_format(fmt):
    label = "card_arrival" if fmt in ("classification", "chat") else None
    system = "Be brief." if fmt in ("chat", "alpaca", "sharegpt") else None
    ex = _ex("where is my card", "card_arrival", label, system)
    back = FORMATS[fmt](to_record(ex, fmt, {}))
    assert back.messages == ex.messages and back.label == label


# ---- the check, end to end with canned drafts ---------------------------------------------------


def test_drafts_are_checked_and_every_one_accounted_for(tmp_path, tiny_model_dir, tokenizer):
    run, splits = _run_dir(tmp_path, tiny_model_dir)
    train_text = next(e.prompt[-1].content for e in splits["train"] if e.label == "card_linking")
    test_text = next(e.prompt[-1].content for e in splits["test"] if e.label == "card_linking")
    new = " could you help me connect the visa I got yesterday with the phone wallet\nOutput: card_linking"
    drafter = canned(
        new,  # kept
        f" {train_text}\nOutput: card_linking",  # the training data has it
        f" {test_text}",  # the test split has it: leakage
        new,  # the same as draft 1
        " what rate applies to dollars\nOutput: exchange_rate",  # another label
        ("", True),  # nothing
        (" some words and more words", False),  # cut by max_new_tokens
    )
    train_bytes = (tmp_path / "train.csv").read_bytes()
    result = augment(run, labels=["card_linking"], per_group=7, seeds=2, drafter=drafter, tokenizer=tokenizer)

    assert all(p.endswith("Input:") and "card_linking" in p for p in drafter.prompts)
    kept = [json.loads(x) for x in result.candidates.read_text().splitlines()]
    assert kept == [
        {
            "text": "could you help me connect the visa I got yesterday with the phone wallet",
            "category": "card_linking",  # the training file's own column name
            "review": "pending",
            "augment": kept[0]["augment"],
        }
    ]
    assert kept[0]["augment"]["draft"] == 1 and len(kept[0]["augment"]["seeds"]) == 2
    rejected = {r["draft"]: r for r in map(json.loads, result.rejected.read_text().splitlines())}
    assert {k: r["reason"] for k, r in rejected.items()} == {
        2: "duplicate",
        3: "leaks_into_held_out",
        4: "duplicate_draft",
        5: "off_target",
        6: "no_input",
        7: "truncated",
    }
    assert "data/test.jsonl" in rejected[3]["message"] and "draft 1" in rejected[4]["message"]
    assert rejected[6]["stage"] == rejected[7]["stage"] == "parse"
    s = result.summary
    assert s["totals"] == {"drafted": 7, "unparseable": 2, "rejected": 4, "kept": 1}
    assert json.loads(result.summary_path.read_text())["totals"] == s["totals"]
    assert result.candidates == run / "augment" / "candidates.jsonl"
    assert (tmp_path / "train.csv").read_bytes() == train_bytes  # the training data is untouched


def test_never_writes_over_the_training_data_or_an_earlier_review(data_file, tokenizer):
    with pytest.raises(TunekitError, match="training data"):
        augment(
            data_file, columns={"label": "category"}, out=data_file, drafter=canned(), tokenizer=tokenizer
        )
    args = {
        "columns": {"label": "category"},
        "labels": ["card_linking"],
        "per_group": 1,
        "tokenizer": tokenizer,
    }
    result = augment(data_file, drafter=canned(" a brand new way to ask"), **args)
    assert result.candidates == data_file.with_name("train.candidates.jsonl")
    with pytest.raises(TunekitError, match="--overwrite"):
        augment(data_file, drafter=canned(" another"), **args)
    augment(data_file, drafter=canned(" another"), overwrite=True, **args)


def test_too_long_drafts_are_rejected(data_file, tokenizer):
    result = augment(
        data_file,
        columns={"label": "category"},
        labels=["card_arrival"],
        per_group=1,
        max_length=20,
        drafter=canned(" " + "where is it " * 20),
        tokenizer=tokenizer,
    )
    assert result.summary["reasons"] == {"too_long": 1}


# ---- real generation ----------------------------------------------------------------------------


def test_tiny_model_gibberish_is_counted_and_rejected_not_dropped(data_file, tiny_model_dir):
    before = data_file.read_bytes()
    result = augment(
        data_file,
        columns={"label": "category"},
        labels=["card_linking", "exchange_rate"],
        per_group=3,
        model=str(tiny_model_dir),
        max_new_tokens=12,
    )
    s = result.summary
    n = s["totals"]
    assert n["drafted"] == 6 == n["kept"] + n["unparseable"] + n["rejected"]
    assert n["unparseable"] >= 1  # a random model does not stop within 12 tokens
    rejected = [json.loads(x) for x in result.rejected.read_text().splitlines()]
    kept = result.candidates.read_text().splitlines()
    assert len(rejected) == n["unparseable"] + n["rejected"] and len(kept) == n["kept"]
    assert all(r["reason"] and r["message"] and r["generated"].startswith("Input:") for r in rejected)
    assert sum(v["drafted"] for v in s["targets"].values()) == 6
    assert data_file.read_bytes() == before


def tunekit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tunekit", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_end_to_end_on_a_run_directory(tmp_path, tiny_model_dir):
    run, _ = _run_dir(tmp_path, tiny_model_dir)
    r = tunekit("data", "augment", str(run), "--per-group", "2", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "review then add" in r.stdout and str(run / "augment" / "candidates.jsonl") in r.stdout
    summary = json.loads((run / "augment" / "candidates.summary.json").read_text())
    assert list(summary["targets"]) == ["card_linking", "exchange_rate"]
    assert summary["totals"]["drafted"] == 4


def test_cli_errors_are_clean(tmp_path, data_file):
    r = tunekit("data", "augment", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "file not found" in r.stderr and "Traceback" not in r.stderr
    r = tunekit("data", "augment", str(data_file), "--column", "label=category", "--labels", "card_arival")
    assert r.returncode == 2 and "did you mean 'card_arrival'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_default_model_drafts_banking77_candidates_that_parse(tmp_path):
    with shared_data("banking77/train.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if "," not in r["text"] and '"' not in r["text"]]
    by_label = [[r for r in rows if r["category"] == c][:20] for c in ("card_arrival", "exchange_rate")]
    src = _csv(tmp_path / "b77.csv", by_label[0] + by_label[1])
    result = augment(
        src, columns={"label": "category"}, labels=["card_arrival", "exchange_rate"], per_group=3
    )
    n = result.summary["totals"]
    assert n["drafted"] == 6 == n["kept"] + n["unparseable"] + n["rejected"]
    assert n["unparseable"] < n["drafted"], result.rejected.read_text()  # at least some parse
