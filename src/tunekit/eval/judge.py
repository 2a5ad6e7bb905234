"""`tunekit eval RUN --judge MODEL`: a language model judges the reply pairs people rate, both ways
round, and is checked against the people.

Each pair (eval/pairs.py: base few-shot vs fine-tuned, or run A vs run B) is shown to the judge
twice, once with each reply as A: a judge that prefers whatever comes first (position bias) then
contradicts itself instead of favouring one side. The two verdicts, mapped back to the pair's own
order, combine as: the same side twice -> that side; anything else -> a tie, counted as
`inconsistent` when the two named different winners or one called a tie. A reply with no verdict in
it makes the pair `unparseable`: counted, shown with the judge's words, never dropped, and outside
the win rate.

The judge is a local model (any `model:` spec, generating greedily here) or any OpenAI-compatible
endpoint (`--judge-url http://host/v1`, MODEL its model name; the key from $TUNEKIT_JUDGE_API_KEY,
else $OPENAI_API_KEY; four requests in flight). The rubric is a text with {prompt}, {a} and {b} in it (and {reference},
optionally); its verdict format is MT-Bench's: `[[A]]`, `[[B]]`, `[[C]]` for a tie.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tunekit.console import err
from tunekit.data.ratings import cohen_kappa, decide, describe_win_rate, win_rate
from tunekit.errors import TunekitError
from tunekit.eval.pairs import build_pairs

DEFAULT_RUBRIC = """\
Please act as an impartial judge and evaluate the quality of the responses provided by two AI \
assistants to the user question displayed below. Choose the assistant that follows the user's \
instructions and answers the user's question better: consider correctness against the reference \
answer, helpfulness, relevance and level of detail. Avoid any position bias: the order in which \
the responses are presented must not influence your decision, nor their length. Be as objective \
as possible. After a short explanation, output your final verdict by strictly following this \
format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.

[User Question]
{prompt}

[Reference Answer]
{reference}

[The Start of Assistant A's Answer]
{a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{b}
[The End of Assistant B's Answer]
"""
PLACEHOLDERS = ("{prompt}", "{a}", "{b}")
VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
KEY_VARIABLES = ("TUNEKIT_JUDGE_API_KEY", "OPENAI_API_KEY")
ENDPOINT_CONCURRENCY = 4


def load_rubric(path: str | Path | None) -> str:
    """The rubric text: the default, or a file that must hold {prompt}, {a} and {b}."""
    if path is None:
        return DEFAULT_RUBRIC
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TunekitError(f"--rubric {path}: cannot read it ({e.strerror})") from None
    missing = [p for p in PLACEHOLDERS if p not in text]
    if missing:
        raise TunekitError(
            f"--rubric {path}: has no {', '.join(missing)}; a rubric names where the prompt ({{prompt}}) "
            "and the two replies ({a}, {b}) go, and optionally the reference ({reference})"
        )
    return text


def judge_prompt(rubric: str, pair: dict, a: str, b: str) -> str:
    """The rubric filled in for one order of one pair. Replaced one by one, not str.format: a
    rubric may hold other braces (a JSON example)."""
    context = "".join(f"{m['role']}: {m['content']}\n" for m in (pair.get("prompt_messages") or [])[:-1])
    values = {
        "{prompt}": context + pair["prompt"],
        "{reference}": pair.get("reference", ""),
        "{a}": a,
        "{b}": b,
    }
    return re.sub(r"\{(?:prompt|reference|a|b)\}", lambda m: values[m.group(0)], rubric)


def parse_verdict(reply: str) -> str | None:
    """A, B or tie from the judge's reply, or None: no `[[A]]`/`[[B]]`/`[[C]]` in it, or verdicts
    that contradict each other (`[[A]] ... [[B]]`): a guess would be a verdict the judge never gave."""
    found = {m.upper() if m.lower() != "tie" else "C" for m in VERDICT.findall(reply)}
    if len(found) != 1:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found.pop()]


def combine(first_as_a: str | None, second_as_a: str | None) -> tuple[str, bool]:
    """(the pair's verdict in its own order, whether the two orders disagreed) from the verdict with
    `first` shown as A and the verdict with `second` shown as A."""
    if first_as_a is None or second_as_a is None:
        return "unparseable", False
    one = {"A": "first", "B": "second"}.get(first_as_a, "tie")
    two = {"A": "second", "B": "first"}.get(second_as_a, "tie")
    if one == two:
        return one, False
    return "tie", True


# ---- judges: a list of prompts in, a list of replies out -------------------------------------------


class LocalJudge:
    """A local model (any model spec) answering each judge prompt greedily, in batches."""

    def __init__(self, spec: str, max_tokens: int, batch_size: int = 8):
        from tunekit.models import load_model, load_tokenizer, resolve_model

        path = resolve_model(spec)
        self.name, self.max_tokens, self.batch_size = spec, max_tokens, batch_size
        self.tokenizer, self.model = load_tokenizer(path), load_model(path).eval()

    def __call__(self, prompts: list[str]) -> list[str]:
        from tunekit.data.tokenize import render_request
        from tunekit.eval.generate import generate_ids
        from tunekit.models.stops import reply_text, stop_token_ids

        rendered = [render_request(self.tokenizer, [{"role": "user", "content": p}], None) for p in prompts]
        stops = stop_token_ids(self.tokenizer, self.model)
        rows = generate_ids(self.model, self.tokenizer, rendered, self.max_tokens, self.batch_size, stops)
        return [reply_text(self.tokenizer, row, stops).strip() for row in rows]


class EndpointJudge:
    """An OpenAI-compatible chat endpoint (`tunekit serve`, vLLM, llama.cpp's server, a hosted API)."""

    def __init__(self, url: str, model: str, max_tokens: int, timeout: float = 300):
        self.url = url.rstrip("/") + "/chat/completions"
        self.name, self.max_tokens, self.timeout = model, max_tokens, timeout
        self.key = next((os.environ[k] for k in KEY_VARIABLES if os.environ.get(k)), None)

    def __call__(self, prompts: list[str]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        # A few requests in flight: a served model batches them; replies come back in prompt order.
        with ThreadPoolExecutor(ENDPOINT_CONCURRENCY) as pool:
            return list(pool.map(self._ask, prompts))

    def _ask(self, prompt: str) -> str:
        body = {
            "model": self.name,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        headers = {"Content-Type": "application/json"}
        headers |= {"Authorization": f"Bearer {self.key}"} if self.key else {}
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            hint = f" (set ${KEY_VARIABLES[0]})" if e.code in (401, 403) else ""
            raise TunekitError(f"--judge-url {self.url}: HTTP {e.code}{hint}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise TunekitError(
                f"--judge-url {self.url}: cannot reach it ({getattr(e, 'reason', e)})"
            ) from None
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TunekitError(
                f"--judge-url {self.url}: not an OpenAI chat completion: {json.dumps(answer)[:300]}"
            ) from None


# ---- the judgement -------------------------------------------------------------------------------


def judge_run(
    run_dir: str | Path,
    judge,
    rubric: str = DEFAULT_RUBRIC,
    comparison: str | None = None,
    rubric_name: str = "default",
) -> dict:
    """Judge every pair of `comparison` (the run's default one) both ways round with `judge` (a
    callable: prompts -> replies); compare with the human ratings of the same pairs in the
    registry; write judge.json in the run directory and return it."""
    from tunekit.eval.pairs import comparisons
    from tunekit.io import atomic_write_json

    run_dir = Path(run_dir)
    comparison = comparison or comparisons(run_dir)[0]
    pairs, identical = build_pairs(run_dir, comparison)
    if not pairs:
        raise TunekitError(f"{run_dir}: {comparison} has no pair to judge ({identical} identical replies)")
    prompts = []
    for p in pairs:
        first, second = p["first"]["reply"], p["second"]["reply"]
        prompts += [judge_prompt(rubric, p, first, second), judge_prompt(rubric, p, second, first)]
    err.print(f"judge {judge.name}: {len(pairs)} pairs of {comparison}, each both ways round")
    replies = judge(prompts)
    verdicts = []
    for i, p in enumerate(pairs):
        one, two = replies[2 * i], replies[2 * i + 1]
        v1, v2 = parse_verdict(one), parse_verdict(two)
        verdict, inconsistent = combine(v1, v2)
        verdicts.append(
            {
                "item": p["item"],
                "prompt": p["prompt"],
                "verdict": verdict,
                "inconsistent": inconsistent,
                "first_as_a": {"verdict": v1, "reply": one},
                "second_as_a": {"verdict": v2, "reply": two},
            }
        )
    report = judge_report(verdicts, human_decisions(run_dir, comparison))
    report = {
        "judge": judge.name,
        "rubric": rubric_name,
        "comparison": comparison,
        "first": pairs[0]["first"]["name"],
        "second": pairs[0]["second"]["name"],
        "identical_left_out": identical,
    } | report
    atomic_write_json(run_dir / "judge.json", report)
    return report


def human_decisions(run_dir: Path, comparison: str) -> dict[str, str]:
    """item -> the raters' majority verdict, for the pairs people rated in `tunekit ui`."""
    from tunekit.runs import registry

    run = registry.get_run(str(run_dir))
    if run is None:
        return {}
    by_item: dict[str, list[str]] = {}
    for r in registry.get_ratings(run["id"], comparison):
        by_item.setdefault(r["item"], []).append(r["verdict"])
    return {item: decide(vs) for item, vs in by_item.items()}


def judge_report(verdicts: list[dict], human: dict[str, str]) -> dict:
    """Counts, the judge's win rate (second over first, unparseable pairs outside it) and, over
    the pairs people rated, agreement with them: Cohen's kappa over first/second/tie (both bad
    counts as a tie) and the judge's accuracy on the pairs people did not call even."""
    parsed = [v for v in verdicts if v["verdict"] != "unparseable"]
    singles = [v[k]["verdict"] for v in verdicts for k in ("first_as_a", "second_as_a")]
    shared = [
        (v["verdict"], human[v["item"]])
        for v in parsed
        if human.get(v["item"], "disagreement") != "disagreement"
    ]
    tied = {"both_bad": "tie"}
    decisive = [(j, h) for j, h in shared if h in ("first", "second")]
    return {
        "pairs": len(verdicts),
        "unparseable": len(verdicts) - len(parsed),
        "unparseable_replies": sum(s is None for s in singles),
        "inconsistent": sum(v["inconsistent"] for v in verdicts),
        "position": {"A": singles.count("A"), "B": singles.count("B"), "tie": singles.count("tie")},
        "win": win_rate([v["verdict"] for v in parsed]),
        "human": {
            "pairs": len(shared),
            "kappa": cohen_kappa([j for j, _ in shared], [tied.get(h, h) for _, h in shared])
            if shared
            else None,
            "decisive": len(decisive),
            "accuracy": sum(j == h for j, h in decisive) / len(decisive) if decisive else None,
            "unparseable": sum(1 for v in verdicts if v["verdict"] == "unparseable" and v["item"] in human),
        },
        "verdicts": verdicts,
    }


def print_judge_report(report: dict, limit: int = 5) -> None:
    """The judge's figures on the terminal, and the first unparseable replies in its own words."""
    from tunekit.console import out

    out.print(
        f"judge {report['judge']} (rubric: {report['rubric']}) on {report['comparison']}: {report['pairs']} pairs"
    )
    out.print("judge: " + describe_win_rate(report["win"], report["first"], report["second"]))
    pos = report["position"]
    out.print(
        f"unparseable: {report['unparseable']} pairs ({report['unparseable_replies']} of {2 * report['pairs']} "
        f"replies had no [[A]]/[[B]]/[[C]] verdict); inconsistent when swapped: {report['inconsistent']}; "
        f"single verdicts: A {pos['A']}, B {pos['B']}, tie {pos['tie']}"
    )
    h = report["human"]
    if h["pairs"]:
        kappa = "undefined" if h["kappa"] is None else f"{h['kappa']:.3f}"
        acc = (
            "-"
            if h["accuracy"] is None
            else f"{h['accuracy']:.3f} on {h['decisive']} pairs people did not call even"
        )
        out.print(f"judge vs people on {h['pairs']} rated pairs: Cohen's kappa {kappa}; accuracy {acc}")
        if h["unparseable"]:
            out.print(
                f"({h['unparseable']} rated pairs the judge gave no verdict on are outside these figures)"
            )
    else:
        out.print("judge vs people: no human ratings of these pairs yet (rate them in `tunekit ui`)")
    for v in [v for v in report["verdicts"] if v["verdict"] == "unparseable"][:limit]:
        bad = v["first_as_a"] if v["first_as_a"]["verdict"] is None else v["second_as_a"]
        out.print(f"  unparseable on {v['prompt'][:50]!r}: {bad['reply'][:120]!r}")
