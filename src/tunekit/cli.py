"""The `tunekit` command line: thin wrappers over the library functions.

Run as: `tunekit --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tunekit.console import err
from tunekit.errors import TunekitError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Fine-tune language models on your own data."
)
data_app = typer.Typer(no_args_is_help=True, help="Data sets: check and split.")
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
        bool, typer.Option(help="Continue from the newest checkpoint in the config's output_dir.")
    ] = False,
) -> None:
    """Fine-tune a model as CONFIG says; writes the run directory. The data is checked first."""
    from tunekit.config import load_config
    from tunekit.train import train as train_task

    train_task(load_config(config, set_ or []), allow_data_errors=allow_data_errors, resume=resume)


@app.command("resume")
def resume_(
    run_dir: Annotated[Path, typer.Argument(help="The run directory of an interrupted `tunekit train`.")],
) -> None:
    """Continue an interrupted run from its newest complete checkpoint, with its own config."""
    from tunekit.train import resume as resume_run

    resume_run(run_dir)


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `tunekit train`.")],
    data: Annotated[
        Path | None, typer.Option(help="Evaluate on this file instead of the run's test split.")
    ] = None,
) -> None:
    """Compare the base and the fine-tuned model on held-out examples; writes report.json and report.md."""
    from tunekit.eval.evaluate import evaluate
    from tunekit.quickstart import print_comparison

    report = evaluate(run_dir, data)
    print_comparison(report)
    err.print(f"report: {run_dir / 'report.md'}")


@data_app.command("split")
def data_split(
    file: Annotated[Path, typer.Argument(help="Data file (JSONL, JSON or CSV).")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    ratios: Annotated[str, typer.Option(help="train,validation,test shares.")] = "0.8,0.1,0.1",
    seed: Annotated[int, typer.Option(help="Shuffle seed.")] = 42,
    format: Annotated[
        str, typer.Option(help="auto, chat, prompt_completion, alpaca, classification.")
    ] = "auto",
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
    format: Annotated[str, typer.Option(help="auto or a format name.")] = "auto",
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
    from tunekit.data.check import check_config, check_data
    from tunekit.data.check import write_clean as write_clean_files
    from tunekit.data.check_report import print_report
    from tunekit.io import atomic_write_json

    if config is not None:
        from tunekit.config import load_config

        report = check_config(load_config(config), estimate=estimate, price_per_hour=price_per_hour)
    elif files:
        if estimate:
            raise TunekitError("--estimate needs --config: the estimate is for a training config")
        report = check_data(
            files, format=format, columns=_columns(column), model=model, max_length=max_length
        )
    else:
        raise TunekitError("give data files (tunekit data check train.jsonl test.jsonl) or --config CONFIG")
    print_report(report)
    if json_out:
        atomic_write_json(json_out, report.to_dict())
        err.print(f"report: {json_out}")
    if write_clean:
        for src, dst in write_clean_files(report, write_clean).items():
            err.print(f"{src}: kept rows -> {dst}")
    raise typer.Exit(report.exit_code)


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
    from tunekit.quickstart import quickstart as run

    if set_ is None:
        set_ = []
    run(output_dir, set_)


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
