import json
import shutil
from pathlib import Path

import pytest

from personalization.config import BUNDLED_MINI_MODEL, METHODS, ConfigError, TrainingConfig, default_trigger
from personalization.device import MINI_MODEL_DIR, SD15_HUB_ID

REPO = Path(__file__).resolve().parent.parent


def test_resolved_fills_method_defaults_and_keeps_explicit_values():
    config = TrainingConfig(class_noun="Dog", stage2_steps=123).resolved()
    assert config.method == "two_stage"
    assert config.class_noun == "dog"
    assert config.stage1_steps == 400 and config.stage2_steps == 123
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
    assert person.stage1_steps == 500 and person.flip is False
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
    assert TrainingConfig.from_json_file(path) == config
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
    assert config.sample_prompts()[1] == "a photo of a <my-star> star on a blue background"
    sd = TrainingConfig(class_noun="dog", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5").resolved()
    assert len(sd.prompt_templates) == 8 and sd.sample_prompts()[1].endswith("on the beach")


def test_mini_world_defaults_follow_the_measurements():
    two_stage = TrainingConfig(class_noun="star", base_model="bundled:mini-shapes").resolved()
    assert two_stage.stage2_mode == "full" and two_stage.stage2_learning_rate == 1e-4
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
