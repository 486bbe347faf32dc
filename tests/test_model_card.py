import json

import pytest
from huggingface_hub import ModelCard

from personalization.config import TrainingConfig
from personalization.model_card import build_model_card, card_for_repo
from personalization.trainer import train


@pytest.fixture(scope="module")
def artifact(tiny_base, tmp_path_factory):
    from tests.conftest import make_subject_images

    root = tmp_path_factory.mktemp("card")
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=2, stage2_steps=2,
                            sample_count=2, sample_steps=2)
    return train(config, make_subject_images(root / "subject"), root / "artifact").output_dir


def test_config_and_card_hold_no_absolute_path_or_secret(artifact, tiny_base):
    for path in artifact.rglob("*"):
        if path.suffix in {".json", ".md"}:
            text = path.read_text(encoding="utf-8")
            assert str(tiny_base) not in text and str(artifact.parent) not in text, path.name
            assert "/tmp" not in text and "hf_" not in text, path.name
    saved = json.loads((artifact / "training_config.json").read_text())
    assert saved["base_model"] == f"local:{tiny_base.name}"
    assert TrainingConfig.from_dict(saved).validate().trigger_token == "<my-box>"


def test_trained_card_widget_pairs_each_sample_with_its_new_context(artifact):
    config = TrainingConfig.from_dict(json.loads((artifact / "training_config.json").read_text()))
    widget = ModelCard.load(artifact / "README.md").data.to_dict()["widget"]
    assert [(entry["text"], entry["output"]["url"]) for entry in widget] == [
        (prompt, f"samples/sample_{index}.png") for index, prompt in enumerate(config.context_prompts()[:2])]
    assert all((artifact / entry["output"]["url"]).is_file() for entry in widget)


def test_card_metadata_for_a_hub_base_lora():
    config = TrainingConfig(class_noun="dog", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
                            resolution=512).resolved()
    summary = {"hardware": "NVIDIA H100", "seconds_training": 61.0,
               "stages": [{"name": "stage 1", "steps": 400, "seconds": 30.0, "final_loss": 0.1}]}
    card = build_model_card(config, summary, ["sample_0.png"], repo_id="alice/my-dog")
    data = card.data.to_dict()
    assert data["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data["base_model_relation"] == "adapter"
    assert data["license"] == "creativeml-openrail-m"
    assert data["instance_prompt"] == "a photo of a <my-dog> dog"
    assert {"text-to-image", "diffusers", "lora", "textual_inversion", "template:sd-lora",
            "two-stage-personalization"} <= set(data["tags"])
    assert data["widget"] == [{"text": f"{config.instance_prompt()} on the beach",
                               "output": {"url": "samples/sample_0.png"}}]
    assert 'pipe.load_textual_inversion("alice/my-dog")' in card.text
    assert 'pipe.load_lora_weights("alice/my-dog")' in card.text
    # The YAML is real YAML: it parses back to the same metadata.
    assert ModelCard(str(card)).data.to_dict()["instance_prompt"] == "a photo of a <my-dog> dog"


def test_card_widget_shows_the_subject_in_new_places_in_words_the_mini_model_knows():
    """The widget gallery is the Train tab's grid: sample i drawn from sample_prompts()[i], each a new context."""
    from personalization.device import BUNDLED_MINI_MODEL
    from personalization.mini_world.world import COLOR_NAMES, SHAPES

    config = TrainingConfig(class_noun="star", base_model=BUNDLED_MINI_MODEL).resolved()
    names = [f"sample_{index}.png" for index in range(config.sample_count)]
    widget = build_model_card(config, {"stages": []}, names).data.to_dict()["widget"]
    assert [entry["text"] for entry in widget] == config.sample_prompts()
    assert [entry["output"]["url"] for entry in widget] == [f"samples/{name}" for name in names]
    assert len(widget) == 4 and len({entry["text"] for entry in widget}) == 4
    vocabulary = {"a", "photo", "of", "on", "background", *COLOR_NAMES, *SHAPES}
    for entry in widget:
        assert entry["text"] in config.context_prompts()
        words = set(entry["text"].replace(config.trigger_token, "").split())
        assert words <= vocabulary, words - vocabulary


def test_full_unet_card_swaps_the_unet():
    config = TrainingConfig(class_noun="dog", method="dreambooth",
                            base_model="stable-diffusion-v1-5/stable-diffusion-v1-5").resolved()
    card = build_model_card(config, {"stages": []}, [], repo_id="alice/db")
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    assert 'UNet2DConditionModel.from_pretrained("alice/db", subfolder="unet"' in card.text
    assert "load_textual_inversion" not in card.text


def test_card_for_repo_names_the_repo_and_leaves_the_local_card_alone(artifact):
    local = (artifact / "README.md").read_bytes()
    card = card_for_repo(artifact, "bob/box").decode()
    assert 'pipe.load_textual_inversion("bob/box")' in card and "YOUR_NAME/THIS_REPO" not in card
    assert card.encode() == local.replace(b"YOUR_NAME/THIS_REPO", b"bob/box")
    assert (artifact / "README.md").read_bytes() == local


def test_card_snippet_runs_against_the_local_folder(artifact, tiny_base):
    """The card's code, pointed at this folder and base, really loads and generates."""
    text = (artifact / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("YOUR_NAME/THIS_REPO", str(artifact)).replace("PATH/TO/BASE_MODEL", str(tiny_base))
    code = code.replace("num_inference_steps=25", "num_inference_steps=2")
    code = code.replace('"sample.png"', repr(str(artifact.parent / "s.png")))
    exec(compile(code, "card_snippet", "exec"), {})
    assert (artifact.parent / "s.png").is_file()
