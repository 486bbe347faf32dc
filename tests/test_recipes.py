"""personalization.recipes: what each method trains and freezes, with the resolved config's numbers."""

from __future__ import annotations

import pytest

from personalization.config import (
    ADJECTIVE_TEMPLATES,
    BUNDLED_MINI_MODEL,
    DEFAULT_IDENTIFIER,
    MINI_WORLD_TEMPLATES,
    STYLE_TEMPLATES,
    ConfigError,
    TrainingConfig,
)
from personalization.recipes import Recipe, recipe_for

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def resolved(**fields: object) -> TrainingConfig:
    values = {"class_noun": "dog", "base_model": SD15, **fields}
    return TrainingConfig(**values).resolved()  # type: ignore[arg-type]


def recipe(**fields: object) -> Recipe:
    return recipe_for(resolved(**fields))


def adjective_prompts(trigger: str, noun: str = "dog", templates: tuple[str, ...] = ADJECTIVE_TEMPLATES):
    return tuple(template.format(trigger=trigger, noun=noun) for template in templates)


@pytest.mark.parametrize(("mode", "unet_trainable", "unet_rate"), [("lora", "unet_lora", 1e-4),
                                                                   ("full", "unet_full", 2e-6)])
def test_two_stage_learns_the_trigger_then_trains_the_unet_with_the_text_side_frozen(mode, unet_trainable,
                                                                                    unet_rate):
    config = resolved(stage2_mode=mode)
    plan = recipe_for(config)
    assert (plan.method, plan.learns_token, plan.needs_class_images) == ("two_stage", True, False)
    embedding, unet = plan.stages
    # Stage 1: only the trigger's embedding row moves (so the text side is not frozen), at the TI learning rate.
    assert (embedding.name, embedding.trainable, embedding.steps, embedding.learning_rate) == (
        "stage 1 · trigger embedding", "embedding", 100, 5e-3)
    assert (embedding.weight_decay, embedding.text_frozen, embedding.train_text_encoder,
            embedding.prior_preservation) == (0.0, False, False, False)
    # Stage 2: the U-Net alone; text encoder and the stage-1 embedding frozen, no class images.
    assert (unet.name, unet.trainable, unet.steps, unet.learning_rate) == (
        f"stage 2 · U-Net {mode}", unet_trainable, 400, unet_rate)
    assert (unet.text_frozen, unet.train_text_encoder, unet.prior_preservation, unet.weight_decay) == (
        True, False, False, 0.0)
    # Both stages see the same prompts: the trigger as an adjective before the class noun.
    assert embedding.prompts == unet.prompts == adjective_prompts(config.trigger_token)
    assert plan.total_steps == 500


def test_sd_models_default_to_a_lora_stage_2():
    assert recipe().stages[1].trainable == "unet_lora"


def test_textual_inversion_trains_the_embedding_only():
    config = resolved(method="textual_inversion")
    plan = recipe_for(config)
    assert (plan.learns_token, plan.needs_class_images, plan.total_steps) == (True, False, 3000)
    (stage,) = plan.stages
    assert (stage.name, stage.trainable, stage.steps, stage.learning_rate, stage.text_frozen) == (
        "textual inversion", "embedding", 3000, 5e-4, False)
    assert stage.prompts == adjective_prompts(config.trigger_token)


@pytest.mark.parametrize(("method", "name", "trainable", "rate"), [
    ("dreambooth", "DreamBooth", "unet_full", 5e-6),
    ("dreambooth_lora", "DreamBooth LoRA", "unet_lora", 1e-4),
])
def test_dreambooth_trains_the_unet_on_an_existing_identifier(method, name, trainable, rate):
    plan = recipe(method=method)
    assert (plan.learns_token, plan.needs_class_images, plan.total_steps) == (False, False, 800)
    (stage,) = plan.stages
    assert (stage.name, stage.trainable, stage.steps, stage.learning_rate) == (name, trainable, 800, rate)
    # No embedding is learned: the prompts carry DreamBooth's rare identifier, and the text side stays frozen.
    assert stage.prompts == adjective_prompts(DEFAULT_IDENTIFIER)
    assert (stage.text_frozen, stage.train_text_encoder, stage.prior_preservation) == (True, False, False)


def test_dreambooth_options_reach_its_stage():
    plan = recipe(method="dreambooth", train_text_encoder=True, prior_preservation=True, class_images=50)
    (stage,) = plan.stages
    assert (stage.train_text_encoder, stage.text_frozen, stage.prior_preservation) == (True, False, True)
    assert plan.needs_class_images
    lora = recipe(method="dreambooth_lora", prior_preservation=True).stages[0]
    assert (lora.prior_preservation, lora.train_text_encoder, lora.text_frozen) == (True, False, True)


def test_every_number_comes_from_the_resolved_config():
    config = resolved(stage1_steps=123, stage1_learning_rate=1e-3, stage1_weight_decay=0.01, stage2_steps=45,
                      stage2_learning_rate=3e-5, stage2_mode="full", trigger_token="<zq>",
                      prompt_templates=["{trigger} {noun} alone", "one {trigger} {noun}"])
    embedding, unet = recipe_for(config).stages
    assert (embedding.steps, embedding.learning_rate, embedding.weight_decay) == (123, 1e-3, 0.01)
    assert (unet.steps, unet.learning_rate, unet.weight_decay) == (45, 3e-5, 0.0)  # decay is a stage-1 option
    assert embedding.prompts == unet.prompts == ("<zq> dog alone", "one <zq> dog")
    assert recipe_for(config).total_steps == 168


def test_subject_presets_and_the_mini_world_change_the_recipe_through_the_config():
    person = recipe(subject_type="person", class_noun="man")  # faces need 1.25x the steps
    assert [stage.steps for stage in person.stages] == [125, 500]
    style = resolved(subject_type="style", class_noun="style")
    assert recipe_for(style).stages[0].prompts == adjective_prompts(style.trigger_token, "style", STYLE_TEMPLATES)
    mini = resolved(class_noun="star", base_model=BUNDLED_MINI_MODEL)
    mini_unet = recipe_for(mini).stages[1]
    assert (mini_unet.trainable, mini_unet.learning_rate) == ("unet_full", 2e-4)  # two-stage's own rate there
    assert mini_unet.prompts == adjective_prompts(mini.trigger_token, "star", MINI_WORLD_TEMPLATES)


@pytest.mark.parametrize(("fields", "message"), [
    ({"method": "two_stage", "prior_preservation": True}, "prior_preservation is a DreamBooth option"),
    ({"method": "textual_inversion", "prior_preservation": True}, "prior_preservation is a DreamBooth option"),
    ({"method": "two_stage", "train_text_encoder": True}, "train_text_encoder is a DreamBooth option"),
    ({"method": "dreambooth_lora", "train_text_encoder": True}, "not available with dreambooth_lora"),
    ({"method": "two_stage", "stage1_steps": 0}, "stage1_steps must be at least 1 for two_stage"),
    ({"method": "dreambooth", "stage2_steps": 0}, "nothing would be trained"),
])
def test_combinations_no_recipe_expresses_are_refused_before_one_is_built(fields, message):
    with pytest.raises(ConfigError, match=message):
        recipe(**fields)


def test_dreambooth_ignores_stage_1_steps_and_textual_inversion_ignores_stage_2_steps():
    assert [stage.trainable for stage in recipe(method="dreambooth", stage1_steps=50).stages] == ["unet_full"]
    assert [stage.trainable for stage in recipe(method="textual_inversion", stage2_steps=50).stages] == ["embedding"]
