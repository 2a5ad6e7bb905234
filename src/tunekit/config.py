"""The one typed config. Defaults live here and nowhere else.

Run as: `tunekit train CONFIG.yaml [--set train.max_steps=5 ...]`. A config is YAML:

    model: smollm2-135m-instruct
    method: lora
    data: {train: data/train.jsonl, format: auto}
    lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
    train: {epochs: 3, learning_rate: 2.0e-4, batch_size: 8, max_length: 512, seed: 42}
    output_dir: runs/my-run

Relative paths are relative to the current directory, as with every other command-line tool.
Every error (unknown key, wrong type, bad value) is collected and reported at once, each with
its dotted path and, for an unknown key, the nearest valid one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tunekit.data.formats import FORMATS  # light: the format names, for the help
from tunekit.errors import ConfigError
from tunekit.tasks import task_names  # light: the table's names, not the recipes

# Seeds reach numpy (TRL's set_seed), which takes 0 .. 2**32 - 1 only.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
INT_RANGE = (-(2**63), 2**63 - 1)  # what torch, numpy and the tokenizers hold: every int field fits it


class _Strict(BaseModel):
    # extra="forbid": a typo is an error, never a silently ignored key. allow_inf_nan=False: every
    # float field is finite (`epochs: .inf` would plan endless steps, `learning_rate: .inf` NaN weights).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_silent_coercion(cls, v: Any, info: ValidationInfo) -> Any:
        """Refuse what pydantic's lax mode would coerce into a value that crashes later: a boolean
        for a number (`batch_size: true` is 1), an int beyond 64 bits, an empty path ('' is '.')."""
        field = cls.model_fields[info.field_name]
        bounded = any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata)  # e.g. a Seed
        problem = _coercion_problem(field.annotation, v, check_range=not bounded)
        if problem:
            raise ValueError(problem)
        return v


def _members(annotation: Any) -> tuple:
    """The types a field admits: the members of a union (`Path | None`), or the type itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _coercion_problem(annotation: Any, v: Any, check_range: bool = True) -> str | None:
    """Why `v` must not become a value of `annotation`, or None when it may."""
    members = _members(annotation)
    for m in members:  # containers: tuple[float, float, float], list[str], ...
        if typing.get_origin(m) in (tuple, list) and isinstance(v, list | tuple):
            item = typing.get_args(m)[0]
            return next((p for x in v if (p := _coercion_problem(item, x, check_range))), None)
    if isinstance(v, bool) and bool not in members and (int in members or float in members):
        return "expected a number, got a boolean (true/false)"
    in_range = not isinstance(v, int) or INT_RANGE[0] <= v <= INT_RANGE[1]
    if check_range and not in_range and not isinstance(v, bool) and int in members:
        return f"out of range: an integer here must lie within {INT_RANGE[0]} .. {INT_RANGE[1]}"
    if isinstance(v, str) and Path in members and not v.strip():
        return "an empty path (it would mean the current folder); name a file or folder" + (
            ", or null" if type(None) in members else ""
        )
    return None


DURATION_FORMS = "a number of seconds or a duration such as 90s, 60m, 2h, 1h30m"


def parse_duration(text: str) -> float:
    """Seconds in a duration written as '90s', '60m', '2h', '1h30m', '1.5h' or a bare number of seconds."""
    match = re.fullmatch(r"\s*(?:([\d.]+)\s*h)?\s*(?:([\d.]+)\s*m)?\s*(?:([\d.]+)\s*s?)?\s*", text.lower())
    parts = match.groups() if match else (None,)
    try:
        if not any(parts):
            raise ValueError
        seconds = sum(float(p) * unit for p, unit in zip(parts, (3600, 60, 1), strict=True) if p)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration; give {DURATION_FORMS}") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{text!r} is not a positive, finite duration; give {DURATION_FORMS}")
    return seconds


class ReplayConfig(_Strict):
    """General data mixed into the training split (`data.replay`), so the model keeps what it knew.

    Two sources: a file of general examples (`{path: FILE}`, or just `FILE`), or `self`: the base
    model's own greedy answers to a shipped set of general prompts, generated once and cached under
    $TUNEKIT_HOME (train/self_replay.py), so no outside data is needed.
    """

    source: Literal["file", "self"] = Field(
        "file",
        description="file: the examples of `path`; self: the base model's own answers to general prompts "
        "(self-distillation; `data.replay: self` is short for {source: self}).",
    )
    path: Path | None = Field(
        None, description="source: file: the file of general examples (any supported format), e.g. alpaca."
    )
    ratio: float = Field(
        0.1, gt=0, le=1, description="Replay examples added, as a share of the training examples."
    )
    seed: Seed = Field(0, description="Seed of the draw from the replay examples.")
    prompts: Path | None = Field(
        None,
        description='source: self: a JSONL of {"prompt": ...} rows to answer instead of the shipped '
        "general prompts (data/general_prompts.jsonl).",
    )
    max_new_tokens: int = Field(
        128, gt=0, le=4096, description="source: self: the longest answer generated; longer ones are dropped."
    )

    @model_validator(mode="after")
    def _source_needs(self) -> ReplayConfig:
        if self.source == "file" and self.path is None:
            raise ValueError(
                "needs `path: FILE` (a file of general examples), or `source: self` "
                "(or just `data.replay: self`) for the base model's own answers"
            )
        if self.source == "self" and self.path is not None:
            raise ValueError(
                "path: not used with source: self (the base model answers general prompts); "
                "drop path, or drop source: self to replay the file; `prompts:` names "
                "other prompts"
            )
        if self.source == "file" and self.prompts is not None:
            raise ValueError("prompts: only used with source: self; drop it, or set source: self")
        return self


class DataConfig(_Strict):
    """Where the examples come from."""

    train: Path = Field(description="Training file (JSONL, JSON array or CSV).")
    validation: Path | None = Field(None, description="Validation file; omitted: split from train.")
    test: Path | None = Field(None, description="Held-out test file; omitted: split from train.")
    format: str = Field("auto", description=f"auto (detect it) or one of: {', '.join(FORMATS)}.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Rename source columns, e.g. {label: category}."
    )
    labels: list[str] | None = Field(
        None, description="The declared label set; a label outside it is a data error."
    )
    reasoning: Literal["train", "mask", "drop"] = Field(
        "train",
        description="Reasoning traces (`reasoning_content`, or a <think> block opening an assistant turn): "
        "train (the thinking carries loss like the answer), mask (kept in the context, no loss), or drop "
        "(removed). Evaluation scores the answer after the thinking either way.",
    )
    split: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/validation/test ratios used when files are omitted."
    )
    split_seed: Seed = Field(42, description="Seed of that split.")
    replay: ReplayConfig | None = Field(
        None,
        description="Mix general data into training against forgetting (task: sft): `self` (the base "
        "model's own answers to general prompts, cached), {source: self, ratio: 0.1}, a file "
        "(FILE or {path: FILE, ratio: 0.1}); null or false: none.",
    )
    streaming: bool = Field(
        False,
        description="Large data sets (task: sft, a JSONL train file): read the train file one row at a time, "
        "split it by a hash of each row's content, tokenize it into an on-disk store under the run's cache/ "
        "and memory-map that for training, so memory does not grow with the number of rows.",
    )

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_shorthand(cls, v: Any) -> Any:
        """`self` is {source: self}; any other string is a file, {path: FILE}; false is none."""
        if v is False:
            return None
        if isinstance(v, str):
            if v.strip().lower() in ("none", "off", "null", ""):
                return None
            return {"source": "self"} if v.strip() == "self" else {"path": v}
        return v

    @field_validator("split")
    @classmethod
    def _ratios(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"ratios must be non-negative and sum to 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _streaming_reads_jsonl(self) -> DataConfig:
        if self.streaming and self.train.suffix.lower() not in (".jsonl", ".ndjson"):
            raise ValueError(
                f"data.streaming reads the train file one JSON Lines row at a time, and {self.train} is not "
                "a .jsonl file; convert it to JSON Lines (one JSON object per line), or turn data.streaming off"
            )
        return self

    @model_validator(mode="after")
    def _streaming_trains_reasoning(self) -> DataConfig:
        if self.streaming and self.reasoning != "train":
            raise ValueError(
                f"data.reasoning: {self.reasoning} is not supported with data.streaming yet (the streamed "
                "train split is written row by row as read); use data.reasoning: train, or turn data.streaming off"
            )
        return self


class LoraConfig(_Strict):
    """LoRA adapter settings (PEFT)."""

    r: int = Field(16, gt=0, description="Rank of the update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or a list of module names, e.g. [q_proj, v_proj]."
    )
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude + direction).")


class DpoConfig(_Strict):
    """Direct preference optimisation (`task: dpo`)."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed label noise.")


class KtoConfig(_Strict):
    """Kahneman-Tversky optimisation (`task: kto`) on answers rated desirable or undesirable."""

    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference.")
    desirable_weight: float = Field(
        1.0, gt=0, description="Loss weight of desirable answers (raise it when they are the fewer)."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="Loss weight of undesirable answers (raise it when they are the fewer)."
    )


class OrpoConfig(_Strict):
    """Odds-ratio preference optimisation (`task: orpo`): SFT on the chosen answer plus a log-odds
    penalty, with no reference model."""

    beta: float = Field(
        0.1, gt=0, description="Weight of the odds-ratio term against the chosen answer's NLL (lambda)."
    )


class GraderConfig(_Strict):
    """One entry of `rl.graders` (train/graders.py): a score of each sampled completion against the
    example's reference answer. Only the fields of its `type` may be set."""

    type: Literal[
        "exact", "label", "numeric", "regex", "json_valid", "json_fields", "similarity", "python", "openai"
    ]
    weight: float = Field(1.0, gt=0, description="Its weight in the weighted mean of the graders' scores.")
    name: str | None = Field(
        None, description="Its name in metrics; null: the OpenAI spec's name, else the type."
    )
    ignore_case: bool = Field(False, description="exact: compare case-insensitively.")
    tolerance: float = Field(1e-6, ge=0, description="numeric: allowed difference, relative beyond 1.")
    pattern: str | None = Field(
        None, description="regex: a Python regular expression searched in the completion."
    )
    json_schema: Path | dict[str, Any] | None = Field(
        None, description="json_valid: a JSON schema (inline, or a .json file) the completion must satisfy."
    )
    metric: str = Field(
        "fuzzy_match", description="similarity: fuzzy_match, bleu, gleu, rouge_1..rouge_5, rouge_l."
    )
    function: str | None = Field(
        None, description="python: module:function, called as f(completion, reference)."
    )
    spec: dict[str, Any] | None = Field(
        None, description="openai: OpenAI's grader JSON (string_check, text_similarity, score_model, multi)."
    )

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> GraderConfig:
        from tunekit.train.graders import check_entry  # light: re, json, ast

        check_entry(self.model_dump(exclude_defaults=True) | {"type": self.type})
        return self


class RlConfig(_Strict):
    """Policy optimisation against a reward model (`task: rl`), the last stage of classic RLHF, or
    against programmable graders (`graders`).

    With `policy` and `reward_model` left null the run chains all three stages in one run
    directory: SFT on the preferred responses, a reward model on the pairs, then RL. With `graders`
    no reward model is trained: the reward is the graders' weighted score of each completion
    against the example's reference answer, and the data may be conversations or pairs.
    """

    algorithm: Literal["grpo", "rloo"] = Field("grpo", description="TRL's on-policy trainer to use.")
    policy: Path | None = Field(None, description="Run dir of an SFT run to start from; null: train one.")
    reward_model: Path | None = Field(None, description="Run dir of a `task: reward` run; null: train one.")
    graders: list[GraderConfig] | None = Field(
        None,
        description="Reward from graders instead of a reward model: each completion's weighted score against "
        "the reference (a conversation's last assistant message, or a pair's chosen answer).",
    )
    grader_timeout: float = Field(
        5.0, gt=0, description="Seconds one grader may take on one completion; past it the sample scores 0."
    )
    kl_coef: float = Field(0.05, ge=0, description="Weight of the KL penalty to the reference policy.")
    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt.")
    max_new_tokens: int = Field(48, gt=0, description="Length limit of each sampled completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for the completions.")
    max_prompts: int | None = Field(None, gt=0, description="Use only the first N training prompts.")

    @model_validator(mode="after")
    def _graders_or_reward_model(self) -> RlConfig:
        if self.graders is None:
            return self
        if not self.graders:
            raise ValueError("rl.graders: an empty list; give one grader or more, or null for a reward model")
        if self.reward_model is not None:
            raise ValueError(
                "rl.reward_model: not used with rl.graders (they are the reward); drop one of them"
            )
        from tunekit.train.graders import entry_name

        names = [entry_name(g.model_dump(exclude_defaults=True) | {"type": g.type}) for g in self.graders]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"rl.graders: two graders are named {dup!r}; give each a distinct `name`")
        return self


class TrainConfig(_Strict):
    """Optimisation."""

    epochs: float = Field(3, gt=0, description="Passes over the training set (fractions allowed).")
    learning_rate: float = Field(2.0e-4, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    max_length: int = Field(512, gt=8, description="Tokens per example; longer ones are cut (reported).")
    seed: Seed = Field(42, description="Seed for weights init, data order and dropout (0 .. 2**32 - 1).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null turns it off.")
    log_every: int = Field(1, gt=0, description="Write metrics.jsonl every N steps.")
    eval_every: int | None = Field(
        None, gt=0, description="Validation loss every N steps; null: at each epoch end."
    )
    save_steps: int | None = Field(
        None, gt=0, description="Checkpoint every N steps (and always at the end); null: at each epoch end."
    )
    save_total_limit: int | None = Field(2, gt=0, description="Keep the newest N checkpoints; null: all.")
    # bool before int: YAML `true` stays True (every layer), not the int 1 (the same thing anyway).
    gradient_checkpointing: bool | int = Field(
        False,
        description="Recompute activations in backward: true checkpoints every decoder layer (far less "
        "memory, about a third slower); an integer N checkpoints every Nth layer only (selective: "
        "2 saves about a sixth of the peak for a fifth of the speed on the default model).",
    )
    lean_activations: bool = Field(
        True,
        description="Recompute each decoder layer's norm outputs and MLP activation products in backward "
        "instead of keeping them (pointwise ops, no matmul): about 40% less activation memory, same "
        "gradients bit for bit, a few percent of the step's time. Layers under gradient checkpointing "
        "are left to it.",
    )
    padding_free: bool = Field(
        False,
        description="SFT: run each batch as one row of its examples' real tokens, attention kept within "
        "each example (position ids restart, SDPA per example), instead of a padded (batch x longest) "
        "block: no compute on padding and no attention mask. Same loss up to float rounding. Measured "
        "0.99x the padded speed on alpaca, whose length-grouped batches are 4% padding: it can pay only "
        "where batches hold much more padding. Models whose attention is not SDPA keep padded batches; "
        "off under train.compile.",
    )
    loss_chunk_tokens: int | None = Field(
        256,
        gt=0,
        description="SFT: project onto the vocabulary and take the loss gradient this many target tokens "
        "at a time, so the (tokens x vocabulary) logits never exist at once (about 0.3 GB a 1,500-token "
        "batch on the default model, three times over); null: all at once. Measured at the same speed "
        "and loss as null, with 6% less peak memory on alpaca's longer rows (BENCHMARKS.md).",
    )
    compile: bool = Field(
        False,
        description="torch.compile (inductor, dynamic shapes) each decoder layer, forward and backward. "
        "Measured on this 2-core CPU with LoRA against the default (lean activations, which it "
        "replaces): 10-21% less peak memory, 0.95-1.08x the tokens/s, the same losses, once compiled; "
        "the first run on a machine compiles for 1-2 minutes (inductor caches the result). Needs a C++ "
        "compiler on the CPU, triton on CUDA. TRL's RL stage (task: rl, stage 3) runs uncompiled.",
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop after N validations without a lower validation loss, and keep the best weights.",
    )
    time_budget: float | None = Field(
        None,
        gt=0,
        description="Wall-clock time the training loop may take (steps, validation passes and checkpoints; "
        "not loading the model or saving it at the end): '90s', '60m', '2h', '1h30m' or seconds. The first "
        "steps are timed, then the run is cut to the steps that fit (the learning-rate schedule ending at "
        "the new last step) and validation spaced to take at most a tenth of it; a hard stop at the "
        "deadline saves a checkpoint. The config's epochs / max_steps stay the most it trains.",
    )
    init_from: Path | None = Field(
        None, description="Start from the weights of an earlier run directory (`tunekit train --from`)."
    )

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool) and not 0 < v < float("inf"):
            raise ValueError(f"{v} seconds: the budget must be finite and above 0; give {DURATION_FORMS}")
        return parse_duration(v) if isinstance(v, str) else v

    @field_validator("gradient_checkpointing")
    @classmethod
    def _every_n_layers(cls, v: bool | int) -> bool | int:
        if not isinstance(v, bool) and v < 1:
            raise ValueError(f"{v} layers: give true (every layer), false (off), or N >= 1 (every Nth layer)")
        return v

    @property
    def checkpoint_every(self) -> int:
        """Every how many decoder layers activations are recomputed; 0: never."""
        g = self.gradient_checkpointing
        return int(g) if not isinstance(g, bool) else (1 if g else 0)


class EvalConfig(_Strict):
    """Held-out evaluation (`tunekit eval`)."""

    batch_size: int = Field(16, gt=0, description="Examples per generation batch.")
    max_new_tokens: int | None = Field(
        None, gt=0, description="Tokens to generate; null: longest test target + 16."
    )
    max_examples: int | None = Field(None, gt=0, description="Evaluate only the first N test examples.")
    show_examples: int = Field(5, ge=0, description="Side-by-side examples in report.md.")
    few_shot: int = Field(
        3, ge=0, description="Train examples shown to the `base_few_shot` contender; 0 leaves it out."
    )
    metrics: list[str] | None = Field(
        None,
        description="Metric names (exact_match, accuracy, macro_f1, numeric_match, rouge_l, bleu, json_valid, "
        "field_accuracy, tool_call_match, tool_call_name, tool_call_valid) or 'module:function' callables; "
        "null: chosen from the references.",
    )
    probe: str | None = Field(
        "builtin",
        description="Forgetting probe: 'builtin', an MMLU-style CSV, a folder of them, or a JSONL of "
        "{question, answer}; null turns it off.",
    )
    probe_max_questions: int | None = Field(
        200, gt=0, description="Questions drawn from each probe part (multiple choice, open); null: all."
    )
    label_scoring: bool = Field(
        True,
        description="Label data (every test reference one of data.labels or the training labels): predict "
        "the most likely label, scored as the reply (one forward pass per example, every prediction a "
        "valid label); false: free generation (`tunekit eval --generate`).",
    )
    # The verdict (eval/verdict.py): prompting or fine-tuning, priced.
    price_per_hour: float = Field(
        2.0,
        ge=0,
        description="Price of one hour of the hardware that trains and serves (default 2.0, about a rented "
        "24 GB GPU): the run's training cost is its wall time x this; serving too when "
        "price_per_1k_tokens is null (measured seconds per request x this).",
    )
    price_per_1k_tokens: float | None = Field(
        None,
        ge=0,
        description="Serving price per 1,000 tokens (prompt + completion, as measured on the test set); "
        "null: serving is priced per hour (price_per_hour).",
    )
    verdict_margin: float = Field(
        0.02,
        ge=0,
        description="The verdict's margin in the task metric's units (0.02: 2 points of accuracy): a gain "
        "below it is not worth fine-tuning, and prompting whose 95% CI lies within it is as good.",
    )
    verdict_alpha: float = Field(
        0.05, gt=0, lt=1, description="The verdict's significance level for the paired test."
    )
    expected_requests: int | None = Field(
        None,
        gt=0,
        description="Requests you expect to serve: where prompting is as good, fine-tuning is still "
        "recommended when it pays back (break-even volume) before this many; null: not considered.",
    )
    gate_margin: float = Field(
        0.02,
        ge=0,
        description="`tunekit eval --compare OLD NEW --gate`: NEW may be worse than OLD on the old test set "
        "and on the probe by less than this (the 95% CI's lower end stays above -gate_margin), in the "
        "task metric's units.",
    )


class DistributedConfig(_Strict):
    """Several processes or machines (`tunekit train CONFIG --nproc N`); one process ignores it."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; gradients are averaged. fsdp: FSDP2 shards "
        "each decoder layer and the rest (weights, gradients, AdamW state) over the processes "
        "(method: qlora too, its 4-bit weights stored as floats).",
    )

    @field_validator("strategy", mode="before")
    @classmethod
    def _no_deepspeed(cls, v):
        if v == "deepspeed":
            raise ValueError(
                "deepspeed is not supported (tunekit does not drive DeepSpeed); use ddp, or fsdp to shard "
                "the weights, gradients and optimizer state over the processes"
            )
        return v


class Config(_Strict):
    """A whole run: model, method, data, LoRA, training, evaluation and where it goes."""

    model: str = Field("smollm2-135m-instruct", description="Alias, local HF folder or hub id.")
    method: Literal["full", "lora", "qlora"] = Field(
        "lora", description="full: every weight; lora: adapters; qlora: adapters on a 4-bit NF4 base."
    )
    task: str = Field(
        "sft",
        description=f"What to train, a row of the task table (tasks.py): {', '.join(task_names())}.",
    )
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    kto: KtoConfig = Field(default_factory=KtoConfig)
    orpo: OrpoConfig = Field(default_factory=OrpoConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output_dir: Path = Field(Path("runs/run"), description="The run directory.")
    chat_template: str | None = Field(
        None,
        description="How conversations become text: null uses the model's own template, or for a base "
        "model without one a default (models/templates.py); a built-in (chatml, llama3, gemma, mistral, "
        "qwen, phi3, completion) or a .jinja file overrides it.",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from tunekit.models.templates import check_spec  # imports torch: only when the key is set

        return check_spec(v)

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in task_names():
            near = difflib.get_close_matches(v, task_names(), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"unknown task {v!r}; {hint}one of {', '.join(task_names())}")
        return v

    @model_validator(mode="after")
    def _model_nonempty(self) -> Config:
        if not self.model.strip():
            raise ValueError("model: must name an alias, a local folder or a hub id")
        return self


# ---------------------------------------------------------------------------------------------
# The identity of a run: what a checkpoint depends on


# Keys a resumed run may change, because its checkpoints do not depend on them: where the run
# lives; evaluation; how a step is computed (the same maths, up to rounding); logging and saving;
# how the global batch is laid out over processes (the global batch itself, batch_size x
# grad_accum x processes, is compared instead, so 2 processes x 4 resume as 1 x 8); and the
# length of the plan (a run may be extended: the schedule follows the new plan, with a warning).
RESUME_MAY_CHANGE = (
    "output_dir",
    "eval",
    "distributed",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.log_every",
    "train.save_steps",
    "train.save_total_limit",
    "train.gradient_checkpointing",
    "train.lean_activations",
    "train.padding_free",
    "train.loss_chunk_tokens",
    "train.compile",
    "train.time_budget",
)


def run_identity(cfg: Config, global_batch: int) -> dict:
    """The resolved config as far as a checkpoint depends on it, plus the global batch: a checkpoint
    stores it, and resume refuses a checkpoint whose identity differs from the config's."""
    d = cfg.model_dump(mode="json")
    for key in RESUME_MAY_CHANGE:
        section, _, name = key.partition(".")
        (d[section] if name else d).pop(name or section, None)
    d["train"]["global_batch"] = global_batch
    return d


def identity_hash(identity: dict) -> str:
    """sha256 of the identity's canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_differences(then: dict, now: dict, prefix: str = "") -> list[str]:
    """Every dotted key whose value differs, as 'key: THEN -> NOW'."""
    out = []
    for key in sorted(set(then) | set(now), key=str):
        a, b = then.get(key, "(absent)"), now.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short_repr(a, 60)} -> {_short_repr(b, 60)}")
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def _valid_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names valid at `path` (the parent of a bad key), for 'did you mean'."""
    for part in path:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


# Names other tools use for our keys, so "did you mean" finds them too.
_ALIASES = {
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "max_seq_length": "max_length",
    "sequence_len": "max_length",
    "output": "output_dir",
    "base_model": "model",
    "model_name_or_path": "model",
    "finetuning_type": "method",
    "stage": "task",
    "pref_beta": "beta",
    "dpo_beta": "beta",
    "num_labels": "labels",
}


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(Config, loc[:-1])
            key = _ALIASES.get(str(loc[-1]), str(loc[-1]))
            near = [key] if key in valid else difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), near[0]])}'?" if near else ""
            problems.append(f"{dotted}: unknown key{hint} (valid here: {', '.join(valid)})")
        elif e["type"] == "missing":
            problems.append(f"{dotted}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{dotted}: {msg} (got {_short_repr(e.get('input'))})")
    return problems


def _short_repr(value: Any, limit: int = 120) -> str:
    """A value as the user wrote it, cut short: a hostile config must not flood the terminal."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _apply_override(raw: dict[str, Any], item: str) -> str | None:
    """Apply one `a.b.c=value` override in place; returns a problem string or None."""
    if "=" not in item:
        return f"--set {item!r}: expected KEY=VALUE, e.g. --set train.max_steps=5"
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for p in parts[:-1]:
        if not isinstance(node.get(p, {}), dict):
            return f"--set {key}: '{p}' is not a section"
        node = node.setdefault(p, {})
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        return f"--set {key}: value {text!r} is not valid YAML ({e})"
    return None


def config_from_dict(raw: dict[str, Any], overrides: list[str] = (), source: str = "config") -> Config:
    """Validate a config dict (plus `--set` overrides). Raises ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of keys, got {type(raw).__name__}"], source)
    raw = _deep_copy(raw)
    problems = [p for p in (_apply_override(raw, o) for o in overrides) if p]
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        problems += _format_errors(e)
        cfg = None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML config file and validate it. Errors name the file and each dotted key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"no such file: {path}"], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid YAML: {e}"], str(path)) from None
    except RecursionError:
        raise ConfigError(["not a usable config: nested too deeply"], str(path)) from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise ConfigError([f"not a usable config: {e}"], str(path)) from None
    except OSError as e:
        raise ConfigError([f"cannot read the file ({e.strerror})"], str(path)) from None
    return config_from_dict(raw, overrides, source=str(path))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config (every default filled in), as written into the run directory."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d
