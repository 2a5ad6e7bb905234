"""The quickstart's ticket data: the record must follow from the text, and the text must vary."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tunekit.demo import tickets

# Words that signal a priority. Every P1 ticket has a P1 marker and no P3 marker, and so on: a
# marker anywhere else (a problem template saying "whenever", say) would make the label a guess.
P1_MARKERS = (
    "urgent", "asap", "critical", "emergency", "losing", "blocked", "today", "right away",
    "top priority", "costing", "all users", "all of our users",
)  # fmt: skip
P2_MARKERS = ("this week", "soon", "workaround", "few days", "normal priority")
P3_MARKERS = (
    "no rush", "whenever", "low priority", "take your time", "no hurry", "curious", "can wait",
    "nothing pressing", "not pressing", "not a big deal",
)  # fmt: skip


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return tickets.generate(800, 0)


def _text(row: dict) -> str:
    return row["messages"][1]["content"]


def _record(row: dict) -> dict:
    return json.loads(row["messages"][2]["content"])


def test_size_and_chat_format(rows):
    assert len(rows) >= 600
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == tickets.SYSTEM_PROMPT


def test_deterministic_per_seed():
    assert tickets.generate(200, 3) == tickets.generate(200, 3)
    assert tickets.generate(200, 3) != tickets.generate(200, 4)


def test_shipped_file_matches_generator(rows):
    with open(tickets.SHIPPED_PATH, encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == rows, (
        "regenerate: python -m tunekit.demo.tickets --out src/tunekit/demo/data/tickets.jsonl"
    )


def test_targets_are_compact_json_in_the_taxonomy(rows):
    for row in rows:
        target = row["messages"][2]["content"]
        record = json.loads(target)
        assert list(record) == ["intent", "priority", "product"]
        assert target == json.dumps(record)  # byte-exact, so exact match is well defined
        assert record["intent"] in tickets.INTENTS
        assert record["priority"] in tickets.PRIORITIES
        assert record["product"] in tickets.PRODUCTS


def test_taxonomy_is_not_in_the_prompt():
    # The point of the demo: the names are learned from the data, not read off the prompt.
    names = [*tickets.INTENTS, *tickets.PRODUCTS]
    assert not any(name in tickets.SYSTEM_PROMPT for name in names)


def test_intents_balanced_and_priorities_spread(rows):
    intents = Counter(_record(r)["intent"] for r in rows)
    assert set(intents) == set(tickets.INTENTS)
    assert max(intents.values()) / min(intents.values()) <= 1.2
    priorities = Counter(_record(r)["priority"] for r in rows)
    assert set(priorities) == {"P1", "P2", "P3"}
    assert all(count >= 0.15 * len(rows) for count in priorities.values())
    products = Counter(_record(r)["product"] for r in rows)
    assert set(products) == set(tickets.PRODUCTS)


def test_priority_follows_from_explicit_cues(rows):
    for row in rows:
        text, priority = _text(row).lower(), _record(row)["priority"]
        p1 = any(m in text for m in P1_MARKERS)
        p2 = any(m in text for m in P2_MARKERS)
        p3 = any(m in text for m in P3_MARKERS)
        expected = {"P1": (True, False, False), "P2": (False, True, False), "P3": (False, False, True)}
        assert (p1, p2, p3) == expected[priority], text


def test_product_follows_from_exactly_one_product_name(rows):
    for row in rows:
        text = _text(row).lower()
        named = {pid for pid, names in tickets.PRODUCTS.items() if any(n.lower() in text for n in names)}
        assert named == {_record(row)["product"]}, text


def test_text_is_varied_and_unique(rows):
    texts = [_text(r) for r in rows]
    assert len(set(texts)) == len(texts)
    words = [len(t.split()) for t in texts]
    assert min(words) >= tickets.MIN_WORDS and max(words) <= tickets.MAX_WORDS
    openings = {" ".join(t.split()[:5]) for t in texts}
    assert len(openings) >= 450  # 620 at n=800, seed 0


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "t.jsonl"
    tickets.main(["--out", str(out), "--n", "40", "--seed", "7"])
    with open(out, encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == tickets.generate(40, 7)
