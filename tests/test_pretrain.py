"""task: pretrain (continued pre-training on raw text, issue 23 item 3): documents are cut into
chunks of max_length with nothing dropped, packed into rows whose segments never attend to each
other (each document's logits in a packed row equal the document run alone, on both the mask path
and the padding-free kernel), the loss covers every token after each document's first, full and LoRA
train and the loss falls, and the evaluation's perplexity CIs match a hand-computed case."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import jsonl, signal_on_call, write
from conftest import shared_data as shared
from tunekit.config import config_from_dict, load_config
from tunekit.data.check import check_data
from tunekit.data.packing import chunk_document, document_ids, pack_chunks, pack_documents
from tunekit.data.tokenize import IGNORE_INDEX
from tunekit.errors import DataError, Interrupted
from tunekit.eval.evaluate import evaluate
from tunekit.eval.perplexity import perplexity_report
from tunekit.models.load import load_model
from tunekit.runs.directory import read_metrics
from tunekit.train.recipes.pretrain import collate_rows, packed_loss_sum
from tunekit.train.session import train
from tunekit.train.speed.padding_free import enable_padding_free

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE age > 30",
    "Continued pre-training teaches a model the words of a domain, one document at a time, "
    "and long documents are cut into several chunks so nothing is lost.",
    "ok",
]


@pytest.fixture(scope="module", autouse=True)
def _home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a private registry for this module
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("home")))
        yield


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


# ---- chunking and packing ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 15, 22])
def test_chunks_overlap_by_one_so_every_token_after_the_first_is_a_target_once(n):
    ids = list(range(100, 100 + n))
    chunks = chunk_document(0, ids, max_length=8)
    assert all(len(c.input_ids) <= 8 for c in chunks)
    assert [c.first for c in chunks] == [True] + [False] * (len(chunks) - 1)
    targets = [t for c in chunks for t in c.input_ids[1:]]  # a chunk's first token is context only
    assert targets == ids[1:]  # each once, in order: nothing dropped, nothing twice


def test_best_fit_packing_keeps_every_chunk_within_max_length():
    chunks = [c for d, n in enumerate([7, 3, 5, 1, 8, 2, 4, 6]) for c in chunk_document(d, list(range(n)), 8)]
    rows = pack_chunks(chunks, 8)
    assert all(len(r.input_ids) <= 8 for r in rows)
    assert sorted(n for r in rows for n in r.segments) == sorted(len(c.input_ids) for c in chunks)
    assert len(rows) == 5  # 36 tokens in rows of 8: best fit needs the minimum, ceil(36 / 8)
    for r in rows:  # position ids restart, and each segment's first label is ignored
        starts = [sum(r.segments[:k]) for k in range(len(r.segments))]
        assert [i for i, p in enumerate(r.position_ids) if p == 0] == starts
        assert [i for i, lab in enumerate(r.labels) if lab == IGNORE_INDEX] == starts


def test_pack_documents_counts_documents_chunks_and_tokens(tokenizer):
    rows, stats = pack_documents(tokenizer, DOCS, max_length=16)
    lengths = [len(document_ids(tokenizer, t)) for t in DOCS]
    assert lengths[2] > 16  # the long document is split
    assert document_ids(tokenizer, DOCS[0])[-1] == tokenizer.eos_token_id
    assert (stats.documents, stats.tokens, stats.targets) == (4, sum(lengths), sum(lengths) - 4)
    assert stats.chunks == sum(math.ceil((n - 1) / 15) for n in lengths) and stats.rows == len(rows)
    # The loss covers every token after each document's first: the rows' labels hold exactly those.
    assert sum(lab != IGNORE_INDEX for r in rows for lab in r.labels) == stats.targets
    assert "4 documents" in stats.line("train") and 0 < stats.fill <= 1


# ---- no attention across documents ---------------------------------------------------------------


def _alone_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("kernel", ["mask", "padding_free"])
def test_a_packed_row_gives_each_document_its_own_logits_and_loss(tiny_model_dir, tokenizer, kernel):
    model = load_model(tiny_model_dir).eval()
    if kernel == "padding_free":
        assert enable_padding_free(model)
    rows, stats = pack_documents(tokenizer, DOCS, max_length=24)
    assert any(len(r.segments) > 1 for r in rows)  # something to leak across
    batch = collate_rows(rows, tokenizer.pad_token_id)
    alone_loss, alone_n = 0.0, 0
    for r in rows:
        with torch.no_grad():
            kw = (
                {"tunekit_segments": [0, *np.cumsum(r.segments).tolist()]} if kernel == "padding_free" else {}
            )
            # use_cache=False, as training's forward: transformers reads packed rows from restarting
            # position ids only without a KV cache (which eval mode would otherwise build).
            ids, pos = torch.tensor([r.input_ids]), torch.tensor([r.position_ids])
            packed = model(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits[0]
        start = 0
        for n in r.segments:
            seg = r.input_ids[start : start + n]
            alone = _alone_logits(model, seg)
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-4, atol=1e-4)
            alone_loss += float(F.cross_entropy(alone[:-1], torch.tensor(seg[1:]), reduction="sum"))
            alone_n += n - 1
            start += n
    with torch.no_grad():
        s, k = packed_loss_sum(model, batch)
    assert k == alone_n == stats.targets  # every token after each document's first, once
    assert float(s) == pytest.approx(alone_loss, rel=1e-4)


# ---- perplexity statistics -------------------------------------------------------------------------


def test_perplexity_cis_match_a_hand_computed_case():
    """Two documents: NLL 2 over 1 token and 4 over 3. A bootstrap resample holds doc 0 twice (per-token
    NLL 2/1), doc 1 twice (4/3) or one of each (6/4), with chances 1/4, 1/4, 1/2; so the 2.5th and
    97.5th percentiles of 1000 resamples are 4/3 and 2, and the CI is [e^(4/3), e^2] around e^1.5."""
    base, tuned, tokens = np.array([2.0, 4.0]), np.array([1.0, 4.0]), np.array([1.0, 3.0])
    r = perplexity_report(base, tuned, tokens)
    b = r["contenders"]["base"]
    assert b["perplexity"] == pytest.approx(math.exp(1.5))
    assert (b["perplexity_ci_low"], b["perplexity_ci_high"]) == pytest.approx((math.exp(4 / 3), math.exp(2)))
    p = r["paired"]  # differences -1 and 0: per token -1/4; resamples -1/2, 0/6 or -1/4
    assert p["perplexity_ratio"] == pytest.approx(math.exp(-0.25))
    assert (p["ratio_ci_low"], p["ratio_ci_high"]) == pytest.approx((math.exp(-1), 1.0))
    assert p["p_value"] == 1.0 and not p["significant"]  # every sign flip gives the same |mean|


def test_a_consistent_improvement_is_significant():
    rng = np.random.default_rng(0)
    tokens = rng.integers(20, 60, size=30).astype(float)
    base = tokens * 3.0
    tuned = base - tokens * rng.uniform(0.1, 0.3, size=30)
    p = perplexity_report(base, tuned, tokens)["paired"]
    assert p["significant"] and p["p_value"] < 0.01 and p["ratio_ci_high"] < 1


# ---- the task end to end ----------------------------------------------------------------------------


def _sql(i: int) -> dict:
    return {
        "text": f"table: t{i}\ncolumns: id, name, city\nQ: who lives in city {i}?\nA: SELECT name FROM t{i} WHERE city = {i}"
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A tiny domain corpus of SQL-ish documents: train (one long enough to be cut into chunks at 48
    tokens), validation and test files."""
    d = tmp_path_factory.mktemp("corpus")
    long = {"text": " ".join(f"SELECT name FROM t{i} WHERE city = {i};" for i in range(30))}
    return {
        "train": write(d, "train.jsonl", jsonl(*[_sql(i) for i in range(30)], long)),
        "validation": write(d, "valid.jsonl", jsonl(*[_sql(i) for i in range(30, 34)])),
        "test": write(d, "test.jsonl", jsonl(*[_sql(i) for i in range(40, 49)])),
    }


def _config(tiny_model_dir, data: dict[str, Path], out: Path, method: str, task: str = "pretrain", **train):
    t = {"epochs": 4, "learning_rate": 3e-3 if method == "full" else 1e-2, "batch_size": 4,
         "max_length": 48, "seed": 0, "eval_every": 10} | train  # fmt: skip
    return config_from_dict(
        {
            "model": str(tiny_model_dir),
            "method": method,
            "task": task,
            "data": {k: str(v) for k, v in data.items()} | {"format": "text"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "train": t,
            "eval": {"batch_size": 8},
            "output_dir": str(out),
        }
    )


@pytest.mark.parametrize("method", ["full", "lora"])
def test_full_and_lora_train_the_loss_falls_and_perplexity_drops(tiny_model_dir, corpus, tmp_path, method):
    run = train(_config(tiny_model_dir, corpus, tmp_path / method, method), quiet=True)
    losses = list(_losses(run).values())
    assert len(losses) >= 8 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    summary = json.loads((run / "train_summary.json").read_text())
    packing = summary["packing"]["train"]
    assert packing["chunks"] > packing["documents"]  # the long document was cut, not dropped
    assert summary["train_examples"] == packing["documents"]

    report = evaluate(run, quiet=True)
    assert report["task_metric"] == "perplexity" and report["n_test"] == 9
    c, p = report["contenders"], report["paired"]
    assert c["finetuned"]["perplexity"] < c["base"]["perplexity"]
    assert c["base"]["perplexity_ci_low"] <= c["base"]["perplexity"] <= c["base"]["perplexity_ci_high"]
    assert p["perplexity_ratio"] < 1 and p["ratio_ci_high"] < 1 and p["significant"]
    assert "perplexity" in (run / "report.md").read_text()
    rows = json.loads((run / "document_nll.json").read_text())
    assert sum(r["tokens"] for r in rows) == report["tokens"]


def test_sft_on_text_rows_and_pretrain_on_conversations_are_clear_errors(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(DataError, match="task: pretrain"):
        train(_config(tiny_model_dir, corpus, tmp_path / "sft", "lora", task="sft"), quiet=True)
    chat = write(
        tmp_path, "chat.jsonl", jsonl(*[{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)])
    )
    cfg = _config(tiny_model_dir, {"train": chat}, tmp_path / "pt", "lora").model_copy(deep=True)
    cfg.data.format = "auto"
    with pytest.raises(DataError, match="raw text"):
        train(cfg, quiet=True)


def test_data_check_keeps_documents_for_pretrain_and_does_not_call_them_too_long(tiny_model_dir, corpus):
    report = check_data([corpus["train"]], model=str(tiny_model_dir), max_length=48, kind="documents")
    assert (report.kept, report.rejected) == (31, 0)
    assert not [w for w in report.warnings if w.kind == "too_long"]
    assert max(report.token_lengths) > 48 and report.stats["total_tokens"] == sum(report.token_lengths)
    other = check_data([corpus["train"]])  # another task's data check: text rows are refused, with the fix
    assert other.rejected == 31 and "task: pretrain" in other.errors[0].message


def test_the_example_config_trains_and_evaluates(tiny_model_dir, tmp_path, monkeypatch):
    """examples/pretrain_wikisql.yaml as shipped, on the tiny model and two steps."""
    shared("mlx-wikisql/train.jsonl")
    monkeypatch.chdir(ROOT)
    sets = [
        f"model={tiny_model_dir}",
        "train.max_steps=2",
        "eval.max_examples=8",
        f"output_dir={tmp_path / 'run'}",
    ]
    cfg = load_config(ROOT / "examples" / "pretrain_wikisql.yaml", sets)
    assert cfg.task == "pretrain" and cfg.data.format == "text"
    run = train(cfg, quiet=True)
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 2
    report = evaluate(run, quiet=True)
    assert report["n_test"] == 8 and set(report["contenders"]) == {"base", "finetuned"}


def test_a_stopped_run_resumes_with_the_losses_of_one_that_went_straight_through(
    tiny_model_dir, corpus, tmp_path, monkeypatch
):
    import tunekit.train.loop as loop

    def cfg(out):
        return _config(tiny_model_dir, corpus, out, "lora", max_steps=4, save_steps=2, eval_every=2)

    straight = _losses(train(cfg(tmp_path / "straight"), quiet=True))
    signal_on_call(monkeypatch, loop, "_grad_norm", 3)
    with pytest.raises(Interrupted):
        train(cfg(tmp_path / "stopped"), quiet=True)
    monkeypatch.undo()
    resumed = _losses(train(cfg(tmp_path / "stopped"), quiet=True, resume=True))
    assert sorted(resumed) == sorted(straight) == [1, 2, 3, 4]
    assert resumed[4] == pytest.approx(straight[4], rel=1e-5)


def test_a_pretrained_model_exports_merges_serves_and_chats(
    tiny_model_dir, tokenizer, corpus, tmp_path, monkeypatch
):
    import tunekit.train.recipes.pretrain as recipe
    from test_export_policies import _base_logits, _catch_saved_policy, _check_policy_ships

    caught = _catch_saved_policy(monkeypatch, recipe)
    cfg = _config(
        tiny_model_dir, corpus, tmp_path / "run", "lora", max_steps=2, learning_rate=5e-2, warmup_ratio=0.0
    )
    run = train(cfg, quiet=True)
    _check_policy_ships(run, caught["logits"], tmp_path, [_base_logits(tiny_model_dir, tokenizer)])


def test_the_estimate_profiles_the_packed_rows(tiny_model_dir, tokenizer, corpus, tmp_path):
    """`tunekit estimate` sizes a pretrain run by the rows it trains on (full max_length rows), not by
    its documents."""
    from tunekit.data import load_examples
    from tunekit.estimate.training import data_profile

    profile = data_profile(_config(tiny_model_dir, corpus, tmp_path / "run", "lora"))
    texts = [ex.target for ex in load_examples(corpus["train"], format="text")]
    rows, stats = pack_documents(tokenizer, texts, 48)
    assert (profile["examples"], profile["max_tokens"]) == (stats.rows, 48)
    assert profile["target_fraction"] == pytest.approx(stats.targets / sum(len(r.input_ids) for r in rows))


def test_a_model_whose_mask_ignores_the_position_ids_stops_the_run_before_training(
    tiny_model_dir, tokenizer, monkeypatch
):
    """check_packing runs the run's own model on two packed documents: where the mask does not follow
    the restarting position ids (here transformers' packed-row detection switched off), it refuses."""
    import transformers.masking_utils as masking

    from tunekit.errors import TunekitError
    from tunekit.train.recipes.pretrain import check_packing

    model = load_model(tiny_model_dir).train()
    check_packing(model, tokenizer.pad_token_id)  # the real mask: no error
    assert model.training  # left as it was
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TunekitError, match="attends across the documents"):
        check_packing(model, tokenizer.pad_token_id)
    assert enable_padding_free(model)  # the segment kernel does not depend on that mask
    check_packing(model, tokenizer.pad_token_id)
