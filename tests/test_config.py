import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from personalization.config import (
    BUNDLED_MINI_MODEL,
    GENERATION_DEFAULTS,
    METHODS,
    ConfigError,
    FieldInfo,
    ResolvedConfig,
    TrainingConfig,
    config_fields,
    default_trigger,
    form_fields,
)
from personalization.device import MINI_MODEL_DIR, SD15_HUB_ID

REPO = Path(__file__).resolve().parent.parent


def test_resolved_fills_method_defaults_and_keeps_explicit_values():
    config = TrainingConfig(class_noun="Dog", stage2_steps=123).resolved()
    assert config.method == "two_stage"
    assert config.class_noun == "dog"
    assert config.stage1_steps == 100 and config.stage2_steps == 123
    assert config.stage2_learning_rate == 1e-4  # lora mode
    assert config.trigger_token == "<my-dog>" and config.init_word == "dog"
    assert config.lora_alpha == config.lora_rank
    assert config.instance_prompt() == "a photo of a <my-dog> dog"
    full = TrainingConfig(class_noun="dog", stage2_mode="full").resolved()
    assert full.stage2_learning_rate == 2e-6


def test_dreambooth_uses_an_existing_identifier_and_no_stage1():
    config = TrainingConfig(class_noun="dog", method="dreambooth").resolved()
    assert config.trigger_token == "sks"
    assert config.stage1_steps == 0 and config.stage2_steps == 800
    assert config.stage2_mode == "full"
    assert TrainingConfig(class_noun="dog", method="dreambooth_lora").resolved().stage2_mode == "lora"


def test_presets_change_templates_flip_and_steps():
    person = TrainingConfig(class_noun="man", subject_type="person").resolved()
    pet = TrainingConfig(class_noun="cat", subject_type="pet").resolved()
    style = TrainingConfig(class_noun="style", subject_type="style").resolved()
    assert person.stage1_steps == 125 and person.flip is False
    assert pet.flip is True
    assert all("painting" in t or "rendering" in t or "picture" in t or "illustration" in t
               for t in style.prompt_templates)
    assert style.instance_prompt().startswith("a painting in")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"method": "magic"}, "method"),
        ({"stage2_mode": "half"}, "stage2_mode"),
        ({"class_noun": "dog!!"}, "class_noun"),
        ({"class_noun": ""}, "class_noun"),
        ({"resolution": 100}, "resolution"),
        ({"stage1_steps": -1}, "stage1_steps"),
        ({"stage2_learning_rate": "fast"}, "stage2_learning_rate"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"max_batch_size": 1000}, "max_batch_size"),
        ({"trigger_token": "two words"}, "trigger_token"),
        ({"prior_preservation": True}, "prior_preservation"),
        ({"train_text_encoder": True}, "train_text_encoder"),
        ({"snr_gamma": 0.0}, "snr_gamma"),
        ({"prompt_templates": ["a photo of {noun}"]}, "prompt_templates"),
        ({"seed": True}, "seed"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(changes, field):
    with pytest.raises(ConfigError) as caught:
        TrainingConfig(**{"class_noun": "dog", **changes}).validate()
    assert field in str(caught.value)
    assert "\n" not in str(caught.value)


def test_text_encoder_lora_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="train_text_encoder is not available with dreambooth_lora"):
        TrainingConfig(class_noun="dog", method="dreambooth_lora", train_text_encoder=True).validate()


def test_nothing_to_train_is_refused():
    with pytest.raises(ConfigError, match="nothing would be trained"):
        TrainingConfig(class_noun="dog", method="dreambooth", stage2_steps=0).resolved()
    with pytest.raises(ConfigError, match="stage1_steps must be at least 1 for two_stage"):
        TrainingConfig(class_noun="dog", stage1_steps=0).resolved()


def test_json_round_trip_and_unknown_fields(tmp_path):
    config = TrainingConfig(class_noun="dog", validation_prompts=["a <my-dog> dog"]).resolved()
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert ResolvedConfig.from_json_file(path) == config
    assert TrainingConfig.from_json_file(path).resolved() == config
    assert TrainingConfig.from_json_file(path).to_dict() == config.to_dict()
    path.write_text(json.dumps({"class_noun": "dog", "learning_rate": 1}))
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainingConfig.from_json_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"training_config\.json"):
        TrainingConfig.from_json_file(path)


def test_default_trigger_is_a_bracketed_slug():
    assert default_trigger("Teddy Bear") == "<my-teddy-bear>"


def test_the_mini_world_gets_prompts_in_its_own_vocabulary():
    config = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes").resolved()
    assert config.prompt_templates == ["a photo of a {trigger} {noun}", "a {trigger} {noun}"]
    assert config.sample_prompts() == [f"a photo of a <my-star> star on a {colour} background"
                                       for colour in ("blue", "green", "yellow", "black")]
    sd = TrainingConfig(class_noun="dog", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5").resolved()
    assert len(sd.prompt_templates) == 8 and sd.sample_prompts()[0].endswith("on the beach")


@pytest.mark.parametrize("base_model", ["bundled:mini-shapes", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_samples_show_the_subject_in_new_places(base_model):
    """One sample per context (the Train tab's grid and the card's widget); the user's own prompts still win."""
    for count in (1, 3, 4, 6):
        config = TrainingConfig(class_noun="dog", base_model=base_model, sample_count=count).resolved()
        contexts = config.context_prompts()
        assert len(contexts) >= 4
        assert config.sample_prompts() == [contexts[index % len(contexts)] for index in range(count)]
        assert config.instance_prompt() not in config.sample_prompts()
    # No samples: still one prompt, since the trainer's preview draws the first.
    assert TrainingConfig(class_noun="dog", base_model=base_model, sample_count=0).sample_prompts() == contexts[:1]
    mine = TrainingConfig(class_noun="dog", base_model=base_model, validation_prompts=["a <my-dog> dog asleep"])
    assert mine.sample_prompts() == ["a <my-dog> dog asleep"]


def test_mini_world_defaults_follow_the_measurements():
    two_stage = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes").resolved()
    # Two-stage's full U-Net trains half DreamBooth's steps at twice its rate there (README, the curves).
    assert two_stage.stage2_mode == "full" and two_stage.stage2_learning_rate == 2e-4
    dreambooth = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes", method="dreambooth").resolved()
    assert dreambooth.stage2_learning_rate == 1e-4
    sd15_full = TrainingConfig(class_noun="star", stage2_mode="full").resolved()
    assert sd15_full.stage2_learning_rate == 2e-6  # the mini model's rates stay off SD-size bases
    lora = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes", stage2_mode="lora").resolved()
    assert lora.stage2_learning_rate == 1e-3
    db_lora = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes", method="dreambooth_lora").resolved()
    assert db_lora.stage2_mode == "lora" and db_lora.stage2_learning_rate == 1e-3
    assert TrainingConfig(class_noun="dog").resolved().stage2_mode == "lora"


@pytest.fixture(scope="module")
def mini_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(MINI_MODEL_DIR, tmp_path_factory.mktemp("elsewhere") / "my_model"))


def _resolved_pair(base_model: str, reference: str, method: str) -> tuple[dict, dict]:
    """Resolved configs (and sample prompts) for two base models, the base model itself left out."""
    pair = []
    for base in (base_model, reference):
        config = TrainingConfig(class_noun="star", method=method, base_model=base).resolved()
        pair.append({**config.to_dict(), "base_model": None, "sample_prompts": config.sample_prompts()})
    return pair[0], pair[1]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["relative path", "absolute path", "copy elsewhere"])
def test_the_mini_model_by_path_gets_the_mini_world_recipe(form, method, mini_copy, monkeypatch):
    monkeypatch.chdir(REPO)
    base = {"relative path": "personalization/assets/mini_model", "absolute path": str(MINI_MODEL_DIR),
            "copy elsewhere": str(mini_copy)}[form]
    by_path, by_name = _resolved_pair(base, BUNDLED_MINI_MODEL, method)
    assert by_path == by_name


@pytest.mark.parametrize("method", METHODS)
def test_a_folder_that_is_not_the_mini_model_gets_the_sd_recipe(method, tiny_base):
    by_path, sd = _resolved_pair(str(tiny_base), SD15_HUB_ID, method)
    assert by_path == sd
    assert by_path != _resolved_pair(BUNDLED_MINI_MODEL, SD15_HUB_ID, method)[0]


def test_a_training_info_without_the_world_marker_is_not_the_mini_world(tmp_path):
    (tmp_path / "training_info.json").write_text(json.dumps({"step": 1}))
    by_path, sd = _resolved_pair(str(tmp_path), SD15_HUB_ID, "two_stage")
    assert by_path == sd


# ---- the resolved type ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_resolved_is_a_resolved_config_with_every_default_filled(method):
    resolved = TrainingConfig(class_noun="dog", method=method).resolved()
    assert type(resolved) is ResolvedConfig and isinstance(resolved, TrainingConfig)
    hints = typing.get_type_hints(ResolvedConfig)
    for name in ResolvedConfig.__annotations__:  # the fields resolved() fills: none Optional, none None
        assert type(None) not in typing.get_args(hints[name]), name
        assert getattr(resolved, name) is not None, name
    assert typing.get_args(hints["method"]) == METHODS and set(typing.get_args(hints["stage2_mode"])) == {"full",
                                                                                                         "lora"}
    # A changed copy keeps the type (and the filled values); resolving again changes nothing.
    changed = dataclasses.replace(resolved, seed=7)
    assert type(changed) is ResolvedConfig and changed.seed == 7 and changed.resolved() == changed
    assert resolved.resolved() == resolved


def test_a_resolved_config_cannot_be_built_with_a_gap():
    values = TrainingConfig(class_noun="dog").resolved().to_dict()
    with pytest.raises(ConfigError, match="a resolved config needs trigger_token"):
        ResolvedConfig(**{**values, "trigger_token": None})
    del values["stage1_steps"]
    with pytest.raises(TypeError, match="stage1_steps"):
        ResolvedConfig(**values)


def test_an_older_training_config_json_still_loads(tmp_path):
    """A file written before a field existed loads with that field's default, as either type."""
    saved = TrainingConfig(class_noun="dog", method="dreambooth").resolved().to_dict()
    for newer in ("compile_unet", "stage1_weight_decay", "center_crop", "checkpoints", "keep_step"):
        del saved[newer]
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(saved))
    old = ResolvedConfig.from_json_file(path)
    assert type(old) is ResolvedConfig and old.compile_unet is False and old.stage2_steps == 800
    assert TrainingConfig.from_json_file(path).resolved() == old


# What training_config.json holds for a default run (trainer.write_json: sorted keys, indent 2). Changing a field's
# name, default or derivation changes saved files; this says so on purpose.
SAVED_DEFAULT_TWO_STAGE = {
    "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "center_crop": True, "checkpoints": 4,
    "class_images": 100,
    "class_noun": "dog", "class_prompt": "a photo of a dog", "compile_unet": False, "flip": False,
    "gradient_checkpointing": False, "guidance_scale": 5.0, "init_word": "dog", "keep_step": "best",
    "lora_alpha": 16, "lora_rank": 16,
    "max_batch_size": 4, "max_grad_norm": 1.0, "method": "two_stage", "mixed_precision": "auto",
    "preview_interval": 0, "prior_loss_weight": 1.0, "prior_preservation": False,
    "prompt_templates": [
        "a photo of a {trigger} {noun}", "a rendering of a {trigger} {noun}",
        "a cropped photo of the {trigger} {noun}", "the photo of a {trigger} {noun}",
        "a close-up photo of a {trigger} {noun}", "a bright photo of the {trigger} {noun}",
        "a good photo of a {trigger} {noun}", "a photo of one {trigger} {noun}",
    ],
    "resolution": 512, "sample_count": 4, "sample_steps": 25, "score_checkpoints": True, "seed": 0, "snr_gamma": 5.0,
    "stage1_learning_rate": 0.005, "stage1_steps": 100, "stage1_weight_decay": 0.0, "stage2_learning_rate": 0.0001,
    "stage2_mode": "lora", "stage2_steps": 400, "subject_type": "object", "train_text_encoder": False,
    "trigger_token": "<my-dog>", "use_8bit_adam": False, "validation_prompts": [],
}


def test_the_saved_config_of_a_default_run_is_unchanged():
    config = TrainingConfig(class_noun="Dog", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                            resolution=512).resolved()
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    assert text == json.dumps(SAVED_DEFAULT_TWO_STAGE, indent=2, sort_keys=True)


# ---- field metadata ------------------------------------------------------------------------------------------------
def test_every_field_says_how_it_is_shown_and_set():
    fields = config_fields()
    assert [spec.name for spec in fields] == [f.name for f in dataclasses.fields(TrainingConfig)]
    flags = [spec.info.flag for spec in fields]
    assert all(isinstance(spec.info, FieldInfo) and spec.info.label for spec in fields)
    assert all(flag and flag.startswith("--") for flag in flags) and len(set(flags)) == len(flags)
    by_name = {spec.name: spec for spec in fields}
    assert by_name["stage1_learning_rate"].info.flag == "--stage1-lr"
    assert by_name["max_batch_size"].info.flag == "--batch-size"
    assert by_name["method"].choices == METHODS and by_name["stage2_mode"].optional
    assert by_name["snr_gamma"].info.none_is_off and by_name["snr_gamma"].default == 5.0
    assert by_name["stage1_steps"].kind is int and by_name["guidance_scale"].kind is float
    assert by_name["validation_prompts"].kind is list and by_name["validation_prompts"].default == []


def test_the_form_fields_are_the_apps_hyperparameters():
    assert [spec.name for spec in form_fields()] == [
        "stage1_steps", "stage1_learning_rate", "stage2_steps", "stage2_learning_rate", "max_batch_size", "lora_rank",
        "prior_preservation", "class_images", "train_text_encoder", "seed", "gradient_checkpointing",
        "use_8bit_adam", "compile_unet", "preview_interval", "checkpoints",
    ]
    labels = {spec.name: spec.info.label for spec in form_fields()}
    assert labels["stage1_steps"] == "Stage 1 / TI steps" and labels["max_batch_size"] == "Images per step"


def test_form_values_are_coerced_to_the_fields_types():
    by_name = {spec.name: spec for spec in config_fields()}
    assert by_name["stage1_steps"].coerce(400.0) == 400 and type(by_name["stage1_steps"].coerce(400.0)) is int
    assert by_name["stage1_steps"].coerce(None) is None and by_name["stage1_steps"].coerce("") is None
    assert type(by_name["stage2_learning_rate"].coerce(1)) is float
    assert by_name["prior_preservation"].coerce(1) is True
    values = {spec.name: spec.coerce(spec.default) for spec in form_fields()}
    assert TrainingConfig(class_noun="dog", **values).validate().max_batch_size == 4


BOUNDED = [spec for spec in config_fields() if spec.info.minimum is not None]


@pytest.mark.parametrize("spec", BOUNDED, ids=[spec.name for spec in BOUNDED])
def test_the_bounds_in_the_metadata_are_what_validate_checks(spec):
    low, high = spec.info.minimum, spec.info.maximum
    step = 1 if spec.kind is int else 1e-6
    too_low = low if spec.info.above_minimum else low - step
    for value in (too_low, high + step):
        with pytest.raises(ConfigError, match=spec.name):
            TrainingConfig(class_noun="dog", **{spec.name: spec.kind(value)}).validate()
    ok = high if spec.name != "resolution" else 2048
    TrainingConfig(class_noun="dog", **{spec.name: spec.kind(ok)}).validate()


def test_sample_images_use_the_generation_defaults():
    config = TrainingConfig(class_noun="dog")
    assert (config.sample_steps, config.guidance_scale) == (GENERATION_DEFAULTS.steps,
                                                           GENERATION_DEFAULTS.guidance_scale) == (25, 5.0)


def test_prompts_suggested_on_the_mini_model_use_only_its_words():
    """The mini world has no beach: every suggestion (Generate tab, card snippet, samples) stays in its vocabulary."""
    import re as regex

    from personalization.mini_world.world import COLOR_NAMES, SHAPES
    from personalization.model_card import diffusers_snippet

    vocabulary = {"a", "photo", "of", "on", "background", *COLOR_NAMES, *SHAPES}
    for method in METHODS:
        config = TrainingConfig(class_noun="star", method=method, base_model=BUNDLED_MINI_MODEL).resolved()
        snippet_prompt = regex.search(r'pipe\("([^"]+)"', diffusers_snippet(config, "a/b", BUNDLED_MINI_MODEL))[1]
        for prompt in [*config.context_prompts(), *config.sample_prompts(), snippet_prompt]:
            words = set(prompt.replace(config.trigger_token, "").split())
            assert words <= vocabulary, (method, prompt, words - vocabulary)
    sd = TrainingConfig(class_noun="dog", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5").resolved()
    assert sd.context_prompts()[0] == f"{sd.instance_prompt()} on the beach"
    assert len(sd.context_prompts()) >= 3 and len(config.context_prompts()) >= 3
