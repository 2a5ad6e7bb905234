"""Loss masking: only assistant (completion) tokens carry loss, through the real chat template."""

from tunekit.data.example import Example, Message
from tunekit.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_example


def _loss_text(tokenizer, t):
    return tokenizer.decode([i for i, lab in zip(t.input_ids, t.labels, strict=False) if lab != IGNORE_INDEX])


def test_only_assistant_tokens_carry_loss(tokenizer):
    ex = Example(
        messages=(
            Message("system", "Be brief."),
            Message("user", "2+2?"),
            Message("assistant", "4"),
            Message("user", "and 3+3?"),
            Message("assistant", "6 is the answer."),
        )
    )
    t = tokenize_example(tokenizer, ex, 512)
    assert _loss_text(tokenizer, t) == "4<|im_end|>\n6 is the answer.<|im_end|>\n"
    # labels equal input ids where they are set
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(t.input_ids, t.labels, strict=True))


def test_weight_zero_turn_carries_no_loss(tokenizer):
    ex = Example(
        messages=(
            Message("user", "2+2?"),
            Message("assistant", "5", weight=0),
            Message("user", "Wrong, again?"),
            Message("assistant", "4"),
        )
    )
    t = tokenize_example(tokenizer, ex, 512)
    assert _loss_text(tokenizer, t) == "4<|im_end|>\n"


def test_prompt_is_prefix_of_training_text(tokenizer):
    ex = Example(messages=(Message("user", "hello"), Message("assistant", "hi there")))
    t = tokenize_example(tokenizer, ex, 512)
    prompt = render_prompt(tokenizer, ex)
    full = tokenizer.decode(t.input_ids)
    assert full.startswith(prompt)
    assert full[len(prompt) :] == "hi there<|im_end|>\n"


def test_truncation_is_counted(tokenizer):
    ex = Example(messages=(Message("user", "word " * 300), Message("assistant", "ok")))
    t = tokenize_example(tokenizer, ex, 64)
    assert len(t.input_ids) == 64 and t.truncated > 0
    assert t.n_loss_tokens == 0  # the target was cut off: the recipe reports and skips it
