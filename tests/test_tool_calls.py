"""Tool-calling conversations: OpenAI `tools` / `tool_calls` / `tool` turns and glaive's ShareGPT
`function_call` / `observation` turns read into one Example, checked against the declared schemas
(file, line, field), rendered through a template with tool support (the built-in qwen) and through
the fallback (SmolLM2's own ChatML), with loss on the calls; tool-call metrics; and a tiny model
trained to call a tool, evaluated and served through the OpenAI API."""

import json

import pytest

from conftest import jsonl, shared_data, write
from tunekit.data import load_examples, read_examples
from tunekit.data.example import Example, Message, ToolCall
from tunekit.data.tokenize import IGNORE_INDEX, render_prompt, supports_tools, tokenize_example
from tunekit.data.tools import openai_reply, parse_reply
from tunekit.eval.metrics import default_metrics, score_metrics
from tunekit.models import load_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


def openai_row(call=CALL, tools=(WEATHER,), answer="It is 20 C in Paris."):
    return {
        "tools": list(tools),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
            {"role": "assistant", "content": answer},
        ],
    }


def glaive_row(call='{"name": "get_weather", "arguments": {"city": "Paris"}}'):
    return {
        "tools": json.dumps([WEATHER["function"]]),  # glaive: bare definitions, as JSON text
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": call},
            {"from": "observation", "value": '{"temp": 20}'},
            {"from": "gpt", "value": "It is 20 C in Paris."},
        ],
    }


def test_openai_and_glaive_rows_read_into_the_same_conversation(tmp_path):
    [a] = load_examples(write(tmp_path, "a.jsonl", jsonl(openai_row())))
    [b] = load_examples(write(tmp_path, "b.jsonl", jsonl(glaive_row())))
    assert a.tools == b.tools == (WEATHER,)
    assert [m.role for m in a.messages] == ["user", "assistant", "tool", "assistant"]
    assert a.messages[1].tool_calls == (ToolCall("get_weather", '{"city": "Paris"}', "call_1"),)
    assert b.messages[1].tool_calls == (ToolCall("get_weather", '{"city": "Paris"}'),)
    assert a.messages[2].tool_call_id == "call_1" and a.messages[2].content == b.messages[2].content
    # The canonical form (how run directories store splits) reads back to the same example.
    [again] = load_examples(write(tmp_path, "c.jsonl", jsonl(a.to_dict())), format="chat")
    assert (again.messages, again.tools) == (a.messages, a.tools)


def test_a_reply_that_is_a_call_is_the_target_as_a_tool_call_block(tmp_path):
    row = openai_row()
    row["messages"] = row["messages"][:2]  # the conversation ends with the call
    [ex] = load_examples(write(tmp_path, "x.jsonl", jsonl(row)))
    assert ex.target == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


BAD_CALLS = {
    "invalid JSON arguments": (
        openai_row(call=CALL | {"function": {"name": "get_weather", "arguments": '{"city": Paris}'}}),
        "invalid_tool_call",
        "messages[1].tool_calls[0].function.arguments",
        "is not valid JSON",
    ),
    "unknown function": (
        openai_row(call=CALL | {"function": {"name": "get_wether", "arguments": "{}"}}),
        "unknown_tool",
        "messages[1].tool_calls[0].function.name",
        "'get_wether', which is not among the declared tools (get_weather)",
    ),
    "missing required argument": (
        openai_row(call=CALL | {"function": {"name": "get_weather", "arguments": '{"days": 2}'}}),
        "missing_argument",
        "messages[1].tool_calls[0].function.arguments.city",
        "get_weather requires argument 'city'",
    ),
    "wrong argument type": (
        openai_row(call=CALL | {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": "2"}'}}),
        "wrong_argument_type",
        "messages[1].tool_calls[0].function.arguments.days",
        "get_weather.days must be of type integer",
    ),
    "no tools declared": (
        openai_row(tools=()),
        "unknown_tool",
        "messages[1].tool_calls[0].function.name",
        "the row declares no tools",
    ),
    "glaive call that is not JSON": (
        glaive_row(call="get_weather(city='Paris')"),
        "invalid_tool_call",
        "conversations[1].value",
        "is not valid JSON",
    ),
    "glaive missing argument": (
        glaive_row(call='{"name": "get_weather", "arguments": {}}'),
        "missing_argument",
        "conversations[1].value.arguments.city",
        "requires argument 'city'",
    ),
    "a tool result nobody asked for": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "orphan_tool_result",
        "messages[1].role",
        "a tool result after a 'user' turn that calls no tool",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CALLS, ids=list(BAD_CALLS))
def test_a_bad_tool_call_is_an_error_naming_file_line_and_field(tmp_path, case):
    row, kind, field, text = BAD_CALLS[case]
    good = glaive_row() if "conversations" in row else openai_row()
    path = write(
        tmp_path, "calls.jsonl", jsonl(good, row)
    )  # a good row of the same format first: line 2 is bad
    examples, problems = read_examples(path)
    assert [e.line for e in examples] == [1]
    [problem] = problems
    assert (problem.line, problem.kind, problem.field) == (2, kind, field)
    assert str(problem).startswith(f"{path}:2: {field}: ") and text in problem.message


def test_preference_and_feedback_rows_with_tool_use_are_refused_by_field(tmp_path):
    good = openai_row()["messages"]
    rows = [
        {"messages": good, "label": True},  # kto
        {"conversations": glaive_row()["conversations"], "label": False},  # kto, ShareGPT turns
        {"input": {"messages": good[:3]}, "preferred_output": [good[3]], "non_preferred_output": [good[3]]},
    ]
    for i, row in enumerate(rows):
        _, problems = read_examples(write(tmp_path, f"{i}.jsonl", jsonl(row)))
        [p] = problems
        assert p.kind == "unsupported_field" and "turn 2 is a tool call" in p.message, p
        assert p.field == ["messages", "conversations", "input.messages"][i]


def test_the_data_check_reports_a_bad_call_and_counts_the_calls(tmp_path, default_model_dir):
    from tunekit.data.check import check_data

    bad = BAD_CALLS["missing required argument"][0]
    path = write(tmp_path, "calls.jsonl", jsonl(openai_row(), bad))
    report = check_data([path], model=str(default_model_dir))
    assert report.exit_code == 1 and (report.kept, report.rejected) == (1, 1)
    [error] = report.errors
    assert (error.line, error.field) == (2, "messages[1].tool_calls[0].function.arguments.city")
    # The tools are written into a system turn: no warning that the default system prompt is used.
    assert not [w for w in report.warnings if w.kind == "no_system"]
    assert report.stats["tool_calls"] == {
        "examples_with_tools": 1,
        "examples_with_calls": 1,
        "calls": 1,
        "functions_called": 1,
        "rendering": "the fallback (tools in the system turn, <tool_call> blocks, <tool_response> user turns)",
    }
    qwen = check_data([path], model=str(default_model_dir), chat_template="qwen")
    assert qwen.stats["tool_calls"]["rendering"] == "the chat template's own"


def test_the_real_glaive_demo_loads_and_its_one_bad_call_is_named(default_model_dir):
    from tunekit.data.check import check_data

    path = shared_data("llamafactory-demo/glaive_toolcall_en_demo.json")
    report = check_data([path], model=str(default_model_dir), max_length=2048)
    assert (report.kept, report.rejected) == (299, 1)
    [error] = report.errors
    # Row 223 calls track_calories with a list where its schema declares a number.
    assert (error.line, error.kind, error.field) == (
        8001,
        "wrong_argument_type",
        "conversations[3].value.arguments.calories_per_item",
    )
    assert "must be of type number, found a list" in error.message
    assert report.stats["tool_calls"]["examples_with_calls"] == 152


def loss_text(tok, t) -> str:
    """The loss-carrying tokens, decoded, with '|' between runs."""
    runs, run = [], []
    for i, label in zip(t.input_ids, t.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            run.append(i)
    return "|".join(runs + ([tok.decode(run)] if run else []))


def test_a_template_with_tool_support_renders_tools_itself_and_the_calls_carry_loss(
    tmp_path, default_model_dir
):
    tok = load_tokenizer(default_model_dir, "qwen")
    assert supports_tools(tok)
    [ex] = load_examples(write(tmp_path, "x.jsonl", jsonl(openai_row())))
    t = tokenize_example(tok, ex, 1024)
    text = tok.decode(t.input_ids)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert json.dumps(WEATHER) in text  # the definition, as Qwen's template writes it (tojson)
    assert '<|im_start|>user\n<tool_response>\n{"temp": 20}\n</tool_response><|im_end|>' in text
    # Loss on both assistant turns, the call included; none on the tools, the question or the result.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert loss_text(tok, t) == f"{call}<|im_end|>|It is 20 C in Paris.<|im_end|>"
    # The prompt eval and serve build is the text training put before the reply.
    assert text.endswith(render_prompt(tok, ex) + "It is 20 C in Paris.<|im_end|>")


def test_a_template_without_tool_support_gets_the_fallback_with_the_same_loss(tmp_path, default_model_dir):
    own = load_tokenizer(default_model_dir)  # SmolLM2's ChatML: no tools in its template
    assert not supports_tools(own)
    chatml, qwen = load_tokenizer(default_model_dir, "chatml"), load_tokenizer(default_model_dir, "qwen")
    [ex] = load_examples(write(tmp_path, "x.jsonl", jsonl(openai_row())))
    # The fallback on plain ChatML writes exactly what Qwen's template writes.
    assert tokenize_example(chatml, ex, 1024) == tokenize_example(qwen, ex, 1024)
    t = tokenize_example(own, ex, 1024)
    text = own.decode(t.input_ids)
    assert "You are provided with function signatures" in text and "<|im_start|>tool" not in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    # SmolLM2's own template writes a newline after <|im_end|>: part of the turn, as for any reply.
    assert loss_text(own, t) == f"{call}<|im_end|>\n|It is 20 C in Paris.<|im_end|>\n"


def test_parallel_calls_and_their_results(default_model_dir):
    tok = load_tokenizer(default_model_dir, "qwen")
    calls = (ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_weather", '{"city": "Rome"}'))
    ex = Example(
        messages=(
            Message("user", "Paris and Rome?"),
            Message("assistant", "Let me look.", tool_calls=calls),
            Message("tool", "20"),
            Message("tool", "25"),
            Message("assistant", "20 and 25."),
        ),
        tools=(WEATHER,),
    )
    t = tokenize_example(tok, ex, 1024)
    text = tok.decode(t.input_ids)
    assert "<tool_response>\n20\n</tool_response>\n<tool_response>\n25\n</tool_response><|im_end|>" in text
    blocks = "\n".join(c.block for c in calls)
    assert loss_text(tok, t) == f"Let me look.\n{blocks}<|im_end|>|20 and 25.<|im_end|>"


def test_tool_call_metrics():
    ref = ToolCall("get_weather", '{"city": "Paris", "days": 2}').block
    preds = [
        '<tool_call>\n{"arguments": {"days": 2, "city": "Paris"}, "name": "get_weather"}\n</tool_call>',  # equal as JSON
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "days": 2}}\n</tool_call>',  # wrong args
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"\n</tool_call>',  # invalid JSON
        "It is sunny.",  # no call at all
        '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',  # Llama 3.1's bare JSON
    ]
    values, per = score_metrics(["tool_call_match", "tool_call_name", "tool_call_valid"], preds, [ref] * 5)
    assert per["tool_call_match"] == [1, 0, 0, 0, 1]
    assert per["tool_call_name"] == [1, 1, 0, 0, 1]
    assert per["tool_call_valid"] == [1, 1, 0, 0, 1]
    # A reference with no call: not calling is right.
    _, per = score_metrics(["tool_call_match", "tool_call_valid"], ["Hi.", ref], ["Hello.", "Hello."])
    assert per == {"tool_call_match": [1.0, 0.0], "tool_call_valid": [1.0, 1.0]}


def _has_call(predictions, references):
    """A user's metric (module:function): 1 where the reply holds a <tool_call> block."""
    return [float("<tool_call>" in p) for p in predictions]


def test_tool_data_gets_tool_metrics_beside_the_text_metrics():
    call = ToolCall("f", "{}").block
    assert default_metrics([call, call], False)[0] == "tool_call_match"  # every reference calls
    assert default_metrics([call, "Fine."], False) == [
        "exact_match",
        "tool_call_match",
        "tool_call_name",
        "tool_call_valid",
    ]
    # Text metrics score the text outside the calls.
    values, _ = score_metrics(["exact_match"], [f"Sure.\n{call}", "Fine."], [f"Sure.\n{call}", "Fine."])
    assert values["exact_match"] == 1.0
    # A user's metric gets whole replies, calls included.
    values, _ = score_metrics(["test_tool_calls:_has_call"], [f"Sure.\n{call}"], [f"Sure.\n{call}"])
    assert values["_has_call"] == 1.0
    # Not tool data: a JSON answer with a "name" field is text, not a call.
    assert default_metrics(['{"name": "Bob", "age": 3}'], False) == [
        "exact_match",
        "field_accuracy",
        "json_valid",
    ]


def test_the_server_shapes_a_reply_with_calls_as_openai_does():
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    message, finish = openai_reply(text, "stop")
    assert finish == "tool_calls" and message["content"] == "Checking."
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert openai_reply("Just text.", "stop") == ({"role": "assistant", "content": "Just text."}, "stop")
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city"\n</tool_call>'
    assert openai_reply(broken, "length") == ({"role": "assistant", "content": broken}, "length")
    assert parse_reply("[TOOL_CALLS] [" + json.dumps({"name": "f", "arguments": {}}) + "]")[1][0].name == "f"


@pytest.fixture(scope="module")
def tool_run(tiny_model_dir, tmp_path_factory):
    """A tiny model trained to answer every weather question with a call to get_weather."""
    from test_serve import base_that_can_stop
    from tunekit.config import config_from_dict
    from tunekit.train.session import train

    folder = tmp_path_factory.mktemp("tool-run")
    base = base_that_can_stop(tiny_model_dir, folder)
    rows = []
    for i in range(24):
        call = CALL | {"function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        row = openai_row(call=call)
        row["messages"] = [{"role": "user", "content": f"Weather {i}?"}, row["messages"][1]]
        rows.append(row)
    data = write(folder, "tools.jsonl", jsonl(*rows))
    config = {
        "model": str(base),
        "chat_template": "qwen",
        "data": {"train": str(data), "split": [0.75, 0.0, 0.25]},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 40, "learning_rate": 2e-2, "batch_size": 4, "max_length": 320, "seed": 0},
        "eval": {"probe": None, "few_shot": 0},
        "output_dir": str(folder / "run"),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNEKIT_HOME", str(folder / "home"))
        return train(config_from_dict(config), quiet=True)


def test_a_model_trained_on_calls_is_scored_on_them(tool_run, tmp_path):
    from tunekit.eval.evaluate import evaluate

    report = evaluate(tool_run, quiet=True)
    assert report["task_metric"] == "tool_call_match"
    assert report["metrics"][:3] == ["tool_call_match", "tool_call_name", "tool_call_valid"]
    assert report["contenders"]["finetuned"]["tool_call_match"] == 1.0
    assert report["contenders"]["base"]["tool_call_match"] == 0.0
    # Conversations whose call comes before their last turn (glaive's shape) are scored at the call too.
    rows = [glaive_row() for _ in range(3)]
    for i, r in enumerate(rows):
        r["conversations"][0]["value"] = f"Weather {30 + i}?"
    report = evaluate(tool_run, data=write(tmp_path, "glaive.jsonl", jsonl(*rows)), quiet=True)
    assert report["n_test"] == 6 and report["metrics"][0] == "exact_match"  # 3 answers + 3 calls
    assert {"tool_call_match", "tool_call_name", "tool_call_valid"} <= set(report["contenders"]["finetuned"])
    predictions = json.loads((tool_run / "predictions.json").read_text())
    at_calls = [p for p in predictions if "<tool_call>" in p["reference"]]
    assert len(at_calls) == 3
    assert all(parse_reply(p["finetuned"])[1][0].arguments == {"city": "Paris"} for p in at_calls)


def test_each_call_before_the_last_turn_is_one_more_test_example(tmp_path):
    from tunekit.data.tools import with_call_points

    [ex] = load_examples(write(tmp_path, "g.jsonl", jsonl(glaive_row())))
    whole, at_call = with_call_points([ex])
    assert whole is ex and at_call.target == ToolCall("get_weather", '{"city": "Paris"}').block
    assert [m.role for m in at_call.messages] == ["user", "assistant"] and at_call.tools == ex.tools


def test_the_server_returns_the_call_in_openais_shape(tool_run):
    openai = pytest.importorskip("openai")
    from conftest import running
    from tunekit.ship.serve import create_app, load_models

    with running(create_app(load_models([tool_run]))) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "Weather 3?"}]
        r = client.chat.completions.create(
            model="run", messages=ask, tools=[WEATHER], temperature=0, max_tokens=40
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        # The conversation goes on with the call and its result, as an OpenAI client sends them.
        follow = ask + [choice.message.model_dump(exclude_none=True)]
        follow.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp": 20}'})
        r = client.chat.completions.create(
            model="run", messages=follow, tools=[WEATHER], temperature=0, max_tokens=8
        )
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # Streamed: the call comes as a tool_calls delta, as OpenAI streams one.
        stream = client.chat.completions.create(
            model="run", messages=ask, tools=[WEATHER], temperature=0, max_tokens=40, stream=True
        )
        chunks = list(stream)
        [delta] = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert (delta[0].index, delta[0].function.name) == (0, "get_weather")
        assert json.loads(delta[0].function.arguments) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)
        # Without `tools` the reply is plain text, as generated.
        r = client.chat.completions.create(model="run", messages=ask, temperature=0, max_tokens=40)
        assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("template", [None, "qwen"])
def test_an_exported_gguf_template_gets_the_same_prompt_as_training(tmp_path, default_model_dir, template):
    """The export parity check renders the GGUF's template (the same Jinja) from the turns training
    gave its own: tools, calls and earlier thinking included, the prompts are equal."""
    from tunekit.eval.exported import _gguf_prompt

    tok = load_tokenizer(default_model_dir, template)
    row = openai_row()
    row["messages"][3] |= {"reasoning_content": "The tool said 20."}
    row["messages"] += [
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": "Ask again."},
    ]
    [ex] = load_examples(write(tmp_path, "x.jsonl", jsonl(row)))
    meta = {"chat_template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    assert _gguf_prompt(meta, tok, ex) == render_prompt(tok, ex)
    assert "<think>\nThe tool said 20.\n</think>" in render_prompt(tok, ex)
