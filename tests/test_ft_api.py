"""The OpenAI fine-tuning API of `tunekit serve --enable-fine-tuning`, driven end to end by the
official `openai` client on a real server: upload files (a bad one refused by line), fine-tune a
tiny model (supervised and DPO), poll to success, read events and checkpoints, chat with the `ft:`
model, cancel a job mid-run, and restart the server mid-job and see the job finish from its
checkpoint. Each job trains for real, in its own process."""

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import free_port, jsonl, make_tiny, running
from tunekit.errors import TunekitError
from tunekit.ship.ft_jobs import FineTuning
from tunekit.ship.serve import create_app

openai = pytest.importorskip("openai")

# Every job's other config keys (the server's --fine-tune-config): 24 rows at batch 4 are 6 steps
# an epoch; n_epochs sets each job's length.
DEFAULTS = {
    "method": "lora",
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "train": {"learning_rate": 2e-3, "batch_size": 4, "max_length": 64, "save_steps": 6, "warmup_ratio": 0.0},
    "rl": {"num_generations": 2, "max_new_tokens": 4},
}
ASK = [{"role": "user", "content": "question 3?"}]


class Server:
    """A fine-tuning server that a test can stop and start again over the same $TUNEKIT_HOME."""

    def __init__(self):
        self.ctx = None
        self.client = None

    def start(self):
        app = create_app({}, fine_tuning=FineTuning(DEFAULTS, stop_timeout_s=60))
        self.ctx = running(app)
        url = self.ctx.__enter__()
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    def stop(self):
        self.ctx.__exit__(None, None, None)


@pytest.fixture(scope="module")
def base(tokenizer, tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("ft-base"), tokenizer)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(tmp_path_factory.mktemp("ft-home")))
        srv = Server()
        srv.start()
        yield srv
        srv.stop()


@pytest.fixture(scope="module")
def chat_file(server, tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": "OK"}]}
            for i in range(24)]  # fmt: skip
    path = tmp_path_factory.mktemp("ft-data") / "ok.jsonl"
    path.write_text(jsonl(*rows))
    with path.open("rb") as f:
        return server.client.files.create(file=f, purpose="fine-tune")


def wait(client, job_id: str, statuses: tuple[str, ...], timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
    raise AssertionError(f"job {job_id} is {job.status} after {timeout}s, not {statuses}; events: {events}")


def test_upload_refuses_a_bad_file_naming_the_line(server, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(good) + '{"messages": [{"role": "user", "content": "hi"}\n' + jsonl(good))
    with pytest.raises(openai.BadRequestError) as e, path.open("rb") as f:
        server.client.files.create(file=f, purpose="fine-tune")
    assert "bad.jsonl:2" in e.value.message and "1 of 3 rows" in e.value.message
    assert e.value.body["code"] == "invalid_file"
    with pytest.raises(openai.BadRequestError, match="purpose"), path.open("rb") as f:
        server.client.files.create(file=f, purpose="batch")
    assert [f.filename for f in server.client.files.list()] == []  # nothing refused was kept


def test_files_upload_list_retrieve_content_delete(server, tmp_path):
    path = tmp_path / "one.jsonl"
    content = jsonl({"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]})
    path.write_text(content)
    with path.open("rb") as f:
        uploaded = server.client.files.create(file=f, purpose="fine-tune")
    assert (
        uploaded.filename == "one.jsonl"
        and uploaded.bytes == len(content)
        and uploaded.purpose == "fine-tune"
    )
    assert uploaded.id in [f.id for f in server.client.files.list()]
    assert server.client.files.retrieve(uploaded.id).filename == "one.jsonl"
    assert server.client.files.content(uploaded.id).text == content
    assert server.client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        server.client.files.retrieve(uploaded.id)


def test_a_second_server_over_the_same_home_is_refused(server):
    with pytest.raises(TunekitError, match="another `tunekit serve --enable-fine-tuning` runs"):
        FineTuning(DEFAULTS)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "give at least one run directory"),
        (["--fine-tune-config", "jobs.yaml"], "give --enable-fine-tuning too"),
    ],
)
def test_serve_without_the_jobs_api_needs_a_model_and_takes_no_job_config(args, says, tmp_path):
    cmd = [sys.executable, "-m", "tunekit", "serve", *args]
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"TUNEKIT_HOME": str(tmp_path)}
    )
    assert done.returncode != 0 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_bad_jobs_are_openai_style_400s(server, base, chat_file):
    jobs = server.client.fine_tuning.jobs
    with pytest.raises(openai.BadRequestError) as e:
        jobs.create(model="no-such-model", training_file=chat_file.id)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_available"
    with pytest.raises(openai.BadRequestError) as e:
        jobs.create(model=str(base), training_file=chat_file.id, hyperparameters={"n_epochs": 0})
    assert "n_epochs" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        jobs.create(model=str(base), training_file="file-nope")
    assert e.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError) as e:  # chat rows are no preference pairs
        jobs.create(model=str(base), training_file=chat_file.id, method={"type": "dpo"})
    assert e.value.body["param"] == "training_file" and "pairs" in e.value.message
    grader = {
        "type": "string_check",
        "name": "ok",
        "input": "{{sample.output_text}}",
        "reference": "OK",
        "operation": "zz",
    }
    with pytest.raises(openai.BadRequestError) as e:
        jobs.create(
            model=str(base), training_file=chat_file.id,
            method={"type": "reinforcement", "reinforcement": {"grader": grader}},
        )  # fmt: skip
    assert "operation" in e.value.message and e.value.body["param"] == "method.reinforcement.grader"
    assert jobs.list().data == []


def test_supervised_job_trains_and_its_ft_model_is_served(server, base, chat_file):
    client = server.client
    job = client.fine_tuning.jobs.create(
        model=str(base),
        training_file=chat_file.id,
        validation_file=chat_file.id,
        suffix="ok",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 5, "learning_rate_multiplier": 10}},
        },
    )
    assert job.status == "queued" and job.seed == 7 and job.method.type == "supervised"
    hp = job.hyperparameters  # "auto" reported as what the job trains with (the server's batch_size)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (5, 4, pytest.approx(10))
    done = wait(client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{base.name}:ok:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert messages[0] == "The job has successfully completed"
    page = client.fine_tuning.jobs.list_events(job.id, limit=7)
    assert page.has_more and [e.message for e in page] == messages  # the SDK pages on with `after`
    assert "Step 30/30" in " ".join(messages) and "validation loss" in " ".join(messages)
    saved = [int(m.split()[-1]) for m in messages if m.startswith("Checkpoint created at step")]
    assert saved[0] == 30 and all(n % 6 == 0 for n in saved)  # save_steps 6
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert ckpts[0].step_number == 30 and ckpts[0].metrics.train_loss is not None
    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    reply = client.chat.completions.create(
        model=done.fine_tuned_model, messages=ASK, max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content == "OK"
    scored = client.completions.create(
        model=done.fine_tuned_model, prompt="question 3?", max_tokens=0, echo=True, logprobs=1
    )
    assert scored.choices[0].text.endswith("question 3?") and scored.choices[0].logprobs.token_logprobs[1] < 0


def test_dpo_job_trains_on_openai_preference_rows(server, base, tmp_path):
    rows = [
        {"input": {"messages": [{"role": "user", "content": f"question {i}?"}]},
         "preferred_output": [{"role": "assistant", "content": "OK"}],
         "non_preferred_output": [{"role": "assistant", "content": "NO"}]}
        for i in range(16)
    ]  # fmt: skip
    path = tmp_path / "prefs.jsonl"
    path.write_text(jsonl(*rows))
    with path.open("rb") as f:
        prefs = server.client.files.create(file=f, purpose="fine-tune")
    job = server.client.fine_tuning.jobs.create(
        model=str(base),
        training_file=prefs.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 4}}},
    )
    done = wait(server.client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.method.dpo.hyperparameters.beta == 0.2
    assert done.fine_tuned_model.startswith(f"ft:{base.name}::")
    reply = server.client.chat.completions.create(model=done.fine_tuned_model, messages=ASK, max_tokens=4)
    assert reply.model == done.fine_tuned_model


def test_reinforcement_job_trains_against_a_string_check_grader(server, base, chat_file):
    grader = {"type": "string_check", "name": "says_ok", "operation": "eq",
              "input": "{{sample.output_text}}", "reference": "{{item.reference}}"}  # fmt: skip
    job = server.client.fine_tuning.jobs.create(
        model=str(base),
        training_file=chat_file.id,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": grader, "hyperparameters": {"n_epochs": 1}},
        },
    )
    done = wait(server.client, job.id, ("succeeded", "failed"))
    assert done.status == "succeeded", done.error
    assert done.method.type == "reinforcement" and done.method.reinforcement.grader.type == "string_check"
    run_dir = Path(os.environ["TUNEKIT_HOME"]) / "fine_tuning" / "jobs" / job.id
    assert json.loads((run_dir / "train_summary.json").read_text())["task"] == "rl"
    reply = server.client.chat.completions.create(model=done.fine_tuned_model, messages=ASK, max_tokens=4)
    assert reply.model == done.fine_tuned_model


def test_cancel_stops_a_running_job_and_a_queued_one(server, base, chat_file):
    jobs = server.client.fine_tuning.jobs
    long = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50}}}
    running_job = jobs.create(model=str(base), training_file=chat_file.id, method=long)
    queued_job = jobs.create(model=str(base), training_file=chat_file.id, method=long)
    assert jobs.cancel(queued_job.id).status == "cancelled"
    deadline = time.time() + 120
    while not any(e.type == "metrics" for e in jobs.list_events(running_job.id)) and time.time() < deadline:
        time.sleep(0.3)
    assert jobs.cancel(running_job.id).status == "running"  # it stops after its step in flight
    done = wait(server.client, running_job.id, ("cancelled", "succeeded", "failed"), timeout=60)
    assert done.status == "cancelled" and done.fine_tuned_model is None
    assert jobs.list_events(running_job.id).data[0].message == "Job was cancelled"
    with pytest.raises(openai.BadRequestError):
        jobs.cancel(running_job.id)


@contextmanager
def cli_server(home: Path, args: list[str], log: Path, key: str = "k3y"):
    """`tunekit serve --enable-fine-tuning ARGS` in its own process; yields (process, openai client)."""
    port = free_port()
    env = os.environ | {"TUNEKIT_HOME": str(home), "TUNEKIT_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tunekit", "serve", "--enable-fine-tuning", "--port", str(port), *args]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    try:
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, log.read_text()
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.3)
        yield proc, client
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def test_fine_tune_config_keys_a_job_sets_are_refused(tmp_path):
    config = tmp_path / "jobs.yaml"
    config.write_text("model: smollm2-135m-instruct\ntrain: {max_lenght: 64}\n")
    cmd = [
        sys.executable,
        "-m",
        "tunekit",
        "serve",
        "--enable-fine-tuning",
        "--fine-tune-config",
        str(config),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=os.environ | {"TUNEKIT_HOME": str(tmp_path)}
    )
    assert done.returncode != 0 and "model: set by each job" in done.stderr, done.stderr


def test_a_restarted_server_resumes_the_running_job_and_keeps_the_queue(base, tmp_path):
    """SIGTERM to `tunekit serve`: the job checkpoints and the server exits; started again, the server
    resumes the job from that checkpoint, then runs the job queued behind it."""
    home, log = tmp_path / "home", tmp_path / "serve.log"
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump(DEFAULTS | {"train": DEFAULTS["train"] | {"save_steps": 2}}))
    data = tmp_path / "ok.jsonl"
    data.write_text(
        jsonl(
            *[
                {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": "OK"}]}
                for i in range(24)
            ]
        )
    )
    args = ["--fine-tune-config", str(config)]
    with cli_server(home, args, log) as (proc, client):
        with pytest.raises(openai.AuthenticationError):  # the key guards the jobs API too
            openai.OpenAI(
                base_url=str(client.base_url), api_key="wrong", max_retries=0
            ).fine_tuning.jobs.list()
        with data.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="fine-tune")
        first = client.fine_tuning.jobs.create(
            model=str(base), training_file=uploaded.id, hyperparameters={"n_epochs": 4}
        )
        second = client.fine_tuning.jobs.create(
            model=str(base), training_file=uploaded.id, hyperparameters={"n_epochs": 1}
        )
        deadline = time.time() + 120
        while not client.fine_tuning.jobs.checkpoints.list(first.id).data and time.time() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) != 0
    job_log = home / "fine_tuning" / "jobs" / f"{first.id}.log"
    assert "SIGTERM: stopping after this step, with a checkpoint" in job_log.read_text()
    with cli_server(home, args, log) as (proc, client):
        jobs = client.fine_tuning.jobs
        assert jobs.retrieve(first.id).status == "running" and jobs.retrieve(second.id).status == "queued"
        done = wait(client, first.id, ("succeeded", "failed"))
        assert done.status == "succeeded", done.error
        messages = [e.message for e in jobs.list_events(first.id, limit=100)]
        assert any(
            m.startswith("The server restarted: the job resumes from its checkpoint at step")
            for m in messages
        )
        steps = [int(m.split()[1].split("/")[0]) for m in messages if m.startswith("Step ")]
        assert sorted(steps) == list(range(1, 25)), "every step reported once, none repeated after the resume"
        assert wait(client, second.id, ("succeeded", "failed")).status == "succeeded"
        assert done.fine_tuned_model in [m.id for m in client.models.list()]
