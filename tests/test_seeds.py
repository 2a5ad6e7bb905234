"""Seed variance: `tunekit train --seeds K`, the spread across seeds, and comparisons weighed
against training noise; the statistics against hand-computed cases."""

import json
import math

import pytest

from tunekit.config import config_from_dict
from tunekit.errors import ConfigError, TunekitError
from tunekit.eval.compare import compare_runs, noise_conclusion
from tunekit.eval.stats import between_seeds, spread, t_critical, t_sf2
from tunekit.train.seeds import group_runs, seed_configs, write_group

# -- statistics, by hand -------------------------------------------------------------------------


def test_spread_by_hand():
    s = spread([0.70, 0.72, 0.74])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.72) and (s["min"], s["max"]) == (0.70, 0.74)
    assert s["std"] == pytest.approx(0.02)  # sqrt((0.02^2 + 0 + 0.02^2) / 2)
    assert spread([0.5])["std"] == 0.0


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [
        (12.706, 1, 0.05),  # the two-sided 5% points of a t table
        (4.303, 2, 0.05),
        (2.776, 4, 0.05),
        (2.228, 10, 0.05),
        (1.0, 1, 0.5),  # Cauchy: P(|T| >= 1) = 1 - 2 atan(1) / (pi / 2) / 2 = 0.5
        (1.0, 3, 0.391002218955771),  # 1 - 2/pi (pi/4 + 1/2 sqrt(3)/2 ... ): A&S 26.7.4
        (3.4641016, 2, 1 - 3.4641016 / math.sqrt(2 + 12)),  # df 2: p = 1 - t / sqrt(2 + t^2)
        (0.0, 5, 1.0),
    ],
)
def test_t_two_sided_p_by_hand(t, df, p):
    assert t_sf2(t, df) == pytest.approx(p, abs=2e-4)
    assert t_sf2(-t, df) == t_sf2(t, df)


def test_t_critical_inverts_the_table():
    assert t_critical(4) == pytest.approx(2.7764, abs=1e-4)
    assert t_critical(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_critical(10, level=0.99) == pytest.approx(3.1693, abs=1e-4)
    with pytest.raises(ValueError):
        t_sf2(1.0, 0)


def test_between_seeds_by_hand():
    # means 0.72 and 0.82, each side's std 0.02: pooled std 0.02, se 0.02 sqrt(2/3) = 0.016330
    r = between_seeds([0.70, 0.72, 0.74], [0.80, 0.82, 0.84])
    se = 0.02 * math.sqrt(2 / 3)
    assert r["df"] == 4 and r["pooled_std"] == pytest.approx(0.02) and r["difference"] == pytest.approx(0.1)
    # t = 0.1 / 0.016330 = 6.1237; df 4: p = 1 - sin(theta) (1 + cos^2(theta) / 2), tan(theta) = t / 2
    theta = math.atan(0.1 / se / 2)
    assert r["p_value"] == pytest.approx(1 - math.sin(theta) * (1 + math.cos(theta) ** 2 / 2))
    assert r["p_value"] == pytest.approx(0.0036, abs=1e-4) and r["significant"]
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.1 - 2.7764 * se, 0.1 + 2.7764 * se), abs=1e-4)
    # one run on side b: the group's spread is the noise; df = 3 + 1 - 2 = 2
    one = between_seeds([0.70, 0.72, 0.74], [0.80])
    t = 0.08 / (0.02 * math.sqrt(1 / 3 + 1))
    assert one["df"] == 2 and one["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert not one["significant"]  # p = 0.074
    # no seeds on either side: no noise measured
    assert between_seeds([0.7], [0.8]) is None
    # no spread at all: a difference is beyond noise
    assert between_seeds([0.5, 0.5], [0.6, 0.6])["p_value"] == 0.0


def test_noise_conclusion_says_whether_a_win_exceeds_training_noise():
    paired = {"metric": "exact_match", "difference": 0.1, "p_value": 0.01, "significant": True}
    noisy = {"pooled_std": 0.2, "p_value": 0.44, "ci_low": -0.2, "ci_high": 0.4, "significant": False}
    quiet = noisy | {"pooled_std": 0.01, "p_value": 0.001, "significant": True}
    assert noise_conclusion(paired, noisy).startswith("not a real difference: +0.100 exact_match")
    assert "within training noise (between-seed std 0.200" in noise_conclusion(paired, noisy)
    assert noise_conclusion(paired, quiet).startswith("B is better: +0.100")
    assert "--seeds" in noise_conclusion(paired, None)
    unsure = paired | {"p_value": 0.3, "significant": False}
    assert noise_conclusion(unsure, noisy).startswith("no significant difference")
    assert noise_conclusion(unsure, quiet).startswith("not confirmed")


# -- the group and --compare on hand-written evaluated runs ---------------------------------------


def _evaluated_run(path, n_correct: int, n: int = 20):
    """A run folder as `tunekit eval` leaves it: the first n_correct of n examples right."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("{}\n")  # group_runs checks the run is there
    rows = [
        {"prompt": f"q{i}", "reference": f"a{i}", "finetuned": f"a{i}" if i < n_correct else "x",
         "finetuned_correct": i < n_correct}
        for i in range(n)
    ]  # fmt: skip
    report = {"task_metric": "exact_match", "contenders": {"finetuned": {"exact_match": n_correct / n}}}
    (path / "report.json").write_text(json.dumps(report))
    (path / "predictions.json").write_text(json.dumps(rows))
    return path


def _group(tmp_path, name: str, corrects: list[int]):
    seeds = list(range(len(corrects)))
    runs = [_evaluated_run(tmp_path / f"{name}-seed{s}", c) for s, c in zip(seeds, corrects, strict=True)]
    return write_group(tmp_path / name, seeds, runs)


def test_compare_groups_weighs_the_difference_against_seed_noise(tmp_path):
    a = _group(tmp_path, "a", [10, 14, 18])  # 0.5, 0.7, 0.9: a noisy config
    b = _group(tmp_path, "b", [15, 16, 17])  # 0.75, 0.8, 0.85
    assert [s for s, _ in group_runs(a)] == [0, 1, 2]
    r = compare_runs(a, b)
    assert r["seeds_a"] == [0, 1, 2] and r["shared_examples"] == 20
    assert r["metrics"]["exact_match"] == pytest.approx({"a": 0.7, "b": 0.8, "difference": 0.1})
    # pooled std sqrt((0.08 + 0.005) / 4); t = 0.1 / (that x sqrt(2/3)); df 4
    noise = r["training_noise"]
    pooled = math.sqrt((0.2**2 * 2 + 0.05**2 * 2) / 4)
    assert noise["pooled_std"] == pytest.approx(pooled) and noise["df"] == 4
    assert noise["p_value"] == pytest.approx(t_sf2(0.1 / (pooled * math.sqrt(2 / 3)), 4))
    assert not noise["significant"] and "within training noise" in r["conclusion"]
    # the paired test pairs each example's seed-averaged score: not binary, so permutation
    assert r["paired"]["test"] == "paired_permutation" and r["paired"]["difference"] == pytest.approx(0.1)
    # first seeds (10 right vs 15 right): 5 fixed
    assert len(r["fixed"]) == 5 and not r["broken"]


def test_compare_single_runs_says_noise_is_unmeasured(tmp_path):
    a, b = _evaluated_run(tmp_path / "a", 10), _evaluated_run(tmp_path / "b", 15)
    r = compare_runs(a, b)
    assert r["training_noise"] is None and r["seeds_a"] == [] and "--seeds" in r["conclusion"]
    assert r["paired"]["test"] == "mcnemar_exact" and r["paired"]["p_value"] == pytest.approx(2 / 2**5)


def test_a_group_with_a_missing_run_is_an_error(tmp_path):
    g = _group(tmp_path, "g", [10, 12])
    (tmp_path / "g-seed1" / "config.yaml").unlink()
    with pytest.raises(TunekitError, match="g-seed1 is missing"):
        group_runs(g)
    (g / "seeds.json").write_text("{")
    with pytest.raises(TunekitError, match="not a readable seed group"):
        group_runs(g)


def test_seed_configs_change_only_the_seed_and_the_folder(tmp_path):
    cfg = config_from_dict({"data": {"train": "x.jsonl"}, "output_dir": str(tmp_path / "out")})
    cfgs = seed_configs(cfg, 3)
    assert [c.train.seed for c in cfgs] == [42, 43, 44]
    assert [c.output_dir.name for c in cfgs] == ["out-seed42", "out-seed43", "out-seed44"]
    for c in cfgs:
        assert c.data == cfg.data and c.train.model_copy(update={"seed": 42}) == cfg.train
    with pytest.raises(ConfigError, match="--seeds 1"):
        seed_configs(cfg, 1)
    big = config_from_dict({"data": {"train": "x.jsonl"}, "train": {"seed": 2**32 - 2}})
    with pytest.raises(ConfigError, match="train.seed"):
        seed_configs(big, 3)


# -- the whole path on a tiny model -----------------------------------------------------------------


def test_train_seeds_eval_the_group_and_compare(tiny_model_dir, chat_file, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tunekit.cli import app

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model_dir),
                "data": {"train": str(chat_file)},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "train": {
                    "max_steps": 6,
                    "learning_rate": 1e-2,
                    "batch_size": 4,
                    "max_length": 64,
                    "seed": 0,
                },
                "eval": {"max_new_tokens": 6, "few_shot": 2, "probe": None, "price_per_1k_tokens": 0.001},
                "output_dir": str(tmp_path / "out"),
            }
        )
    )
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(config), "--seeds", "2"])
    assert r.exit_code == 0, r.output
    group = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert group["seeds"] == [0, 1] and group["runs"] == ["out-seed0", "out-seed1"]
    assert group["spread"]["steps"]["mean"] == 6 and group["spread"]["final_train_loss"]["n"] == 2
    splits = [(tmp_path / f"out-seed{s}" / "data" / "test.jsonl").read_text() for s in (0, 1)]
    assert splits[0] == splits[1]  # the same test examples: data.split_seed is not the seed that varies

    r = runner.invoke(app, ["eval", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "out" / "seeds_report.json").read_text())
    base, ft = summary["contenders"]["base"], summary["contenders"]["finetuned"]
    # the base (adapter off) is the same model on the same examples in both runs: no spread
    assert base["test_loss"]["std"] == pytest.approx(0.0, abs=1e-6)
    # the adapters differ by seed: so do their test losses
    assert ft["test_loss"]["std"] > 0 and len(ft["test_loss"]["per_seed"]) == 2
    assert set(summary["verdicts"]) == {"0", "1"} and "across 2 seeds" in summary["noise"]
    assert "| finetuned | exact_match |" in (tmp_path / "out" / "seeds_report.md").read_text()
    # every run has its own report, with its verdict priced per token
    report = json.loads((tmp_path / "out-seed0" / "report.json").read_text())
    v = report["verdict"]
    assert v["pricing"]["per"] == "1k_tokens" and v["training"]["seconds"] > 0
    assert v["contenders"]["base_few_shot"]["prompt_tokens"] > v["contenders"]["finetuned"]["prompt_tokens"]
    assert v["choice"] in ("fine-tune", "keep prompting", "inconclusive")
    assert "## Verdict" in (tmp_path / "out-seed0" / "report.md").read_text()
    assert "id='verdict'" in (tmp_path / "out-seed0" / "report.html").read_text()

    # a group against one of its own runs: a df-1 test against the group's spread
    r = runner.invoke(app, ["eval", "--compare", str(tmp_path / "out"), str(tmp_path / "out-seed1")])
    assert r.exit_code == 0, r.output
    assert "2 seeds" in r.output and "training noise" in r.output.replace("\n", " ")


def test_cli_seeds_refuses_one_seed_and_several_processes(tmp_path):
    from typer.testing import CliRunner

    from tunekit.cli import app

    config = tmp_path / "cfg.yaml"
    config.write_text(f"data: {{train: {tmp_path / 'x.jsonl'}}}\noutput_dir: {tmp_path / 'out'}\n")
    r = CliRunner().invoke(app, ["train", str(config), "--seeds", "0"])
    assert isinstance(r.exception, ConfigError) and "--seeds 0: give 2 or more" in str(r.exception)
    r = CliRunner().invoke(app, ["train", str(config), "--seeds", "2", "--nproc", "2"])
    assert isinstance(r.exception, TunekitError) and "drop --nproc" in str(r.exception)
    assert not (tmp_path / "out").exists()
