"""The `tunekit` command line: thin wrappers over the library functions.

Run as: `tunekit --help`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tunekit.console import err
from tunekit.data.formats import FORMATS  # light: no torch (the help lists the format names)
from tunekit.errors import TunekitError

FORMAT_HELP = f"auto (detect it) or one of: {', '.join(FORMATS)}."

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fine-tune language models on your own data."
)
data_app = typer.Typer(no_args_is_help=True, help="Data sets: check, split and augment.")
app.add_typer(data_app, name="data")


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.max_steps=5")
    ] = None,
    allow_data_errors: Annotated[
        bool, typer.Option(help="Train on the rows that read; leave out (and report) rows with errors.")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from the newest checkpoint in the config's output_dir (it must come from the "
            "same config; the keys that differ are named)."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Start over in an output_dir that holds an earlier run: its checkpoints and outputs are "
            "removed first (without --resume or this, such a folder is refused)."
        ),
    ] = False,
    skip_damaged: Annotated[
        bool,
        typer.Option(
            help="With --resume: a checkpoint that fails its checksums is moved aside (damaged-step-N) "
            "and the newest intact one before it is resumed."
        ),
    ] = False,
    from_: Annotated[
        Path | None, typer.Option("--from", help="Start from the weights of an earlier run (new data).")
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option(
            help="Fit the training loop into this time: 90s, 60m, 2h, 1h30m or seconds (train.time_budget)."
        ),
    ] = None,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (data parallel, via torchrun).")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines taking part.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index, 0 .. nnodes-1.")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of the node with rank 0.")] = "127.0.0.1",
    master_port: Annotated[int | None, typer.Option(help="Free port on that node.")] = None,
    seeds: Annotated[
        int,
        typer.Option(
            help="Train this many runs differing only in train.seed (seed, seed+1, ...) into OUT-seedN beside "
            "output_dir OUT, with the group in OUT/seeds.json; `tunekit eval OUT` reports the spread."
        ),
    ] = 1,
) -> None:
    """Fine-tune a model as CONFIG says; writes the run directory. The data is checked first."""
    from tunekit.config import load_config
    from tunekit.train import distributed
    from tunekit.train.session import train as train_task

    overrides = (set_ or []) + ([f"train.init_from={from_}"] if from_ is not None else [])
    # Quoted: '' or '90' reach the config as text, so an empty budget is an error, not "no budget".
    overrides += [f"train.time_budget={json.dumps(time_budget)}"] if time_budget is not None else []
    cfg = load_config(config, overrides)  # a bad config fails here, once, before any worker starts
    if seeds != 1:
        from tunekit.train.seeds import train_seeds

        if nproc > 1 or nnodes > 1:
            raise TunekitError(
                "--seeds trains its runs one after another in this process: drop --nproc/--nnodes"
            )
        group = train_seeds(
            cfg, seeds, allow_data_errors=allow_data_errors, resume=resume, overwrite=overwrite,
            skip_damaged=skip_damaged,
        )  # fmt: skip
        err.print(f"seed group: {group / 'seeds.json'}; evaluate it with `tunekit eval {group}`")
        return
    if (nproc > 1 or nnodes > 1) and not distributed.launched():
        distributed.check_supported(cfg)
        argv = ["train", str(config), *(a for o in overrides for a in ("--set", o))]
        argv += ["--allow-data-errors"] * allow_data_errors + ["--resume"] * resume
        argv += ["--overwrite"] * overwrite + ["--skip-damaged"] * skip_damaged
        code = distributed.launch(argv, nproc, nnodes, node_rank, master_addr, master_port)
        raise typer.Exit(code)
    train_task(
        cfg,
        allow_data_errors=allow_data_errors,
        resume=resume,
        overwrite=overwrite,
        skip_damaged=skip_damaged,
    )


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="YAML config file: the run whose settings are searched.")],
    trials: Annotated[int, typer.Option(help="Trials the study reaches in all (a re-run adds more).")] = 10,
    budget: Annotated[
        str | None,
        typer.Option(help="Wall-clock time for this invocation's trials: 90s, 60m, 2h, 1h30m or seconds."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="The study's folder (default runs/tune-CONFIG); the same one resumes.")
    ] = None,
) -> None:
    """Search learning rate, epochs, LoRA rank and method on the validation split (Optuna: TPE and a
    median pruner); writes trials.csv, trials.md and best.yaml. Re-run with the same --out to resume."""
    from tunekit.config import parse_duration
    from tunekit.iterate.tune import tune as run_tune

    try:
        budget_s = parse_duration(budget) if budget is not None else None
    except ValueError as e:
        raise TunekitError(f"--budget: {e}") from None
    run_tune(config, trials, out or Path("runs") / f"tune-{config.stem}", budget_s)


@app.command("resume")
def resume_(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of an interrupted `tunekit train`.")],
    skip_damaged: Annotated[
        bool, typer.Option(help="Move a checkpoint that fails its checksums aside; resume the one before.")
    ] = False,
) -> None:
    """Continue an interrupted run from its newest complete checkpoint, with its own config."""
    from tunekit.train.session import resume as resume_run

    resume_run(run_dir, skip_damaged=skip_damaged)


@app.command("eval")
def eval_(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A run directory written by `tunekit train`.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Evaluate on this file instead of the run's test split.")
    ] = None,
    few_shot: Annotated[
        int | None, typer.Option(help="Train examples shown to the base_few_shot contender (0: none).")
    ] = None,
    probe: Annotated[
        str | None,
        typer.Option(help="Forgetting probe: builtin, an MMLU-style CSV or folder, a JSONL, or none."),
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            help="Show what changed between two evaluated runs (or seed groups, weighed against the "
            "between-seed variance): A B."
        ),
    ] = None,
    reward_model: Annotated[
        Path | None, typer.Option(help="dpo runs: a `task: reward` run dir, for the reward model's win rate.")
    ] = None,
    metric: Annotated[
        list[str] | None,
        typer.Option(
            help="Score this metric instead of the run's eval.metrics (repeatable; the first is the task "
            "metric). A custom `module:function` metric is imported only when named here."
        ),
    ] = None,
    label_scoring: Annotated[
        bool | None,
        typer.Option(
            "--label-scoring/--generate",
            help="Label data: predict the most likely label (default, eval.label_scoring), or generate "
            "replies freely.",
        ),
    ] = None,
    exported: Annotated[
        Path | None,
        typer.Option(
            help="Export parity gate: run the test split through llama.cpp on this exported .gguf and "
            "compare it with the trained model (paired test; writes export_parity.json)."
        ),
    ] = None,
    gate: Annotated[
        bool,
        typer.Option(
            help="With --compare OLD NEW: is NEW fit to replace OLD? Non-inferior on OLD's test set and the "
            "probe (margin eval.gate_margin), better on NEW's test set; paired tests; writes NEW/gate.json "
            "and exits 1 when NEW is not fit."
        ),
    ] = False,
    judge: Annotated[
        str | None,
        typer.Option(
            help="An LLM judges the evaluated replies pairwise, both ways round (base few-shot vs fine-tuned; "
            "with --compare A B: A vs B): a local model spec, or with --judge-url the endpoint's model name. "
            "Writes judge.json; compares with the ratings given in `tunekit ui`."
        ),
    ] = None,
    judge_url: Annotated[
        str | None,
        typer.Option(
            help="An OpenAI-compatible endpoint for --judge, e.g. http://127.0.0.1:8000/v1 (key from "
            "$TUNEKIT_JUDGE_API_KEY or $OPENAI_API_KEY)."
        ),
    ] = None,
    rubric: Annotated[
        Path | None,
        typer.Option(help="The judge's instructions: a text file with {prompt}, {a}, {b} (and {reference})."),
    ] = None,
    judge_max_tokens: Annotated[int, typer.Option(help="Longest judge reply, in tokens.")] = 512,
) -> None:
    """Compare the base (zero- and few-shot) and the fine-tuned model on held-out examples, with the
    forgetting probe; writes report.json, report.md and report.html."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.eval.report import print_contenders

    if judge is not None or judge_url is not None or rubric is not None:
        _judge(run_dir, compare, judge, judge_url, rubric, judge_max_tokens)
        return
    if gate:
        if compare is None:
            raise TunekitError(
                "--gate judges a retrained run against the one it replaces: --compare OLD NEW --gate"
            )
        from tunekit.console import out
        from tunekit.eval.gate import gate as run_gate
        from tunekit.eval.gate import print_gate

        result = run_gate(*compare)
        print_gate(result, out)
        raise typer.Exit(0 if result["fit"] else 1)
    if compare is not None:
        from tunekit.console import out
        from tunekit.eval.compare import compare_runs, print_changes

        print_changes(compare_runs(*compare), out)
        return
    if run_dir is None:
        raise TunekitError("give a run directory (tunekit eval runs/NAME) or --compare RUN_A RUN_B")
    from tunekit.train.seeds import is_group

    if is_group(run_dir):  # `tunekit train --seeds K`'s group: every run, and the spread across seeds
        from tunekit.eval.seeds import evaluate_group, print_seed_summary

        if exported is not None:
            raise TunekitError(f"--exported checks one exported run: give one of {run_dir}'s runs")
        options = {"few_shot": few_shot, "probe": probe, "reward_model": reward_model}
        options |= {"metrics": metric, "label_scoring": label_scoring}
        print_seed_summary(evaluate_group(run_dir, data, **options))
        err.print(f"report: {run_dir / 'seeds_report.md'}")
        return
    if exported is not None:
        from tunekit.eval.exported import evaluate_exported

        evaluate_exported(run_dir, exported, data)
        err.print(f"report: {run_dir / 'export_parity.json'}")
        return
    report = evaluate(
        run_dir,
        data,
        few_shot=few_shot,
        probe=probe,
        reward_model=reward_model,
        metrics=metric,
        label_scoring=label_scoring,
    )
    print_contenders(report)
    err.print(f"report: {run_dir / 'report.md'}")


def _judge(run_dir, compare, judge, judge_url, rubric, max_tokens) -> None:
    """`tunekit eval RUN --judge MODEL` (or `--compare A B --judge MODEL`)."""
    from tunekit.eval.judge import EndpointJudge, LocalJudge, judge_run, load_rubric, print_judge_report
    from tunekit.eval.pairs import RUN_PREFIX

    if judge is None:
        raise TunekitError("--judge-url and --rubric go with --judge MODEL (the model that judges)")
    if compare is not None:
        run_dir, comparison = compare[0], RUN_PREFIX + str(Path(compare[1]).resolve())
    elif run_dir is None:
        raise TunekitError("give a run directory (tunekit eval runs/NAME --judge MODEL) or --compare A B")
    else:
        comparison = None
    text = load_rubric(rubric)  # a bad rubric fails before a model loads
    model = EndpointJudge(judge_url, judge, max_tokens) if judge_url else LocalJudge(judge, max_tokens)
    report = judge_run(run_dir, model, text, comparison, str(rubric) if rubric else "default")
    print_judge_report(report)
    err.print(f"report: {Path(run_dir) / 'judge.json'}")


@data_app.command("split")
def data_split(
    file: Annotated[Path, typer.Argument(help="Data file (JSONL, JSON or CSV).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    ratios: Annotated[str, typer.Option(help="train,validation,test shares.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 42,
    format: Annotated[str, typer.Option(help=FORMAT_HELP)] = "auto",
    column: Annotated[
        list[str] | None, typer.Option(help="Rename a source column: --column label=category (repeatable).")
    ] = None,
) -> None:
    """Split FILE reproducibly into train/validation/test.jsonl plus manifest.json."""
    from tunekit.data import write_split

    columns = _columns(column)

    try:
        parts = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise TunekitError(f"--ratios {ratios!r}: expected three numbers like 0.8,0.1,0.1") from None
    if len(parts) != 3:
        raise TunekitError(f"--ratios {ratios!r}: expected three numbers like 0.8,0.1,0.1")
    manifest = write_split(file, out, ratios=parts, seed=seed, format=format, columns=columns)
    counts = manifest["counts"]
    err.print(
        f"{file}: {sum(counts.values())} examples -> "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" in {out}"
    )


@data_app.command("check")
def data_check(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Data files, e.g. train, validation and test.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Count tokens with this model's tokenizer.")] = None,
    chat_template: Annotated[
        str | None, typer.Option(help="With --model: a built-in template name or a .jinja file (config key).")
    ] = None,
    format: Annotated[str, typer.Option(help=FORMAT_HELP)] = "auto",
    config: Annotated[Path | None, typer.Option(help="Check the data of this training config.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the full report as JSON.")] = None,
    write_clean: Annotated[
        Path | None, typer.Option(help="Write kept rows and rejects (with reasons) here.")
    ] = None,
    max_length: Annotated[int, typer.Option(help="Warn about examples longer than this (tokens).")] = 512,
    column: Annotated[
        list[str] | None, typer.Option(help="Rename a source column: --column label=category.")
    ] = None,
    estimate: Annotated[
        bool, typer.Option(help="Measure training throughput here and estimate time (needs --config).")
    ] = False,
    price_per_hour: Annotated[
        float | None, typer.Option(help="Price per GPU-hour, for the cost estimate.")
    ] = None,
) -> None:
    """Find every defect in a data set: errors per row, duplicates, leakage, statistics. Exit 0/1/2."""
    from tunekit.data.check import check_config, check_data, write_json
    from tunekit.data.check import write_clean as write_clean_files
    from tunekit.data.check_report import print_report
    from tunekit.io import check_output

    # Refuse an output that cannot be written before the check's work, not after it.
    if json_out:
        check_output(json_out, "--json", inputs=files or ())
    if write_clean:
        check_output(write_clean, "--write-clean", folder=True)
    if config is not None:
        from tunekit.config import load_config
        from tunekit.tasks import get_task

        cfg = load_config(config)
        report = check_config(cfg, get_task(cfg.task).data)
        if estimate:
            from tunekit.estimate.training import estimate_checked

            report.estimate = estimate_checked(cfg, report, price_per_hour)
    elif files:
        if estimate:
            raise TunekitError("--estimate needs --config: the estimate is for a training config")
        report = check_data(
            files,
            format=format,
            columns=_columns(column),
            model=model,
            max_length=max_length,
            chat_template=chat_template,
        )
    else:
        raise TunekitError("give data files (tunekit data check train.jsonl test.jsonl) or --config CONFIG")
    print_report(report)
    if json_out:
        write_json(report, json_out)
        err.print(f"report: {json_out}")
    if write_clean:
        for src, dst in write_clean_files(report, write_clean).items():
            err.print(f"{src}: kept rows -> {dst}")
    raise typer.Exit(report.exit_code)


@data_app.command("augment")
def data_augment(
    source: Annotated[
        Path, typer.Argument(help="A data file, or a run directory (its train split and report.json).")
    ],
    labels: Annotated[
        str | None,
        typer.Option(help="Target these labels or groups (A,B or priority=P1); default: the weak ones."),
    ] = None,
    per_group: Annotated[int, typer.Option(help="Drafts per target.")] = 5,
    seeds: Annotated[int, typer.Option(help="Seed examples of the target shown in each prompt.")] = 3,
    model: Annotated[
        str | None, typer.Option(help="Local model that drafts (default: the run's base, or the default).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Candidates file (.jsonl); default RUN/augment/ or FILE's stem.candidates.jsonl."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for choosing seeds and for sampling.")] = 42,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.8,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Longest draft in tokens (default: from the seeds' length).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Prompts generated together.")] = 16,
    max_length: Annotated[
        int | None, typer.Option(help="Reject drafts longer than this (tokens; default: the run's, or 512).")
    ] = None,
    format: Annotated[str, typer.Option(help=f"Data files: {FORMAT_HELP}")] = "auto",
    column: Annotated[
        list[str] | None, typer.Option(help="Rename a source column: --column label=category.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing candidates file.")] = False,
) -> None:
    """Draft new examples for the weak labels or failure groups with a local model, check them, and
    write them for review: never into the training data."""
    from tunekit.iterate.augment import augment, print_summary

    targets = [x.strip() for x in labels.split(",") if x.strip()] if labels is not None else None
    if labels is not None and not targets:
        raise TunekitError(f"--labels {labels!r}: expected names like card_arrival,card_linking")
    result = augment(
        source,
        labels=targets,
        per_group=per_group,
        seeds=seeds,
        model=model,
        out=out,
        seed=seed,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        format=format,
        columns=_columns(column),
        max_length=max_length,
        overwrite=overwrite,
    )
    print_summary(result)


@data_app.command("ratings")
def data_ratings(
    run: Annotated[str, typer.Argument(help="The rated run: id, name or folder (tunekit runs lists them).")],
    out: Annotated[
        Path | None, typer.Option(help="Write the preference pairs here (JSONL: prompt, chosen, rejected).")
    ] = None,
    comparison: Annotated[
        str | None, typer.Option(help="Which rated comparison, e.g. base_few_shot|finetuned (when several).")
    ] = None,
) -> None:
    """Turn the ratings given in `tunekit ui` into preference pairs (for task: reward or dpo); report
    the human win rate with its CI and the inter-rater agreement (Cohen's or Fleiss' kappa)."""
    from tunekit.data.ratings import export_ratings, print_ratings_report
    from tunekit.io import check_output
    from tunekit.runs import registry

    found = registry.get_run(run)
    if found is None:
        raise TunekitError(f"tunekit data ratings {run}: no such run (give an id, a name or a run folder)")
    if out is not None:
        check_output(out, "--out")
    report = export_ratings(registry.get_ratings(found["id"]), comparison, out, found["name"])
    print_ratings_report(report)


@data_app.command("curve")
def data_curve(
    config: Annotated[Path, typer.Argument(help="YAML config file: the recipe trained at each size.")],
    fractions: Annotated[
        str, typer.Option(help="Shares of the train split to train on, nested (each holds the smaller).")
    ] = "0.125,0.25,0.5,1",
    budget: Annotated[
        str | None,
        typer.Option(help="Training time for all sizes together (each its share by size): 90s, 60m, 2h."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the runs and curve.json (default runs/curve-CONFIG); the same one resumes."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.epochs=2")
    ] = None,
) -> None:
    """How much more data would help: train on nested subsets, fit a learning curve overall and per
    label or JSON field, say where more examples help most, and the test set's power."""
    from tunekit.config import load_config, parse_duration
    from tunekit.console import out as stdout
    from tunekit.iterate.curve import parse_fractions, print_curve, run_curve

    try:
        budget_s = parse_duration(budget) if budget is not None else None
    except ValueError as e:
        raise TunekitError(f"--budget: {e}") from None
    shares = parse_fractions(fractions)
    cfg = load_config(config, set_ or [])
    folder = out or Path("runs") / f"curve-{config.stem}"
    print_curve(run_curve(cfg, folder, shares, budget_s), stdout)
    err.print(f"report: {folder / 'curve.md'}")


def _columns(column: list[str] | None) -> dict[str, str] | None:
    column = column or []
    bad = [c for c in column if "=" not in c]
    if bad:
        raise TunekitError(f"--column {bad[0]!r}: expected CANONICAL=SOURCE, e.g. --column label=category")
    return dict(c.split("=", 1) for c in column) or None


@app.command()
def quickstart(
    output_dir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/quickstart"),
    set_: Annotated[list[str], typer.Option("--set", help="Override a key: --set train.epochs=2")] = None,
) -> None:
    """The main job: fine-tune the embedded default model on the demo tickets and compare with the base."""
    from tunekit.demo.quickstart import quickstart as run

    if set_ is None:
        set_ = []
    run(output_dir, set_)


@app.command()
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.batch_size=4")
    ] = None,
    model_size: Annotated[
        str | None, typer.Option(help="Predict for a llama-class reference size instead: 1b, 7b, 8b, 70b.")
    ] = None,
    compare_sizes: Annotated[
        bool, typer.Option(help="Also tabulate full/lora/qlora for the reference sizes on 24/48/80 GB GPUs.")
    ] = False,
    measure: Annotated[
        bool, typer.Option(help="Run a few real training steps here to measure tokens/s and peak memory.")
    ] = True,
    dtype: Annotated[
        str | None, typer.Option(help="fp32 or bf16 (default: fp32 here, bf16 for the GPU tables).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Predict activations with gradient checkpointing (tunekit trains without).")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the estimate here.")] = None,
    nproc: Annotated[
        int,
        typer.Option(
            help="GPUs (processes) the run will use, as for `tunekit train --nproc`: memory per GPU; "
            "with distributed.strategy: fsdp the weights, gradients and optimizer states are split over them."
        ),
    ] = 1,
) -> None:
    """Predict peak memory (weights, gradients, optimizer, activations, logits) and training time
    before training, here and on 24/48/80 GB GPUs."""
    from tunekit.config import load_config
    from tunekit.estimate.training import estimate_report, print_estimate
    from tunekit.io import atomic_write_json
    from tunekit.train.defaults import resolve_defaults

    report = estimate_report(
        resolve_defaults(load_config(config, set_ or [])),  # the run `tunekit train` would start
        model_size=model_size,
        compare_sizes=compare_sizes,
        measure=measure,
        dtype=dtype,
        checkpointing=gradient_checkpointing,
        nproc=nproc,
    )
    print_estimate(report)
    if json_out:
        atomic_write_json(json_out, report)
        err.print(f"estimate: {json_out}")


@app.command("export")
def export_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunekit train` (task sft).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    merge: Annotated[
        bool, typer.Option(help="Fold the adapter into the base: a standalone model (QLoRA: dequantized).")
    ] = False,
    format: Annotated[
        str, typer.Option(help="hf (safetensors) or gguf (llama, mistral, qwen2, qwen3, gemma3).")
    ] = "hf",
    quant: Annotated[str, typer.Option(help="GGUF weights: f16, q8_0 or q4_0.")] = "f16",
    parity: Annotated[
        bool,
        typer.Option(
            help="GGUF: run the test split through llama.cpp and warn if the export is significantly "
            "worse (needs llama-cpp-python; see tunekit eval --exported)."
        ),
    ] = True,
) -> None:
    """Export a fine-tune with its chat template and stop tokens: safetensors (merged or adapter) or GGUF
    (with an Ollama Modelfile)."""
    from tunekit.ship.export import export

    path = export(run_dir, out, merge=merge, format=format, quant=quant, parity=parity)
    err.print(f"exported -> {path}")


@app.command()
def serve(
    run_dirs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Run directories to serve (model = folder name); none with --enable-fine-tuning."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    host: Annotated[str, typer.Option(help="Interface to bind (0.0.0.0: the network).")] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TUNEKIT_API_KEY",
            show_envvar=True,
            help="Require `Authorization: Bearer KEY` on every request. Set it in the environment "
            "instead to keep it out of `ps`.",
        ),
    ] = None,
    max_body_mb: Annotated[
        float | None,
        typer.Option(help="Largest request body in MB (default 4); bigger ones get 413 unread."),
    ] = None,
    enable_fine_tuning: Annotated[
        bool,
        typer.Option(
            help="Also serve OpenAI's files and fine-tuning jobs API (/v1/files, /v1/fine_tuning/jobs): jobs "
            "train one at a time beside the server, and each fine-tuned model is served as ft:BASE:SUFFIX:ID."
        ),
    ] = False,
    fine_tune_config: Annotated[
        Path | None,
        typer.Option(
            help="YAML of config keys every fine-tuning job trains with besides what the job sets (e.g. "
            "method, lora, train.max_length, train.save_steps); not model, task, data or output_dir."
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most replies decoded together in one batch (concurrent requests share forward passes; "
            "1 answers one at a time).",
        ),
    ] = 8,
    enable_switch: Annotated[
        bool,
        typer.Option(
            help="Let `tunekit switch NAME RUN` (POST /tunekit/switch) serve a name from a new run without "
            "a restart, once `tunekit eval --compare OLD NEW --gate` found it fit."
        ),
    ] = False,
) -> None:
    """An OpenAI-compatible server (/v1/models, /v1/chat/completions) for one or more fine-tunes."""
    import os

    from tunekit.ship.serve import serve as run_server

    if api_key is None:  # click skips an empty variable; set but empty is a mistake, refused by serve
        api_key = os.environ.get("TUNEKIT_API_KEY")
    run_server(
        run_dirs or [], host=host, port=port, api_key=api_key, max_body_mb=max_body_mb,
        enable_fine_tuning=enable_fine_tuning, fine_tune_config=fine_tune_config, max_batch=max_batch,
        enable_switch=enable_switch,
    )  # fmt: skip


@app.command()
def switch(
    name: Annotated[str, typer.Argument(help="The served name (a model id of the running server).")],
    run_dir: Annotated[Path, typer.Argument(help="The run to serve under it from now on.")],
    url: Annotated[
        str, typer.Option(help="The running `tunekit serve --enable-switch`.")
    ] = "http://127.0.0.1:8000",
    force: Annotated[
        bool,
        typer.Option(help="Switch without a passing `eval --compare OLD NEW --gate` (said in the answer)."),
    ] = False,
) -> None:
    """Serve NAME from RUN_DIR from now on, without restarting the server: only when RUN_DIR's gate
    found it fit to replace the run served now (API key from $TUNEKIT_API_KEY)."""
    import json
    import os
    import urllib.error
    import urllib.request

    from tunekit.console import out

    body = json.dumps({"model": name, "run": str(run_dir.resolve()), "force": force}).encode()
    headers = {"Content-Type": "application/json"}
    if os.environ.get("TUNEKIT_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['TUNEKIT_API_KEY']}"
    request = urllib.request.Request(f"{url.rstrip('/')}/tunekit/switch", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code}"
        raise TunekitError(f"tunekit switch: the server refused: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TunekitError(
            f"tunekit switch: no server at {url} ({getattr(e, 'reason', e)}); start `tunekit serve RUN "
            "--enable-switch` or give --url"
        ) from None
    out.print(
        f"{answer['model']} now serves {answer['run']} (was {answer['previous_run']}); gate: {answer['gate']}"
    )


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunekit train` (task sft).")],
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
) -> None:
    """Chat with a fine-tune in the terminal (/reset starts over, /exit leaves)."""
    from tunekit.ship.chat import chat as run_chat

    run_chat(run_dir, system=system, temperature=temperature, max_tokens=max_tokens)


@app.command()
def runs(
    run: Annotated[str | None, typer.Argument(help="Show this run (id, name or folder).")] = None,
) -> None:
    """List the registered runs, or show one: config, status, metrics, artifacts."""
    from tunekit.runs.registry import print_run, print_runs

    print_run(run) if run else print_runs()


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    host: Annotated[
        str, typer.Option(help="Interface to bind (a non-loopback one lets other machines in: a warning).")
    ] = "127.0.0.1",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TUNEKIT_API_KEY",
            show_envvar=True,
            help="Require this key: `Authorization: Bearer KEY`, or open the page once as /?key=KEY. "
            "Set it in the environment instead to keep it out of `ps`.",
        ),
    ] = None,
) -> None:
    """A local web dashboard over the run registry: runs, loss curves, reports, live progress; blind
    rating of replies (/rate), and training started and stopped from the page."""
    import os

    from tunekit.ui.app import serve_ui

    if api_key is None:  # click skips an empty variable; set but empty is a mistake, not "no key"
        api_key = os.environ.get("TUNEKIT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise TunekitError("--api-key (or $TUNEKIT_API_KEY) is empty: give a key, or none for no key")

    serve_ui(host=host, port=port, api_key=api_key)


def main() -> None:
    """Entry point: user errors print their message, without a traceback, and exit 2."""
    try:
        app()
    except TunekitError as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
