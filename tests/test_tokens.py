import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from personalization.tokens import (
    TriggerError,
    add_trigger_token,
    build_prompts,
    check_trigger,
    strip_trigger,
    suggest_trigger,
)
from tests.tiny_pipeline import TOKENIZER_DIR


@pytest.fixture
def tokenizer():
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)


def test_vocabulary_word_is_refused_with_a_suggestion(tokenizer):
    check = check_trigger(tokenizer, "dog")
    assert not check.ok and "already a word" in check.message
    assert check.suggestion and check_trigger(tokenizer, check.suggestion).ok


def test_spaces_are_refused(tokenizer):
    check = check_trigger(tokenizer, "my dog")
    assert not check.ok and "split into several tokens" in check.message
    assert check.suggestion == "<my-dog>"


def test_new_token_is_accepted_and_suggestions_are_new(tokenizer):
    assert check_trigger(tokenizer, "<zq-dog>").ok
    assert check_trigger(tokenizer, suggest_trigger(tokenizer, "dog", seed=3)).ok


def test_identifier_must_be_one_existing_token(tokenizer):
    assert check_trigger(tokenizer, "sks", allow_existing_word=True).ok
    assert not check_trigger(tokenizer, "<zq-dog>", allow_existing_word=True).ok


def test_add_trigger_copies_the_init_embedding(tokenizer):
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, vocab_size=49408))
    token_id = add_trigger_token(tokenizer, encoder, "<zq-dog>", "dog")
    weight = encoder.get_input_embeddings().weight
    dog_id = tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert token_id == 49408 and weight.shape[0] == 49409
    assert torch.equal(weight[token_id], weight[dog_id])
    assert tokenizer("a photo of a <zq-dog> dog").input_ids == [49406, 320, 1125, 539, 320, 49408, 1929, 49407]
    with pytest.raises(TriggerError, match="already a word"):
        add_trigger_token(tokenizer, encoder, "<zq-dog>", "dog")


def test_prompts_put_the_trigger_before_the_noun_and_strip_removes_it():
    prompts = build_prompts(["a photo of a {trigger} {noun}"], "<t>", "dog")
    assert prompts == ["a photo of a <t> dog"]
    assert strip_trigger("a photo of a <t> dog on the beach", "<t>") == "a photo of a dog on the beach"


def test_a_trigger_inside_common_words_is_refused(tokenizer):
    check = check_trigger(tokenizer, "phot")
    assert not check.ok and "appears inside the word" in check.message
    assert check.suggestion == "<phot>" and check_trigger(tokenizer, "<phot>").ok
    assert check_trigger(tokenizer, "<my dog>").suggestion == "<my-dog>"
