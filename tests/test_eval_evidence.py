"""Evaluation evidence: confidence intervals, paired tests, metrics, three contenders, early stopping,
failure triage and run-to-run comparison (tiny model: fast)."""

import json

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError
from tunekit.eval.evaluate import evaluate_generation, with_shots
from tunekit.eval.failures import analyze_failures, error_type
from tunekit.eval.metrics import (
    bleu,
    confusion_matrix,
    default_metrics,
    field_accuracy,
    json_valid,
    metrics_to_score,
    numeric_match,
    rouge_l,
    score_metrics,
)
from tunekit.eval.stats import mcnemar_exact, mean_ci, paired_difference, ratio_ci, sign_flip_p
from tunekit.train.session import train

# ---------------------------------------------------------------------------------------------
# Statistics


def test_mean_ci_brackets_the_mean_and_narrows_with_n():
    v, lo, hi = mean_ci([1, 0] * 20)
    assert v == 0.5 and lo < 0.5 < hi
    _, lo2, hi2 = mean_ci([1, 0] * 500)
    assert hi2 - lo2 < (hi - lo) / 3  # 25x the data: about 1/5 the width
    assert mean_ci([1, 1, 1]) == (1.0, 1.0, 1.0)


def test_mcnemar_exact_by_hand():
    # 8 discordant pairs, all favouring b: p = 2 * (1/2)^8
    a, b = [0] * 8 + [1] * 5, [1] * 8 + [1] * 5
    assert mcnemar_exact(a, b) == pytest.approx(2 / 256)
    assert mcnemar_exact([1, 0], [0, 1]) == 1.0  # one each way: no evidence
    assert mcnemar_exact([1, 1], [1, 1]) == 1.0


def test_paired_difference_picks_the_test_and_finds_a_real_gain():
    d = paired_difference([0] * 30, [1] * 20 + [0] * 10)
    assert d["test"] == "mcnemar_exact" and d["significant"] and d["difference"] == pytest.approx(20 / 30)
    assert d["ci_low"] > 0
    cont = paired_difference([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4])
    assert cont["test"] == "paired_permutation" and cont["p_value"] == 1.0 and not cont["significant"]


def test_sign_flip_p_is_small_for_consistent_differences_only():
    assert sign_flip_p([0.5] * 20) < 0.01
    assert sign_flip_p([0.5, -0.5] * 10) > 0.5


def test_ratio_ci_is_a_token_weighted_mean():
    v, lo, hi = ratio_ci([10.0, 30.0], [10, 10])
    assert v == pytest.approx(2.0) and 1.0 <= lo <= v <= hi <= 3.0


# ---------------------------------------------------------------------------------------------
# Metrics


def test_numeric_match_reads_gsm8k_answers():
    refs = ["She pays 5*3=15.\n#### 15", "#### 1,200"]
    assert numeric_match(["so the answer is #### 15", "The total is 1200 dollars."], refs) == [1.0, 1.0]
    assert numeric_match(["#### 16", "no idea"], refs) == [0.0, 0.0]


def test_json_metrics():
    ref = '{"intent": "billing.refund", "priority": "P2"}'
    preds = ['{"intent": "billing.refund", "priority": "P1"}', "not json", '```json\n{"intent": "x"}\n```']
    assert json_valid(preds, [ref] * 3) == [1.0, 0.0, 1.0]
    assert field_accuracy(preds, [ref] * 3) == [0.5, 0.0, 0.0]


def test_rouge_and_bleu_come_from_the_reference_implementations():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == [pytest.approx(1.0)]
    assert 0 < rouge_l(["a cat sat"], ["the cat sat on the mat"])[0] < 1
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_default_metrics_follow_the_references():
    assert default_metrics(['{"a": 1}'], False)[0] == "exact_match"
    assert "field_accuracy" in default_metrics(['{"a": 1}'], False)
    assert default_metrics(["x\n#### 4"], False)[0] == "numeric_match"
    assert default_metrics(["spam"], True) == ["accuracy", "macro_f1"]
    long = ["a long free text answer with many words in it, more than eight of them"]
    assert default_metrics(long, False)[0] == "rouge_l"


def test_score_metrics_gives_ci_for_example_and_corpus_metrics():
    preds, refs = ["a", "b", "a", "c"] * 5, ["a", "b", "b", "c"] * 5
    values, per = score_metrics(["accuracy", "macro_f1"], preds, refs)
    assert values["accuracy"] == 0.75 and values["accuracy_ci_low"] < 0.75 < values["accuracy_ci_high"]
    assert values["macro_f1_ci_low"] <= values["macro_f1"] <= values["macro_f1_ci_high"]
    assert set(per) == {"accuracy"}  # macro-F1 has no per-example score


def test_user_metric_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "def starts_right(preds, refs):\n    return [float(p[:1] == r[:1]) for p, r in zip(preds, refs)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    values, per = score_metrics(["my_metrics:starts_right"], ["ab", "xy"], ["aa", "bb"])
    assert values["starts_right"] == 0.5 and per["starts_right"] == [1.0, 0.0]
    with pytest.raises(ConfigError, match="eval.metrics: unknown metric 'exact'"):
        score_metrics(["exact"], ["a"], ["a"])
    with pytest.raises(ConfigError, match="cannot import 'nope_mod:f'"):
        score_metrics(["nope_mod:f"], ["a"], ["a"])


def test_metrics_to_score_takes_custom_metrics_only_from_the_user():
    assert metrics_to_score(None, None, "r/config.yaml") is None
    assert metrics_to_score(["exact_match", "bleu"], None, "r/config.yaml") == ["exact_match", "bleu"]
    assert metrics_to_score(["m:f"], ["accuracy", "m:f"], "r/config.yaml") == ["accuracy", "m:f"]
    with pytest.raises(
        ConfigError, match=r"(?s)r/config.yaml.*'m:f'.*tunekit eval r --metric bleu --metric m:f"
    ):
        metrics_to_score(["bleu", "m:f"], None, "r/config.yaml")


def _run_naming_a_module(tiny_model_dir, chat_file, folder):
    """A run directory (config.yaml only) whose eval.metrics names `evil_metric:fn`; importing
    evil_metric.py (beside it, on the path) leaves a file `imported`."""
    from tunekit.config import config_to_yaml

    (folder / "evil_metric.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').touch()\n"
        "def fn(preds, refs):\n    return [0.5] * len(preds)\n"
    )
    run = folder / "run"
    run.mkdir()
    raw = {"model": str(tiny_model_dir), "data": {"train": str(chat_file)}, "output_dir": str(run)}
    cfg = config_from_dict(raw | {"eval": {"metrics": ["exact_match", "evil_metric:fn"]}})
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    return run


def test_a_run_config_cannot_make_eval_import_a_module(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    import sys

    from tunekit.eval.evaluate import evaluate

    run = _run_naming_a_module(tiny_model_dir, chat_file, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="--metric exact_match --metric evil_metric:fn"):
        evaluate(run, quiet=True)
    assert not (tmp_path / "imported").exists() and "evil_metric" not in sys.modules


def test_cli_eval_refuses_a_run_configs_module_without_a_traceback(tiny_model_dir, chat_file, tmp_path):
    """`python -m tunekit` puts the working folder on sys.path: a run shipped with its own module."""
    import subprocess
    import sys

    _run_naming_a_module(tiny_model_dir, chat_file, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "tunekit", "eval", "run"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "tunekit eval run --metric exact_match --metric evil_metric:fn" in " ".join(r.stderr.split())
    assert not (tmp_path / "imported").exists()


def test_confusion_matrix_counts_rows_by_reference():
    cm = confusion_matrix(["x", "y", "x", "zzz"], ["x", "x", "y", "y"])
    assert cm["labels"] == ["x", "y"] and cm["columns"] == ["x", "y", "(other)"]
    assert cm["matrix"] == [[1, 1, 0], [1, 0, 1]]


# ---------------------------------------------------------------------------------------------
# Failure triage


def test_failures_grouped_by_error_type_and_field():
    ref = '{"intent": "billing", "priority": "P1"}'
    assert error_type("", ref) == "empty reply"
    assert error_type("nope", ref) == "invalid JSON"
    assert error_type('{"intent": "billing", "priority": "P2"}', ref) == "wrong field: priority"
    assert error_type("cat", "dog", {"dog", "cat"}) == "wrong label"
    assert error_type("bird", "dog", {"dog", "cat"}) == "not a label"
    rows = [
        {
            "source": f"t:{i}",
            "prompt": "p",
            "reference": ref,
            "finetuned": got,
            "finetuned_correct": got == ref,
        }
        for i, got in enumerate([ref, '{"intent": "billing", "priority": "P2"}', "broken", ref])
    ]
    from collections import Counter

    fa = analyze_failures(rows, None, Counter({"priority=P1": 3}))
    assert fa["n_failures"] == 2
    assert {t["error_type"] for t in fa["by_error_type"]} == {"wrong field: priority", "invalid JSON"}
    assert fa["top_confusions"][0]["confusion"].startswith("priority: P1 -> P2")
    weak = {g["group"]: g for g in fa["weak_groups"]}
    assert weak["priority=P1"]["accuracy"] == 0.5 and weak["priority=P1"]["train_examples"] == 3
    assert fa["guessed_fields"] == []  # 4 examples are too few to call anything a guess


def test_a_field_the_model_always_answers_alike_is_reported_as_a_guess():
    """The plateau a small model sits on before it reads a field's cue: one value for every ticket."""
    from collections import Counter

    prios = ["P1", "P2", "P3", "P2"] * 5  # the most common right value: 50%
    rows = []
    for i, p in enumerate(prios):
        ref = json.dumps({"intent": f"i{i % 4}", "priority": p})
        got = json.dumps({"intent": f"i{i % 4}", "priority": "P2"})
        rows.append({"source": f"t:{i}", "prompt": "p", "reference": ref, "finetuned": got,
                     "finetuned_correct": ref == got})  # fmt: skip
    fa = analyze_failures(rows, None, Counter())
    (g,) = fa["guessed_fields"]  # the intents are read from the input: no guess
    assert (g["field"], g["value"], g["share"], g["reference_share"]) == ("priority", "P2", 1.0, 0.5)
    assert "answers P2 for 100% of the test set" in g["advice"] and "more than 50%" in g["advice"]


# ---------------------------------------------------------------------------------------------
# Three contenders on a tiny model


def test_with_shots_puts_train_turns_before_the_question():
    from tunekit.data import Example, Message

    ex = Example((Message("system", "S"), Message("user", "q"), Message("assistant", "a")))
    shot = Example((Message("user", "q1"), Message("assistant", "a1")))
    got = with_shots(ex, [shot])
    assert [m.content for m in got.messages] == ["S", "q1", "a1", "q", "a"]
    assert got.target == "a"


@pytest.fixture
def tiny_cfg(tiny_model_dir, chat_file, tmp_path):
    def make(name: str, **train):
        return config_from_dict(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(chat_file)},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": {"epochs": 15, "learning_rate": 1e-2, "batch_size": 4, "max_length": 64, "seed": 0}
                | train,
                "eval": {"max_new_tokens": 6, "few_shot": 2, "probe": None},
                "output_dir": str(tmp_path / name),
            }
        )

    return make


def test_three_contenders_with_intervals_and_paired_tests(tiny_cfg):
    run = train(tiny_cfg("run"), quiet=True)
    report = evaluate_generation(run, quiet=True)
    c = report["contenders"]
    assert list(c) == ["base", "base_few_shot", "finetuned"]
    for name, m in c.items():
        for k in ("exact_match", "test_loss", "perplexity"):
            assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], (name, k)
        assert m["prompt_tokens_per_example"] > 0 and m["latency_s_per_example"] > 0
    # the few-shot prompt carries two training examples: clearly longer prompts
    assert c["base_few_shot"]["prompt_tokens_per_example"] > 1.5 * c["base"]["prompt_tokens_per_example"]
    assert report["few_shot"]["k"] == 2
    assert set(report["comparisons"]) == {
        "finetuned_vs_base",
        "finetuned_vs_base_few_shot",
        "base_few_shot_vs_base",
    }
    assert c["finetuned"]["test_loss"] < c["base"]["test_loss"] - 1.0
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["contenders"] == json.loads(json.dumps(c))
    assert "failure_analysis" in on_disk and on_disk["training"]["train_loss"]
    assert (run / "report.html").is_file() and "Paired differences" in (run / "report.md").read_text()
    # --few-shot 0 leaves the contender out
    assert "base_few_shot" not in evaluate_generation(run, quiet=True, few_shot=0)["contenders"]


def test_a_custom_metric_named_by_the_user_is_scored(tiny_cfg, tmp_path, monkeypatch):
    """`tunekit eval RUN --metric ...` (here through `evaluate`, the task table's route) replaces
    eval.metrics; the first is the task metric, and a `module:function` is imported and scored."""
    from tunekit.eval.evaluate import evaluate

    (tmp_path / "half_metric.py").write_text("def half(preds, refs):\n    return [0.5] * len(preds)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = train(tiny_cfg("run", epochs=1), quiet=True)
    report = evaluate(run, quiet=True, few_shot=0, metrics=["half_metric:half", "exact_match"])
    assert report["task_metric"] == "half" and report["metrics"] == ["half", "exact_match"]
    assert report["contenders"]["finetuned"]["half"] == 0.5


def test_early_stopping_keeps_the_best_weights(tiny_cfg):
    # lr 0.3 with no warmup or clipping diverges after a few steps: validation loss goes up, the run
    # stops, and the saved adapter is the one of the best validation step.
    cfg = tiny_cfg(
        "es",
        epochs=30,
        learning_rate=0.3,
        eval_every=1,
        early_stopping_patience=2,
        max_grad_norm=None,
        warmup_ratio=0.0,
        lr_scheduler="constant",
    )
    run = train(cfg, quiet=True)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["stopped_early"] is True
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    best = min(vals, key=vals.get)
    assert summary["best_step"] == best and summary["steps"] == best + 2 < 30 * 5
    # the saved weights reproduce the best validation loss, not the last one
    from tunekit.runs.directory import read_split
    from tunekit.train.recipes.sft import evaluate_loss
    from tunekit.train.setup import load_trained
    from tunekit.train.tokens import tokenize_all

    model, tok, _ = load_trained(run)
    val = tokenize_all(tok, read_split(run, "validation"), 64, "validation")
    assert evaluate_loss(model, val, tok.pad_token_id) == pytest.approx(vals[best], rel=1e-4)


def test_overfitting_warning_from_curves():
    from tunekit.eval.report import overfitting_warning

    train = [(s, 2.0 - 0.1 * s) for s in range(1, 11)]
    assert "overfitting" in overfitting_warning(train, [(2, 1.0), (5, 0.8), (10, 1.2)])
    assert overfitting_warning(train, [(2, 1.0), (5, 0.8), (10, 0.7)]) is None


def test_train_from_an_earlier_run_and_compare(tiny_cfg, tmp_path):
    from tunekit.eval.compare import compare_runs

    first = train(tiny_cfg("a", epochs=1), quiet=True)
    evaluate_generation(first, quiet=True, few_shot=0)
    second = train(tiny_cfg("b", epochs=15, init_from=str(first)), quiet=True)
    evaluate_generation(second, quiet=True, few_shot=0)
    # started from the first run's adapter: the first step's loss is the first run's last level, not the base's
    first_loss = json.loads((first / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    second_loss = json.loads((second / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert second_loss < first_loss
    result = compare_runs(first, second)
    assert result["shared_examples"] > 0
    assert len(result["fixed"]) - len(result["broken"]) == pytest.approx(
        result["paired"]["difference"] * result["shared_examples"]
    )
    assert result["metrics"]["exact_match"]["difference"] == pytest.approx(result["paired"]["difference"])
