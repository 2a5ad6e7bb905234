"""Chat templates (models/templates.py): the built-ins' loss masks, the choice for a model without a
template, the config key, the data check's template errors, and a run whose template added tokens.

The models here are base models made from the default model's tokenizer with its template deleted.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import jsonl, make_tiny, make_tiny_llama, train_to_answer, write
from tunekit.config import config_from_dict
from tunekit.data.check import check_data
from tunekit.data.example import Example, Message
from tunekit.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_example
from tunekit.errors import ConfigError, DataError, ModelError
from tunekit.models import load_tokenizer
from tunekit.models.stops import end_of_turn_token, stop_token_ids
from tunekit.models.templates import BUILTINS, TEMPLATE_NAMES, template_choice

# The token each built-in ends an assistant turn with (None: the tokenizer's eos).
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "mistral": None,
    "phi3": "<|end|>",
    "completion": None,
}
CONVERSATION = Example(
    messages=(
        Message("system", "Answer in one line."),
        Message("user", "What is 2+2?"),
        Message("assistant", "It is 4."),
        Message("user", "And 3+3?"),
        Message("assistant", "6, of course."),
    )
)
GEMMA2_TEMPLATE = (  # Gemma 2's own: it refuses a system message
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def without_template(src, dst, model_type: str | None = None):
    """A copy of the model folder `src` whose tokenizer has no chat template (a base model)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((dst / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if model_type:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(cfg | {"model_type": model_type}))
    return dst


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_model_dir):
    """The tiny llama without a chat template: SmolLM2's vocabulary, which has <|im_start|>/<|im_end|>."""
    return without_template(tiny_model_dir, tmp_path_factory.mktemp("base") / "m")


@pytest.fixture(scope="module")
def gemma_base_dir(tmp_path_factory, default_model_dir):
    """A tiny Gemma 3 without a chat template whose vocabulary has Gemma's turn tokens, like Gemma 3 270M."""
    tok = load_tokenizer(default_model_dir)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False,
    )
    tok.chat_template = None
    tok.init_kwargs.pop("tunekit_chat_template", None)
    folder = make_tiny("gemma3_text", tmp_path_factory.mktemp("gemma-base"), tok)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def loss_pieces(tok, t) -> list[str]:
    """The text of each run of consecutive loss-carrying tokens."""
    pieces, run = [], []
    for i, label in zip(t.input_ids, t.labels, strict=True):
        if label == IGNORE_INDEX:
            if run:
                pieces.append(tok.decode(run))
            run = []
        else:
            run.append(i)
    return pieces + ([tok.decode(run)] if run else [])


@pytest.mark.parametrize("name", list(BUILTINS))
def test_the_loss_mask_is_exactly_each_reply_and_its_end_of_turn_token(name, base_dir):
    tok = load_tokenizer(base_dir, name)
    eot = END_OF_TURN[name] or tok.eos_token
    t = tokenize_example(tok, CONVERSATION, 512)
    assert loss_pieces(tok, t) == [f"It is 4.{eot}", f"6, of course.{eot}"]
    # Generation stops where training taught the model to: the template's end of turn is the first stop.
    assert end_of_turn_token(tok) == eot
    assert stop_token_ids(tok)[0] == tok.convert_tokens_to_ids(eot)
    # The prompt eval and serve build is the text training put before the reply.
    text = tok.decode(t.input_ids)
    assert text.endswith(render_prompt(tok, CONVERSATION) + f"6, of course.{eot}")
    assert "Answer in one line." in text  # the system message is rendered (gemma, mistral: folded in)


def test_the_built_ins_write_the_official_prompt_text(base_dir):
    """Spot checks against each family's published template (system + user + generation prompt)."""
    ex = Example(messages=(Message("system", "S"), Message("user", "U"), Message("assistant", "A")))
    want = {
        "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "gemma": "<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n",
        "mistral": "[INST] S\n\nU [/INST]",
        "phi3": "<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\n",
        "completion": "S\n\n### Instruction:\nU\n\n### Response:\n",
    }
    for name, prompt in want.items():
        tok = load_tokenizer(base_dir, name)
        text = render_prompt(tok, ex)
        text = text.removeprefix(tok.bos_token) if name in ("llama3", "gemma", "mistral") else text
        assert text == prompt, name


def test_qwen_opens_the_reply_with_an_empty_think_block_when_thinking_is_off(base_dir):
    tok = load_tokenizer(base_dir, "qwen")
    msgs = [{"role": "user", "content": "hi"}]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert on.endswith("<|im_start|>assistant\n")


def test_a_model_with_its_own_template_keeps_it(tiny_model_dir, tokenizer):
    tok = load_tokenizer(tiny_model_dir)
    assert tok.chat_template == tokenizer.chat_template
    assert template_choice(tok).name == "model"


def test_a_base_model_gets_its_familys_template_when_the_vocabulary_has_its_tokens(gemma_base_dir):
    tok = load_tokenizer(gemma_base_dir)
    choice = template_choice(tok)
    assert choice.name == "gemma" and not choice.added_tokens
    assert "no chat template" in choice.line and "<end_of_turn>" in choice.line
    assert end_of_turn_token(tok) == "<end_of_turn>"


def test_a_base_model_gets_chatml_when_its_vocabulary_has_chatml_tokens(base_dir):
    tok = load_tokenizer(base_dir)
    assert template_choice(tok).name == "chatml" and not template_choice(tok).added_tokens
    assert len(tok) == 49152  # nothing added: no embedding to grow


def _plain_tokenizer_dir(folder, eos: bool = True):
    """A base model folder whose tiny BPE vocabulary has no turn tokens of any template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    bpe.train_from_iterator(
        ["hello world, what is 2+2? it is 4."] * 4, trainers.BpeTrainer(special_tokens=specials)
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>" if eos else None
    )
    folder.mkdir()
    tok.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_a_base_model_without_turn_tokens_gets_the_completion_template(tmp_path):
    tok = load_tokenizer(_plain_tokenizer_dir(tmp_path / "plain"))
    assert template_choice(tok).name == "completion"
    assert end_of_turn_token(tok) == "</s>"


def test_a_base_model_without_turn_tokens_or_eos_is_told_to_name_a_template(tmp_path):
    with pytest.raises(ModelError, match="chat_template"):
        load_tokenizer(_plain_tokenizer_dir(tmp_path / "plain", eos=False))


def test_a_named_template_adds_its_missing_tokens_as_special_tokens(base_dir):
    tok = load_tokenizer(base_dir, "llama3")
    assert template_choice(tok).added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert len(tok) == 49155
    assert tok.encode("<|eot_id|>", add_special_tokens=False) == [49154]


def test_the_config_key_takes_a_name_or_a_jinja_file(tmp_path, base_dir):
    data = {"train": "train.jsonl"}
    assert config_from_dict({"data": data, "chat_template": "gemma"}).chat_template == "gemma"
    assert config_from_dict({"data": data, "chat_template": "chatml-with-think"}).chat_template == "qwen"
    with pytest.raises(ConfigError, match=r"chat_template: unknown template 'gema'; did you mean 'gemma'"):
        config_from_dict({"data": data, "chat_template": "gema"})
    with pytest.raises(ConfigError, match="chat_template: no such template file"):
        config_from_dict({"data": data, "chat_template": str(tmp_path / "missing.jinja")})
    jinja = write(tmp_path, "mine.jinja", BUILTINS["phi3"].jinja.replace("<|end|>", "<|end|>"))
    cfg = config_from_dict({"data": data, "chat_template": str(jinja)})
    tok = load_tokenizer(base_dir, cfg.chat_template)
    assert tok.chat_template == BUILTINS["phi3"].jinja and template_choice(tok).name == str(jinja)
    for name in ("chatml", "llama3", "gemma", "mistral", "qwen", "phi3", "completion"):
        assert name in TEMPLATE_NAMES


# --- bad input: found by `tunekit data check`, never a silently wrong loss mask ---------------------


def _model_with_template(src, dst, template: str):
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.fixture
def system_file(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}?"},
                      {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]  # fmt: skip
    return write(tmp_path, "train.jsonl", jsonl(*rows))


def test_a_template_that_refuses_a_system_message_is_a_data_check_error(
    tmp_path, tiny_model_dir, system_file
):
    model = _model_with_template(tiny_model_dir, tmp_path / "gemma2", GEMMA2_TEMPLATE)
    with pytest.raises(DataError) as e:
        check_data([system_file], model=str(model))
    msg = str(e.value)
    assert str(model) in msg and "the model's own chat template" in msg
    assert "cannot render a system message" in msg and "chat_template: gemma" in msg
    assert "train.jsonl" in msg  # where: the file and line of a row that shows it
    # The fix works: the built-in folds the system message into the first user turn.
    report = check_data([system_file], model=str(model), chat_template="gemma")
    assert report.exit_code == 0


def test_the_data_check_command_names_the_fix_and_takes_it(tmp_path, tiny_model_dir, system_file):
    import subprocess
    import sys

    model = _model_with_template(tiny_model_dir, tmp_path / "gemma2", GEMMA2_TEMPLATE)
    cmd = [sys.executable, "-m", "tunekit", "data", "check", str(system_file), "--model", str(model)]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode != 0 and "chat_template: gemma" in refused.stderr
    assert "Traceback" not in refused.stderr
    fixed = subprocess.run([*cmd, "--chat-template", "gemma"], capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stderr


def test_a_template_that_drops_the_system_message_is_a_data_check_error(
    tmp_path, tiny_model_dir, system_file
):
    drops = (
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = _model_with_template(tiny_model_dir, tmp_path / "drops", drops)
    with pytest.raises(DataError, match="drops the system message"):
        check_data([system_file], model=str(model))


def test_a_template_that_drops_the_assistant_turn_is_a_data_check_error(
    tmp_path, tiny_model_dir, system_file
):
    drops = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = _model_with_template(tiny_model_dir, tmp_path / "drops", drops)
    with pytest.raises(DataError, match=r"drops the assistant turn.*chat_template:"):
        check_data([system_file], model=str(model))


# --- runs: the template travels with the run; added tokens train, save and load back -----------------


def test_a_gemma_base_model_trains_with_its_template_and_stops_at_end_of_turn(gemma_base_dir, tmp_path):
    from tunekit.eval.generate import generate
    from tunekit.runs.directory import load_run_config, load_test_examples
    from tunekit.train.setup import load_trained

    run = train_to_answer(gemma_base_dir, tmp_path / "run", "READY", "Is order {i} ready?")
    model, tok, _ = load_trained(run)
    assert template_choice(tok).name == "gemma"  # saved with the run: eval, serve and export reuse it
    examples = load_test_examples(run, load_run_config(run), None)
    assert generate(model, tok, examples, max_new_tokens=8) == ["READY"] * len(examples)


def test_added_tokens_train_save_and_load_back_with_the_adapter(base_dir, tmp_path):
    import torch

    from tunekit.ship.export import load_merged
    from tunekit.train.setup import load_trained

    run = train_to_answer(base_dir, tmp_path / "run", "READY", "Is order {i} ready?", chat_template="llama3")
    model, tok, _ = load_trained(run)
    assert len(tok) == 49155 and model.get_input_embeddings().weight.shape[0] == 49155
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(tok)[0] == eot
    prompt = render_prompt(
        tok, Example(messages=(Message("user", "Is order 3 ready?"), Message("assistant", "")))
    )
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=stop_token_ids(tok, model))
        logits = model(ids).logits
    answer = tok("READY", add_special_tokens=False)["input_ids"]
    reply = out[0, ids.shape[1] :].tolist()
    assert reply[-1] == eot and len(reply) <= len(answer) + 1  # it learned to end with the new token
    adapter = run / "adapter" / "adapter_model.safetensors"
    assert adapter.stat().st_size < 2_000_000  # the new rows, not a copy of the whole embedding matrix
    merged, merged_tok = load_merged(run)  # export: the same vocabulary, the same outputs
    assert len(merged_tok) == 49155 and merged.get_output_embeddings().weight.shape[0] == 49155
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, logits, atol=1e-4, rtol=1e-4)


def test_full_fine_tuning_saves_the_grown_vocabulary(base_dir, tmp_path):
    from tunekit.train.setup import load_trained

    run = train_to_answer(base_dir, tmp_path / "run", "OK", chat_template="phi3", method="full", train={
        "max_steps": 2, "batch_size": 4, "max_length": 64, "seed": 0})  # fmt: skip
    model, tok, is_adapter = load_trained(run)
    assert not is_adapter and len(tok) == 49156 == model.get_input_embeddings().weight.shape[0]


def test_an_untied_head_trains_the_new_rows_of_both_embeddings_and_head(tokenizer, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from tunekit.config import LoraConfig
    from tunekit.train.setup import add_lora, token_rows

    folder = make_tiny_llama(tmp_path / "tied", tokenizer)
    model = LlamaForCausalLM.from_pretrained(folder, tie_word_embeddings=False)
    assert token_rows(model, [5], "CAUSAL_LM") == {"model.embed_tokens": [5], "lm_head": [5]}
    peft_model = add_lora(model, LoraConfig(r=2), seed=0, token_ids=[5])
    loss = peft_model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 5, 5]])).loss
    loss.backward()
    grads = {n for n, p in peft_model.named_parameters() if "trainable_tokens" in n and p.grad is not None}
    assert any("embed_tokens" in n for n in grads) and any("lm_head" in n for n in grads)
