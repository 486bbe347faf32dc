import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from personalization import evaluation
from personalization.cli import main
from personalization.config import TrainingConfig
from personalization.generation import Generator
from personalization.trainer import train
from tests.tiny_pipeline import TOKENIZER_DIR


@pytest.fixture(scope="module")
def feature_folders(tmp_path_factory):
    """Tiny random CLIP and DINO-shaped ViT, saved and loaded through the same from_pretrained path as real ones."""
    root = tmp_path_factory.mktemp("features")
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    ))
    clip.save_pretrained(root / "clip")
    for name in TOKENIZER_DIR.iterdir():
        shutil.copy(name, root / "clip" / name.name)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(root / "dino")
    return root / "clip", root / "dino"


@pytest.fixture(scope="module")
def feature_models(feature_folders):
    clip_folder, dino_folder = feature_folders
    return evaluation.FeatureModels(str(clip_folder), str(dino_folder), device=torch.device("cpu"))


def solid(color, size=48):
    return Image.new("RGB", (size, size), color)


def test_identical_images_score_one_and_different_ones_less(feature_models):
    red, blue = solid((220, 30, 30)), solid((20, 40, 230))
    assert evaluation.clip_i(feature_models, [red], [red]) == pytest.approx(1.0, abs=1e-5)
    assert evaluation.dino(feature_models, [red], [red]) == pytest.approx(1.0, abs=1e-5)
    assert evaluation.dino(feature_models, [red], [blue]) < 0.9999
    assert evaluation.drift(feature_models, [red, blue], [red, blue]) == pytest.approx(0.0, abs=1e-5)
    assert evaluation.drift(feature_models, [red], [blue]) > 0


def test_clip_t_pairs_each_image_with_its_prompt(feature_models):
    score = evaluation.clip_t(feature_models, [solid((1, 2, 3))], ["a photo of a dog"])
    assert -1.0 <= score <= 1.0
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        evaluation.clip_t(feature_models, [solid((1, 2, 3))], ["a", "b"])


def test_prompt_lists_are_the_dreambooth_ones():
    assert len(evaluation.OBJECT_PROMPTS) == 25 and len(evaluation.LIVE_PROMPTS) == 25
    assert evaluation.prompt_list("live")[11] == "a {} wearing a santa hat"
    with pytest.raises(ValueError, match="'object' or 'live'"):
        evaluation.prompt_list("animal")


def test_evaluate_artifact_end_to_end(feature_models, feature_folders, tiny_base, subject_dir, tmp_path):
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=2, stage2_steps=2,
                            stage2_learning_rate=5e-2, sample_count=0)
    artifact = train(config, subject_dir, tmp_path / "artifact").output_dir
    references = [Image.open(p) for p in sorted(subject_dir.glob("*.png"))]
    report = evaluation.evaluate_artifact(
        artifact, references, seeds=1, steps=2, base_model=str(tiny_base), models=feature_models,
        generator=Generator(device=torch.device("cpu"), dtype=torch.float32), max_prompts=2,
    )
    assert report.prompts == 2 and report.images_per_prompt == 1
    assert 0.0 < report.drift < 2.0  # the LoRA changes class prompts a little
    assert -1.0 <= report.clip_i <= 1.0 and -1.0 <= report.dino <= 1.0
    assert "CLIP-I" in report.table()

    out = tmp_path / "report.json"
    code = main(["evaluate", "--artifact", str(artifact), "--references", str(subject_dir), "--base-model",
                 str(tiny_base), "--clip-model", str(feature_folders[0]), "--dino-model", str(feature_folders[1]),
                 "--seeds", "1", "--steps", "2", "--max-prompts", "1", "--out", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["prompts"] == 1 and set(saved) >= {"clip_i", "clip_t", "dino", "drift"}
