"""Which token ids end a reply, and a reply's text without them: the one source for every place that
generates (eval, serve, chat, export, augment), so they all stop where training taught the model to.

Training (data/tokenize.py) puts the loss on everything the chat template writes after an
assistant's content, so the model learns to emit the template's end-of-turn token (ChatML
`<|im_end|>`, Gemma `<end_of_turn>`). That token need not be the tokenizer's eos: a generator that
stops only on eos never sees the model stop (the field's "it never stops" bug; `tunekit eval` then
scored a correct reply as wrong because the text ran on past it). `stop_token_ids` reads the
end-of-turn token out of the template itself.

This lives in models/ because eval/, ship/ and iterate/ all need it and none should import another
for it.
"""

from __future__ import annotations

from collections.abc import Iterable


def end_of_turn_token(tokenizer) -> str | None:
    """The special or added token the chat template writes right after an assistant's content, if any."""
    marker = "\x00tunekit\x00"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    after = text.split(marker, 1)[1] if marker in text else ""
    specials = sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True)
    after = after.lstrip(" ")
    return next((s for s in specials if s and after.startswith(s)), None)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a reply, unique, in this order: the template's end-of-turn token, the tokenizer's
    eos, the eos ids of the model's generation_config. The first is the one exports name as eos."""
    ids: list[int] = []
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.append(tokenizer.convert_tokens_to_ids(eot))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids += [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
    return list(dict.fromkeys(ids))


def before_stop(ids: Iterable[int], stop_ids: Iterable[int]) -> list[int]:
    """The generated ids up to (not including) the first stop id.

    Decoding with skip_special_tokens alone is not enough: an end-of-turn token added to the
    vocabulary as a plain (non-special) token would be decoded into the reply's text, and in a
    batch whatever follows a row's stop (padding) must not count either.
    """
    stops = set(stop_ids)
    out: list[int] = []
    for i in ids:
        if int(i) in stops:
            break
        out.append(int(i))
    return out


def reply_text(tokenizer, ids: Iterable[int], stop_ids: Iterable[int]) -> str:
    """The text of a generated reply: its ids up to the first stop id, special tokens dropped."""
    return tokenizer.decode(before_stop(ids, stop_ids), skip_special_tokens=True)
