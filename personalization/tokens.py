"""The trigger token: checking a candidate string against the tokenizer, adding it, and building prompts."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTextModel, CLIPTokenizer


class TriggerError(ValueError):
    """The trigger string cannot be used; the message says why and suggests one that works."""


@dataclass(frozen=True)
class TriggerCheck:
    ok: bool
    message: str
    suggestion: str | None = None


def _vocabulary_word(tokenizer: CLIPTokenizer, text: str) -> bool:
    vocab = tokenizer.get_vocab()
    lowered = text.lower()
    return f"{lowered}</w>" in vocab or lowered in tokenizer.get_added_vocab()


def _word_containing(tokenizer: CLIPTokenizer, text: str) -> str | None:
    """A vocabulary word that contains ``text`` (and is longer), if any."""
    needle = text.lower()
    for token in tokenizer.get_vocab():
        word = token.removesuffix("</w>")
        if needle in word and word != needle:
            return word
    return None


def suggest_trigger(tokenizer: CLIPTokenizer, class_noun: str = "", seed: int | None = None) -> str:
    """A short, pronounceable-looking trigger in angle brackets that is not yet known to the tokenizer."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnpqrstvwxz", "aeiou"
    base = re.sub(r"[^a-z]+", "", class_noun.lower())[:8]
    for _ in range(1000):
        word = rng.choice(consonants) + rng.choice(vowels) + rng.choice(consonants)
        candidate = f"<{word}-{base}>" if base else f"<{word}>"
        if check_trigger(tokenizer, candidate).ok:
            return candidate
    raise TriggerError("could not find a free trigger token")  # pragma: no cover - 8000 candidates


def check_trigger(tokenizer: CLIPTokenizer, trigger: str, allow_existing_word: bool = False) -> TriggerCheck:
    """Whether ``trigger`` can be the new token.

    A learned trigger must be new to the tokenizer (a vocabulary word would overwrite what it means) and one token once
    added (whitespace would split it). DreamBooth's identifier is the opposite: an existing rare single token.
    """
    text = trigger.strip() if isinstance(trigger, str) else ""
    if not text:
        return TriggerCheck(False, "the trigger is empty", None)
    if re.search(r"\s", text):
        return TriggerCheck(False, f"'{text}' would split into several tokens: use one word without spaces",
                            "<" + re.sub(r"\s+", "-", text.lower().strip("<> ")) + ">")
    if len(text) > 40:
        return TriggerCheck(False, f"'{text[:20]}...' is longer than 40 characters", None)
    if allow_existing_word:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            return TriggerCheck(False, f"'{text}' is {len(ids)} tokens, the identifier must be one token", "sks")
        return TriggerCheck(True, f"'{text}' is a single existing token")
    if text.lower() in {t.lower() for t in tokenizer.all_special_tokens}:
        return TriggerCheck(False, f"'{text}' is a special token", f"<{text.strip('<>|')}-x>")
    if _vocabulary_word(tokenizer, text):
        return TriggerCheck(
            False, f"'{text}' is already a word the model knows; a trigger must be new",
            f"<{text.lower().strip('<>')}>" if not text.startswith("<") else f"{text[:-1]}-x>",
        )
    host = _word_containing(tokenizer, text)
    if host is not None:
        # An added token is matched anywhere in the text, so it would cut every word that contains it.
        return TriggerCheck(
            False, f"'{text}' appears inside the word '{host}', which would then be read differently",
            f"<{text.lower().strip('<>')}>",
        )
    return TriggerCheck(True, f"'{text}' is a new single token")


def add_trigger_token(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, trigger: str, init_word: str
) -> int:
    """Add ``trigger`` to the tokenizer, grow the embedding table, copy ``init_word``'s embedding into the new row.

    Returns the new token id. A multi-token init word is averaged, so "teddy bear" works as an initializer.
    """
    check = check_trigger(tokenizer, trigger)
    if not check.ok:
        hint = f" (try '{check.suggestion}')" if check.suggestion else ""
        raise TriggerError(f"trigger token: {check.message}{hint}")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise TriggerError(f"init word '{init_word}' gives no tokens")
    added = tokenizer.add_tokens([trigger])
    if added != 1:  # pragma: no cover - check_trigger guarantees a new token
        raise TriggerError(f"trigger token '{trigger}' could not be added")
    token_id = tokenizer.convert_tokens_to_ids(trigger)
    # The new row is overwritten below, so transformers' mean-resizing would only cost time.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[init_ids].mean(dim=0)
    return token_id


def add_trigger_tokens(tokenizers: Sequence[CLIPTokenizer], text_encoders: Sequence[CLIPTextModel], trigger: str,
                       init_word: str) -> int:
    """:func:`add_trigger_token` for each tokenizer and its encoder (SDXL has two); returns the new token id.

    The tokenizers of one pipeline share CLIP's vocabulary, so the trigger gets the same id in each: one id is what
    the trainer splices into every encoder, and a mismatch is refused rather than trained on the wrong row.
    """
    ids = {add_trigger_token(tokenizer, encoder, trigger, init_word)
           for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True)}
    if len(ids) != 1:
        raise TriggerError(f"trigger token '{trigger}' got different ids in the tokenizers ({sorted(ids)})")
    return ids.pop()


def build_prompts(templates: Sequence[str], trigger: str, class_noun: str) -> list[str]:
    """Training prompts: each template with the trigger as an adjective before the class noun."""
    return [template.format(trigger=trigger, noun=class_noun) for template in templates]


def strip_trigger(prompt: str, trigger: str) -> str:
    """The same prompt for the base model: the trigger removed, spacing tidied ("a <t> dog" -> "a dog")."""
    if not trigger:
        return prompt
    without = re.sub(rf"(?<!\S){re.escape(trigger)}(?!\S)", " ", prompt)
    return re.sub(r"\s+", " ", without).strip()
