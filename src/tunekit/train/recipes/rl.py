"""Policy optimisation against a reward model (`task: rl`): classic RLHF, top to bottom.

Run as: `tunekit train examples/rlhf_pipeline.yaml`, with preference pairs as data.

One run directory holds the whole pipeline:

    run_dir/stages/sft/      1. SFT on the prompts and their chosen answers   (when rl.policy is null)
    run_dir/stages/reward/   2. a reward model on the pairs (train/recipes/reward.py)  (when rl.reward_model is null)
    run_dir/adapter/         3. RL: the SFT policy trained to raise the reward model's score, with a
                                KL penalty (rl.kl_coef) to the SFT policy; model/ for method full

Stage 3 runs TRL's GRPOTrainer (rl.algorithm: grpo) or RLOOTrainer (rloo): for each prompt of the
train split it samples rl.num_generations completions, scores prompt + completion with the reward
model, and raises the likelihood of completions that beat their group's mean. The policy starts
as the SFT adapter itself (trained on, not merged), and TRL keeps a frozen copy of that adapter as
the KL reference; for method full TRL loads the SFT model a second time as the reference. TRL's
logs become our metrics.jsonl records (reward, kl, loss per step). Every stage reads the same
`train` section.

With `rl.graders` (train/graders.py) there is no reward stage: the reward of a completion is the
graders' weighted score against the example's reference answer (a conversation row's last
assistant message, or a pair's chosen answer), so the data may be plain conversations. A grader
that fails on a sample scores it 0; the failures are counted in metrics.jsonl
(`grader_failure_rate`) and listed, with the example, in train_summary.json (`grader_failures`).
`tunekit eval` then scores greedy answers of the policy and of the policy RL started from with the
same graders on the test split, with a paired test of the difference (eval/graded.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunekit.config import Config
from tunekit.console import err as console
from tunekit.data.needs import require
from tunekit.data.tokenize import render
from tunekit.errors import ConfigError, DataError, TunekitError
from tunekit.models import resolve_model
from tunekit.models.device import default_device
from tunekit.runs.directory import append_metrics, load_run_config, read_metrics
from tunekit.tasks import Task
from tunekit.train.graders import GraderSpecError, Scorer, build_scorer
from tunekit.train.loop import LoopResult
from tunekit.train.setup import ADAPTER_DIR, MODEL_DIR, load_trained, save_trained

if TYPE_CHECKING:
    from tunekit.train.session import RunSession

# TRL log key -> our metrics.jsonl key.
TRL_METRICS = {
    "loss": "loss",
    "reward": "reward",
    "reward_std": "reward_std",
    # the share of prompts whose completions all scored alike: they teach GRPO nothing (zero advantage)
    "frac_reward_zero_std": "frac_reward_zero_std",
    "kl": "kl",
    "entropy": "entropy",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "completion_clipped_ratio",
}
GRADER_METRICS = ("graders/", "grader_failure_rate")  # rl.graders' own logs (grader_reward), kept as named


def stage_dirs(cfg: Config, run_dir: Path) -> tuple[Path, Path]:
    """(the SFT policy's run dir, the reward model's run dir): given in the config, else stages."""
    return (
        Path(cfg.rl.policy) if cfg.rl.policy else run_dir / "stages" / "sft",
        Path(cfg.rl.reward_model) if cfg.rl.reward_model else run_dir / "stages" / "reward",
    )


def train_rl(run: RunSession) -> Path:
    """Run the RL pipeline as `cfg.rl` says (the SFT stage where rl.policy is not given, the reward
    stage where neither rl.reward_model nor rl.graders is, then RL); returns the run directory, which
    holds the final policy and train_summary.json."""
    cfg, splits, run_dir, quiet = run.cfg, run.splits, run.dir, run.quiet
    graded = cfg.rl.graders is not None
    if not graded:  # the reward stage and the evaluation read rejected answers (see TASK below)
        for name, examples in splits.items():
            require("pairs", examples, name, TASK.name)
    scorer = build_graders(cfg) if graded else None
    policy_dir, reward_dir = stage_dirs(cfg, run_dir)
    stages: dict[str, dict] = {}
    if cfg.rl.policy is None:
        stages["sft"] = _run_stage(cfg, "sft", policy_dir, quiet, run.allow_data_errors)
    if not graded and cfg.rl.reward_model is None:
        stages["reward"] = _run_stage(cfg, "reward", reward_dir, quiet, run.allow_data_errors)
    _check_stage(policy_dir, "rl.policy", ("sft",))
    if not graded:
        _check_stage(reward_dir, "rl.reward_model", ("reward",))

    model, tokenizer, params = load_policy(policy_dir, cfg)
    max_prompt_tokens = cfg.train.max_length - cfg.rl.max_new_tokens
    rows, too_long = rl_prompts(splits["train"], cfg.rl.max_prompts, tokenizer, max_prompt_tokens, graded)
    if too_long and not quiet:
        console.print(
            f"[yellow]RL: {too_long} prompt(s) longer than {max_prompt_tokens} tokens left out "
            "(train.max_length - rl.max_new_tokens); raise train.max_length to keep them[/]"
        )
    if scorer is not None:
        reward = grader_reward(scorer)
    else:
        from tunekit.train.recipes.reward import load_reward_model

        reward_model, reward_tokenizer = load_reward_model(reward_dir)
        reward = reward_fn(reward_model, reward_tokenizer, cfg.eval.batch_size)
    run.announce(model, params, len(rows), 0)

    trainer = _trainer(cfg, run_dir, model, tokenizer, rows, reward, quiet)
    t_train = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t_train

    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's frozen copy of the starting adapter: not part of the policy
    saved = save_trained(model, tokenizer, run_dir, cfg.method)
    if not any((run_dir / "stages" / "rl").iterdir()):
        (run_dir / "stages" / "rl").rmdir()  # TRL's output folder: empty, as nothing is checkpointed
    logged = read_metrics(run_dir)
    last = {k: v for r in logged for k, v in r.items()}  # the latest value of each metric
    result = LoopResult(
        steps=trainer.state.global_step,
        epochs=round(trainer.state.epoch or 0.0, 4),
        steps_per_epoch=0,
        final_loss=last.get("loss", float("nan")),
        val={},
        tokens=int(trainer.state.num_input_tokens_seen or 0),
        train_seconds=train_seconds,
    )
    stages["rl"] = {
        "algorithm": cfg.rl.algorithm,
        "prompts": len(rows),
        "prompts_too_long": too_long,
        "max_prompt_tokens": max_prompt_tokens,
        "seconds": train_seconds,
    }
    graders = (
        {"graders": [name for name, _, _ in scorer.graders], "grader_failures": scorer.report()}
        if scorer
        else {}
    )
    if scorer and scorer.examples and not quiet:
        first = scorer.examples[0]
        console.print(
            f"[yellow]graders: {scorer.report()['failed']} of {scorer.calls} grader calls failed and scored 0 "
            f"(train_summary.json grader_failures); first: {first['where']} {first['grader']}: {first['error']}[/]"
        )
    run.finish(
        result, model_path=resolve_model(cfg.model), params=params, saved=saved,
        policy_start=str(policy_dir), reward_model=None if graded else str(reward_dir), stages=stages,
        final_reward=last.get("reward"), final_kl=last.get("kl"),
        first_reward=next((r["reward"] for r in logged if "reward" in r), None), **graders,
    )  # fmt: skip
    return run_dir


# ---------------------------------------------------------------------------------------------
# Stages 1 and 2


def _run_stage(cfg: Config, task: str, out: Path, quiet: bool, allow_data_errors: bool) -> dict:
    """Train stage `task` (sft or reward) on the same data and `train` section into `out`."""
    from tunekit.train.session import train

    if not quiet:
        console.print(f"[bold]stage {task}[/] -> {out}")
    stage_cfg = cfg.model_copy(update={"task": task, "output_dir": out})
    t0 = time.perf_counter()
    train(stage_cfg, quiet=quiet, allow_data_errors=allow_data_errors)
    summary = json.loads((out / "train_summary.json").read_text())
    keep = ("steps", "final_train_loss", "final_validation", "train_seconds")
    return {"run_dir": str(out), "seconds": time.perf_counter() - t0} | {k: summary.get(k) for k in keep}


def _check_stage(run_dir: Path, key: str, tasks: tuple[str, ...]) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError([f"{key}: {run_dir} is not a tunekit run directory (no config.yaml)"])
    task = load_run_config(run_dir).task
    if task not in tasks:
        raise ConfigError([f"{key}: {run_dir} is a task: {task} run; expected task: {' or '.join(tasks)}"])


# ---------------------------------------------------------------------------------------------
# Stage 3: RL


def rl_prompts(
    examples, max_prompts: int | None, tokenizer=None, max_prompt_tokens: int | None = None, references=False
):
    """The distinct prompts of the train examples, in order, as rows {"prompt": chat messages} (TRL's
    conversational form). With `references` (rl.graders) a row is a prompt and its reference answer,
    {"prompt", "reference", "index", "where"}: the last assistant message of a conversation, or the
    chosen answer of a pair; TRL passes the other columns to the reward function, so a grader failure
    names its example (the index in the train split, and file:line).

    TRL's GRPO and RLOO do not truncate prompts, and a prompt of thousands of tokens times
    rl.num_generations samples is what runs a CPU out of memory (LLaMA-Factory's demo pairs go to
    3,000+ tokens). Cutting a prompt would change the question, so prompts longer than
    `max_prompt_tokens` (train.max_length - rl.max_new_tokens) are left out of RL, and counted.
    Returns (prompts, the number left out as too long)."""
    seen, out, too_long = set(), [], 0
    for index, ex in enumerate(examples):
        messages = ex.pair()[0] if not references or ex.rejected else ex.prompt
        prompt = [{"role": m.role, "content": m.content} for m in messages]
        row: dict = {"prompt": prompt}
        if references:
            require_answers([ex])
            row |= {"reference": ex.target, "index": index, "where": ex.where}
        key = json.dumps(row["prompt"] if not references else [prompt, row["reference"]])
        if key in seen:
            continue
        seen.add(key)
        if tokenizer is not None and max_prompt_tokens is not None:
            text = render(tokenizer, messages, add_generation_prompt=True)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
                too_long += 1
                continue
        out.append(row)
        if max_prompts and len(out) == max_prompts:
            break
    if not out:
        raise TunekitError(
            "data.train: no prompts for RL"
            + (f": all {too_long} are longer than {max_prompt_tokens} tokens (train.max_length - "
               "rl.max_new_tokens); raise train.max_length" if too_long else "")
        )  # fmt: skip
    return out, too_long


def require_answers(examples) -> None:
    """Graders score against each row's reference: its last message must be the assistant's answer."""
    bad = [ex.where for ex in examples if not ex.messages or ex.messages[-1].role != "assistant"]
    if bad:
        raise DataError(
            [f"{where}: the row does not end with an assistant answer" for where in bad],
            header="rl.graders score completions against each example's reference answer (its last assistant "
            "message)",
        )


def load_policy(policy_dir: Path, cfg: Config):
    """The SFT policy to start from, trainable: its adapter on its base, or its full model.
    Returns (model, tokenizer, trainable parameters)."""
    policy_cfg = load_run_config(policy_dir)
    is_full = (policy_dir / MODEL_DIR / "config.json").is_file()
    if is_full != (cfg.method == "full"):
        raise ConfigError(
            [f"method: {cfg.method}, but rl.policy {policy_dir} was trained with method: {policy_cfg.method}; "
             "RL continues the policy as it was trained: set the same method"]
        )  # fmt: skip
    if not is_full and not (policy_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise ConfigError(
            [f"rl.policy: {policy_dir} holds no trained model ({ADAPTER_DIR}/ or {MODEL_DIR}/)"]
        )
    if not is_full and policy_cfg.model != cfg.model:
        raise ConfigError([f"model: {cfg.model}, but rl.policy {policy_dir} adapts {policy_cfg.model}"])
    model, tokenizer, _ = load_trained(policy_dir, trainable=True)
    return model, tokenizer, [p for p in model.parameters() if p.requires_grad]


def reward_fn(reward_model, reward_tokenizer, batch_size: int = 16):
    """TRL's reward-function interface around the reward model: the score of prompt + completion."""
    from tunekit.train.recipes.reward import score_texts

    def reward_model_score(prompts, completions, **_) -> list[float]:
        conversations = [p + c for p, c in zip(prompts, completions, strict=True)]
        return score_texts(reward_model, reward_tokenizer, conversations, batch_size)

    return reward_model_score


def build_graders(cfg: Config) -> Scorer:
    """rl.graders as one Scorer; a schema file that cannot be read or a python grader that cannot be
    imported is a ConfigError naming its key."""
    entries = [g.model_dump(exclude_defaults=True) | {"type": g.type} for g in cfg.rl.graders or []]
    try:
        return build_scorer(entries, cfg.rl.grader_timeout)
    except GraderSpecError as e:
        raise ConfigError([str(e)]) from None


def grader_reward(scorer: Scorer):
    """TRL's reward-function interface around the graders: each completion's combined score against
    its row's reference. Each grader's mean and the share of failed grader calls go to TRL's logs
    (`log_metric`, averaged over a logging step), hence metrics.jsonl."""

    def graders_score(prompts, completions, reference, index, where, log_metric=None, **_) -> list[float]:
        calls, failed = scorer.calls, sum(scorer.failures.values())
        totals, sums = [], dict.fromkeys((name for name, _, _ in scorer.graders), 0.0)
        for completion, ref, i, w in zip(completions, reference, index, where, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            total, each = scorer.score(text, {"reference": ref}, i, w)
            totals.append(total)
            for name, value in each.items():
                sums[name] += value
        if log_metric is not None:
            for name, value in sums.items():
                log_metric(f"graders/{name}", value / len(totals))
            log_metric(
                "grader_failure_rate", (sum(scorer.failures.values()) - failed) / (scorer.calls - calls)
            )
        return totals

    return graders_score


def _trainer(cfg: Config, run_dir: Path, model, tokenizer, rows, reward, quiet: bool):
    """TRL's GRPO or RLOO trainer as our config says. Each optimizer step samples
    train.batch_size prompts x rl.num_generations completions per micro-batch."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    if cfg.rl.algorithm == "grpo":
        from trl import GRPOConfig as TrlConfig
        from trl import GRPOTrainer as TrlTrainer
    else:
        from trl import RLOOConfig as TrlConfig
        from trl import RLOOTrainer as TrlTrainer

    tc, rc = cfg.train, cfg.rl
    on_cuda = default_device().type == "cuda"  # $TUNEKIT_DEVICE=cpu keeps a GPU machine's RL on the CPU
    args = TrlConfig(
        output_dir=str(run_dir / "stages" / "rl"),
        per_device_train_batch_size=tc.batch_size * rc.num_generations,
        gradient_accumulation_steps=tc.grad_accum,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm or 0.0,
        seed=tc.seed,
        logging_steps=tc.log_every,
        beta=rc.kl_coef,
        num_generations=rc.num_generations,
        max_completion_length=rc.max_new_tokens,
        temperature=rc.temperature,
        # TRL defaults that are wrong on a CPU: bf16 runs 17x slower here, and checkpointing costs a
        # third of the step while activations are not the limit (PLATFORM.md). On a CUDA device with
        # bf16 support, bf16 autocast as in tunekit's own loop (models/device.py).
        bf16=on_cuda and torch.cuda.is_bf16_supported(),
        fp16=False,
        use_cpu=not on_cuda,
        activation_checkpointing=False,  # transformers 5's name; TRL's default (True) goes by the old one
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")

    class ToMetrics(TrainerCallback):
        """TRL's log records -> our metrics.jsonl (one JSON object per logged step)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            record = {ours: logs[theirs] for theirs, ours in TRL_METRICS.items() if logs and theirs in logs}
            record |= {k: v for k, v in (logs or {}).items() if k.startswith(GRADER_METRICS)}
            if not record:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)} | record
            append_metrics(metrics_path, record)
            if not quiet:
                console.print(
                    f"step {state.global_step}/{state.max_steps}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "epoch"))
                )

    trainer = TrlTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[ToMetrics()],
    )
    trainer.remove_callback(PrinterCallback)  # our callback prints the mapped records instead
    return trainer


def check_rl_config(cfg: Config) -> list[str]:
    """The room a prompt needs: rl.max_new_tokens must leave some of train.max_length; and
    rl.graders must build (schema files read, python graders imported) before the run starts."""
    problems = []
    if cfg.rl.max_new_tokens >= cfg.train.max_length:
        problems.append(
            f"rl.max_new_tokens: {cfg.rl.max_new_tokens} leaves no room for the prompt in "
            f"train.max_length: {cfg.train.max_length}; raise train.max_length or lower rl.max_new_tokens"
        )
    if cfg.rl.graders is not None:
        try:
            build_graders(cfg)
        except ConfigError as e:
            problems += e.problems
    return problems


TASK = Task(
    name="rl",
    summary="RL (GRPO/RLOO): SFT, then against a reward model trained on pairs, or against rl.graders",
    # "conversations", as every row with an answer can be RL's: with rl.graders a prompt and its
    # reference answer is all it needs, and a pair is such a row (prompt + chosen) too. The reward
    # model route needs rejected answers as well; the table holds one kind per task, so train_rl checks
    # "pairs" itself when rl.graders is not set (before any stage runs) and its evaluation reads pairs.
    data="conversations",
    recipe=train_rl,
    evaluation="tunekit.eval.graded:evaluate_rl_run",
    generative=True,
    eval_options=("reward_model",),
    multi_process=False,
    not_resumable="its RL stage runs in TRL's own loop; start it again, reusing finished stages with "
    "rl.policy: RUN/stages/sft and rl.reward_model: RUN/stages/reward",
    no_time_budget="its RL stage runs in TRL's own loop, which the budget does not drive; budget the SFT "
    "and reward stages as runs of their own (task: sft, task: reward)",
    check_config=check_rl_config,
)
