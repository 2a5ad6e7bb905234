"""OpenAI's fine-tuning jobs API on `tunekit serve --enable-fine-tuning`.

    POST /v1/fine_tuning/jobs                  create: model, training_file, validation_file, suffix,
                                               seed, hyperparameters, method (supervised | dpo)
    GET  /v1/fine_tuning/jobs                  list, newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}             retrieve
    POST /v1/fine_tuning/jobs/{id}/cancel      cancel (a running job stops at its next step, cleanly)
    GET  /v1/fine_tuning/jobs/{id}/events      events, newest first (after, limit)
    GET  /v1/fine_tuning/jobs/{id}/checkpoints the run's checkpoints, newest first

A job maps onto a tunekit config: method `supervised` is task sft, `dpo` task dpo (OpenAI's DPO
rows are a format tunekit reads), `reinforcement` task rl with its grader as `rl.graders: [{type:
openai, spec: GRADER}]` (an SFT stage, then GRPO; `{{item.reference}}` is each row's last assistant
message, the only item field tunekit's graders see). `n_epochs` -> train.epochs, `batch_size` ->
train.batch_size, `learning_rate_multiplier` times the base learning rate -> train.learning_rate,
`beta` -> dpo.beta, `seed` -> train.seed; "auto" leaves tunekit's default. The server's
`--fine-tune-config YAML` gives every job's other keys (method lora/full, lora rank, max_length,
rl.num_generations, ...). The whole training file is trained on (no split); a validation file is
validated on. An rl job cannot resume: after a server restart it starts over.

Jobs run one at a time in ft_worker.Worker, each in its own process; the finished model is served
at once under `ft:BASE:SUFFIX:ID` (ID: the job id's first 8 hex digits).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunekit.errors import TunekitError
from tunekit.ship import ft_store, openai_files
from tunekit.ship.api import APIError, Served, _invalid, _Limits

BAD = "invalid_request_error"
TASKS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "rl"}
MAX_LIST = 100  # OpenAI's largest `limit`

Auto = Literal["auto"]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Forbid):
    batch_size: Auto | Annotated[int, Field(strict=True, ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = "auto"
    n_epochs: Auto | Annotated[int, Field(strict=True, ge=1, le=50)] = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] = "auto"


class _Supervised(_Forbid):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class _Dpo(_Forbid):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class _Reinforcement(_Forbid):
    grader: dict  # OpenAI's grader JSON, checked by tunekit's rl.graders (train/graders.py)
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class Method(_Forbid):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _Supervised | None = None
    dpo: _Dpo | None = None
    reinforcement: _Reinforcement | None = None


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # integrations (wandb) and the like are not used here

    model: str = Field(min_length=1)
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    seed: int | None = Field(None, strict=True, ge=0, le=2**32 - 1)
    hyperparameters: SupervisedHyperparameters | None = None  # OpenAI's older, supervised-only form
    method: Method | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None


# --- from the request to a tunekit config ---------------------------------------------------------


def known_model(spec: str) -> None:
    """A 400 unless `spec` is a model this machine has without downloading: an alias or a folder."""
    from tunekit.models.load import ALIASES, ASSEMBLED

    path = Path(spec).expanduser()
    if spec in ALIASES or spec in ASSEMBLED or (path.is_dir() and (path / "config.json").is_file()):
        return
    raise APIError(
        400,
        f"model: '{spec}' is not a base model this server can fine-tune; give one of {', '.join(ALIASES)} "
        "or the path of a Hugging Face model folder on the server",
        BAD,
        "model",
        "model_not_available",
    )


def method_of(req: JobRequest) -> tuple[str, SupervisedHyperparameters]:
    """(method type, its hyperparameters), or a 400 for what tunekit cannot train."""
    method = req.method or Method(type="supervised")
    if method.type == "reinforcement" and method.reinforcement is None:
        raise APIError(
            400, "method.reinforcement.grader: missing; give the grader that scores each sample", BAD,
            "method.reinforcement.grader",
        )  # fmt: skip
    given = getattr(method, method.type)
    if method.type == "supervised" and req.hyperparameters is not None:
        if given is not None and req.method.supervised.hyperparameters.model_fields_set:
            raise APIError(
                400,
                "hyperparameters: give them in method.supervised.hyperparameters or at the top level, not both",
                BAD,
                "hyperparameters",
            )
        return "supervised", req.hyperparameters
    default = SupervisedHyperparameters() if method.type == "supervised" else DpoHyperparameters()
    return method.type, given.hyperparameters if given is not None else default


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def job_config(
    req: JobRequest, kind: str, hp, seed: int, files: dict[str, Path], run_dir: Path, defaults: dict
) -> dict:
    """The config dict the job trains with (checked by config_from_dict: a ConfigError is a 400)."""
    from tunekit.config import TrainConfig, config_from_dict

    train: dict = {"seed": seed}
    if hp.n_epochs != "auto":
        train["epochs"] = hp.n_epochs
    if hp.batch_size != "auto":
        train["batch_size"] = hp.batch_size
    if hp.learning_rate_multiplier != "auto":
        base_lr = defaults.get("train", {}).get(
            "learning_rate", TrainConfig.model_fields["learning_rate"].default
        )
        train["learning_rate"] = base_lr * hp.learning_rate_multiplier
    data = {"train": str(files["training_file"]), "split": [1.0, 0.0, 0.0]}
    if "validation_file" in files:
        data["validation"] = str(files["validation_file"])
    job = {"model": req.model, "task": TASKS[kind], "data": data, "train": train, "output_dir": str(run_dir)}
    if isinstance(hp, DpoHyperparameters) and hp.beta != "auto":  # OpenAI's dpo method: its beta
        job["dpo"] = {"beta": hp.beta}
    if kind == "reinforcement":  # the reference of `{{item.reference}}`: each row's last assistant message
        job["rl"] = {"graders": [{"type": "openai", "spec": req.method.reinforcement.grader}]}
    raw = _merge(defaults, job)
    try:
        config_from_dict(raw, source="fine-tuning job")
    except TunekitError as e:  # a grader tunekit cannot build, or hyperparameters its config refuses
        param = "method.reinforcement.grader" if "rl.graders" in str(e) else "hyperparameters"
        raise APIError(400, str(e), BAD, param) from None
    return raw


JOB_KEYS = ("model", "task", "data", "output_dir")  # what each job sets itself


def read_defaults(path: Path | None) -> dict:
    """The keys every job trains with (`--fine-tune-config YAML`), checked now, not at the first job."""
    import yaml

    from tunekit.config import config_from_dict
    from tunekit.errors import ConfigError

    if path is None:
        return {}
    source = f"--fine-tune-config {path}"
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"cannot read it: {e}"], source) from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"the top level must be a mapping of config keys, got {type(raw).__name__}"], source
        )
    taken = [k for k in JOB_KEYS if k in raw]
    if taken:
        raise ConfigError(
            [
                f"{k}: set by each job (model, training and validation files), not by the server; drop it"
                for k in taken
            ],
            source,
        )
    config_from_dict(raw | {"data": {"train": "every-job.jsonl"}}, source=source)  # names and types
    return raw


def resolved(hp: SupervisedHyperparameters, raw: dict, defaults: dict) -> dict:
    """The job's hyperparameters as OpenAI reports them: "auto" replaced by what the job trains with."""
    from tunekit.config import TrainConfig, config_from_dict

    cfg = config_from_dict(raw, source="fine-tuning job")
    base_lr = defaults.get("train", {}).get(
        "learning_rate", TrainConfig.model_fields["learning_rate"].default
    )
    epochs = cfg.train.epochs
    chosen = {
        "n_epochs": int(epochs) if float(epochs).is_integer() else epochs,
        "batch_size": cfg.train.batch_size,
        "learning_rate_multiplier": cfg.train.learning_rate / base_lr,
        "beta": cfg.dpo.beta,
    }
    return {k: chosen[k] if v == "auto" else v for k, v in hp.model_dump().items()}


def check_file(file_id: str, param: str, task: str) -> Path:
    """The stored path of an uploaded file the job can train on, or a 400 saying why not."""
    from tunekit.data import read_examples
    from tunekit.data.needs import require
    from tunekit.tasks import get_task

    row = ft_store.get_file(file_id)
    if row is None:
        raise APIError(
            400,
            f"{param}: no such file: {file_id} (upload it with POST /v1/files)",
            BAD,
            param,
            "invalid_file",
        )
    if row["purpose"] != openai_files.PURPOSE:
        raise APIError(400, f"{param}: {file_id} has purpose {row['purpose']!r}, not 'fine-tune'", BAD, param)
    try:
        examples, _ = read_examples(row["path"])
        require(get_task(task).data, examples, param, task)
    except TunekitError as e:
        message = str(e).replace(row["path"], row["filename"])
        raise APIError(
            400, f"{param}: {row['filename']} ({file_id}): {message}", BAD, param, "invalid_file"
        ) from None
    return Path(row["path"])


# --- OpenAI's objects -----------------------------------------------------------------------------


def job_object(job: dict) -> dict:
    req = job["request"]
    method = req["method"]
    hp = method[method["type"]]["hyperparameters"]
    return {
        "object": "fine_tuning.job",
        "id": job["id"],
        "model": req["model"],
        "created_at": job["created"],
        "finished_at": job["finished"],
        "fine_tuned_model": job["fine_tuned_model"],
        "organization_id": "tunekit",
        "result_files": [],
        "status": job["status"],
        "validation_file": req["validation_file"],
        "training_file": req["training_file"],
        "hyperparameters": {k: hp[k] for k in ("batch_size", "learning_rate_multiplier", "n_epochs")},
        "trained_tokens": job["trained_tokens"],
        "error": job["error"],
        "seed": req["seed"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": req["metadata"],
        "method": method,
        "user_provided_suffix": req["suffix"],
    }


def checkpoints(job: dict) -> list[dict]:
    """The run's checkpoints as OpenAI's checkpoint objects, newest first, with that step's metrics."""
    from tunekit.train.checkpoint import list_checkpoints

    run_dir = Path(job["run_dir"])
    records = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
                records[r["step"]] = r
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash: that step just has no metrics here
    out = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        step = int(ckpt.name.split("-")[-1])
        r = records.get(step, {})
        out.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-{job['id'].removeprefix('ftjob-')}-{step}",
                "created_at": int(ckpt.stat().st_mtime),
                "fine_tuned_model_checkpoint": f"{ft_store.model_name(job)}:ckpt-step-{step}",
                "fine_tuning_job_id": job["id"],
                "step_number": step,
                "metrics": {
                    "step": float(step),
                    "train_loss": r.get("loss"),
                    "valid_loss": r.get("val_loss"),
                },
            }
        )
    return out


# --- the API --------------------------------------------------------------------------------------


class FineTuning:
    """The fine-tuning API and its worker, for `create_app(..., fine_tuning=FineTuning(...))`.

    `defaults`: the config keys every job trains with besides the ones the job sets (the server's
    --fine-tune-config). `stop_timeout_s`: how long a stopping server waits for the running job to
    checkpoint after SIGTERM before it kills it."""

    def __init__(self, defaults: dict | None = None, stop_timeout_s: float = 120.0):
        from tunekit.ship.ft_worker import Worker

        self.defaults = defaults or {}
        self.served: dict[str, Served] = {}
        self.limits: dict = {}
        self.worker = Worker(self._publish, stop_timeout_s)

    def attach(self, app, served: dict[str, Served], limits: dict) -> None:
        """Add the routes; serve every model earlier jobs fine-tuned."""
        from tunekit.console import err

        self.served, self.limits = served, limits
        for job in ft_store.succeeded_jobs():
            try:
                self._publish(job)
            except Exception as e:  # e.g. its run directory was deleted: serve the others
                err.print(
                    f"[yellow]not serving {job['fine_tuned_model']} ({job['run_dir']}): {type(e).__name__}: {e}"
                )
        _routes(app, self)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def _publish(self, job: dict) -> None:
        """Serve a succeeded job's model under its ft: name (the worker calls this when it ends)."""
        from tunekit.train.setup import load_trained

        name = job["fine_tuned_model"]
        model, tokenizer, _ = load_trained(job["run_dir"])
        s = Served(name, Path(job["run_dir"]), model, tokenizer, None, job["finished"] or int(time.time()))
        self.limits[name] = _Limits(s)
        self.served[name] = s  # last: a request finds the model only once its limits are there

    def create(self, body: bytes) -> dict:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise APIError(400, f"the body is not valid JSON: {e}", BAD) from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object (the fine-tuning job)", BAD)
        try:
            req = JobRequest.model_validate(data)
        except ValidationError as e:
            raise _invalid(e) from None
        known_model(req.model)
        kind, hp = method_of(req)
        task = TASKS[kind]
        files = {"training_file": check_file(req.training_file, "training_file", task)}
        if req.validation_file is not None:
            files["validation_file"] = check_file(req.validation_file, "validation_file", task)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        job_id = ft_store.new_id("ftjob-")
        run_dir = ft_store.home() / "jobs" / job_id
        config = job_config(req, kind, hp, seed, files, run_dir, self.defaults)
        hp_out = resolved(hp, config, self.defaults)
        method = {"type": kind, kind: {"hyperparameters": hp_out}}
        if kind == "reinforcement":
            method[kind]["grader"] = req.method.reinforcement.grader
        request = req.model_dump() | {"seed": seed, "method": method}
        request.pop("hyperparameters")
        ft_store.add_job(job_id, request, config, run_dir, "validating_files")
        ft_store.add_event(job_id, f"Validating training file: {req.training_file}")
        ft_store.update_job(job_id, status="queued")
        ft_store.add_event(job_id, "Files validated, moving job to queued state")
        self.worker.wake()
        return job_object(ft_store.get_job(job_id))

    def cancel(self, job_id: str) -> dict:
        job = find_job(job_id)
        if job["status"] in ft_store.FINAL:
            raise APIError(
                400,
                f"Job {job_id} has already {job['status']}; only a queued or running job can be cancelled",
                BAD,
            )
        ft_store.request_cancel(job_id)
        if ft_store.get_job(job_id)["status"] == "cancelled":
            ft_store.add_event(job_id, "Job was cancelled before it started")
        self.worker.wake()
        return job_object(ft_store.get_job(job_id))


def find_job(job_id: str) -> dict:
    job = ft_store.get_job(job_id)
    if job is None:
        raise APIError(
            404, f"Could not find fine-tuning job {job_id}", BAD, "fine_tuning_job_id", "not_found"
        )
    return job


def _page(limit: int) -> int:
    if not 1 <= limit <= MAX_LIST:
        raise APIError(400, f"limit: must be 1 to {MAX_LIST}, got {limit}", BAD, "limit")
    return limit


def _routes(app, ft: FineTuning) -> None:
    openai_files.add_routes(app, asyncio.to_thread)

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        return await asyncio.to_thread(ft.create, await request.body())

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20):
        jobs, more = ft_store.list_jobs(after, _page(limit))
        return {"object": "list", "data": [job_object(j) for j in jobs], "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str):
        return job_object(find_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        return ft.cancel(job_id)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = None, limit: int = 20):
        find_job(job_id)
        events, more = ft_store.list_events(job_id, after, _page(limit))
        return {"object": "list", "data": events, "has_more": more}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        found = checkpoints(find_job(job_id))
        if after is not None:
            ids = [c["id"] for c in found]
            found = found[ids.index(after) + 1 :] if after in ids else []
        limit = _page(limit)
        return {
            "object": "list",
            "data": found[:limit],
            "has_more": len(found) > limit,
            "first_id": found[0]["id"] if found else None,
            "last_id": found[:limit][-1]["id"] if found else None,
        }
