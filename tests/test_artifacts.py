"""The artifact format: each writer of personalization.artifacts, read back by read_artifact and by the plain
diffusers / transformers loaders that Hub users run; the reader's refusals of damaged folders; the web-UI names.

The atomic write (staging, backup, recovery after a kill) is tested in test_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from personalization import artifacts
from personalization.artifacts import ArtifactError, ArtifactInfo, read_artifact

TRIGGER = "<my-box>"
CONFIG = {"base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "method": "two_stage", "trigger_token": TRIGGER,
          "class_noun": "box", "subject_type": "object", "seed": 7}


def expected_info(folder: Path, **has: bool) -> ArtifactInfo:
    flags = {"has_embeddings": False, "has_lora": False, "has_unet": False, "has_text_encoder": False, **has}
    return ArtifactInfo(folder=folder, base_model=CONFIG["base_model"], method="two_stage", trigger_token=TRIGGER,
                        class_noun="box", instance_prompt="a photo of a <my-box> box", config=CONFIG, **flags)


def new_artifact(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    artifacts.save_config(folder, CONFIG)
    return folder


def tiny_unet(tiny_base: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")


def fp16_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to(torch.float16).clone() for name, tensor in module.state_dict().items()}


def stored_dtypes(path: Path) -> set[torch.dtype]:
    """The dtypes in the file itself: from_pretrained(dtype=...) would cast whatever was stored."""
    return {tensor.dtype for tensor in load_file(str(path)).values()}


# ---- write -> read round trips ---------------------------------------------------------------------------------------
def test_embedding_round_trip_with_its_web_ui_copy(tmp_path):
    folder = new_artifact(tmp_path)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    artifacts.save_embedding(folder, TRIGGER, vector)
    copies = artifacts.save_webui_copies(folder, TRIGGER, vector, None)

    assert read_artifact(folder) == expected_info(folder, has_embeddings=True)
    stored = load_file(str(folder / artifacts.EMBEDDINGS_FILE))
    assert list(stored) == [TRIGGER]  # the key is the trigger: load_textual_inversion(dir) needs no token=
    assert stored[TRIGGER].dtype == torch.float32 and torch.equal(stored[TRIGGER], vector.reshape(1, 32))
    assert copies == [folder / "my-box_emb.safetensors"]
    webui = load_file(str(copies[0]))
    assert list(webui) == ["emb_params"] and torch.equal(webui["emb_params"], vector.reshape(1, 32))


def test_lora_round_trip_through_load_lora_weights(tmp_path, tiny_base):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from personalization.trainer import LORA_TARGET_MODULES

    unet = tiny_unet(tiny_base)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))
    with torch.no_grad():  # lora_B starts at zero; random values show every tensor travels
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder = new_artifact(tmp_path)
    path = artifacts.save_lora(folder, layers, unet.peft_config["default"].to_dict())
    copies = artifacts.save_webui_copies(folder, TRIGGER, None, layers)

    assert path == folder / "pytorch_lora_weights.safetensors"
    assert read_artifact(folder) == expected_info(folder, has_lora=True)
    with safe_open(str(path), framework="pt") as file:
        assert sorted(file.keys()) == sorted(f"unet.{key}" for key in layers)
        assert all(torch.equal(file.get_tensor(f"unet.{key}"), value) for key, value in layers.items())
        metadata = json.loads(file.metadata()["lora_adapter_metadata"])
    assert (metadata["unet.r"], metadata["unet.lora_alpha"]) == (4, 8)
    assert sorted(metadata["unet.target_modules"]) == sorted(LORA_TARGET_MODULES)

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    pipeline.load_lora_weights(str(folder))
    (adapter, loaded_config), = pipeline.unet.peft_config.items()
    assert (loaded_config.r, loaded_config.lora_alpha) == (4, 8)  # the metadata, not diffusers' guess from shapes
    loaded = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet, adapter_name=adapter))
    assert loaded.keys() == layers.keys() and all(torch.equal(loaded[key], layers[key]) for key in layers)
    assert copies == [folder / "my-box_lora_kohya.safetensors"]
    assert all(key.startswith("lora_unet_") for key in load_file(str(copies[0])))


def test_full_unet_round_trip_in_float16(tmp_path, tiny_base):
    from diffusers import UNet2DConditionModel

    unet = tiny_unet(tiny_base)
    expected = fp16_copy(unet)
    folder = new_artifact(tmp_path)
    assert artifacts.save_unet(folder, unet) == folder / "unet"

    assert read_artifact(folder) == expected_info(folder, has_unet=True)
    loaded = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float16).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(loaded[key].dtype == torch.float16 and torch.equal(loaded[key], expected[key]) for key in expected)
    assert stored_dtypes(folder / "unet" / "diffusion_pytorch_model.safetensors") == {torch.float16}


def test_text_encoder_round_trip_in_float16(tmp_path, tiny_base):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder")
    expected = fp16_copy(text_encoder)
    folder = new_artifact(tmp_path)
    assert artifacts.save_text_encoder(folder, text_encoder) == folder / "text_encoder"

    assert read_artifact(folder) == expected_info(folder, has_text_encoder=True)
    loaded = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float16).state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)
    assert stored_dtypes(folder / "text_encoder" / "model.safetensors") == {torch.float16}


def test_samples_are_written_as_they_arrive_and_listed_by_the_reader(tmp_path):
    folder = new_artifact(tmp_path)
    artifacts.save_embedding(folder, TRIGGER, torch.zeros(32))
    pixels = [np.full((8, 8, 3), value, dtype=np.uint8) for value in (10, 200)]

    def render():
        for index, array in enumerate(pixels):
            # the previous sample is on disk before the next is rendered (a cancel keeps what was written)
            assert sorted(p.name for p in folder.glob("samples/*.png")) == [f"sample_{i}.png" for i in range(index)]
            yield Image.fromarray(array)

    assert artifacts.save_samples(folder, render()) == ["sample_0.png", "sample_1.png"]
    files = read_artifact(folder).sample_files
    assert files == [folder / "samples" / "sample_0.png", folder / "samples" / "sample_1.png"]
    assert all(np.array_equal(np.asarray(Image.open(path)), array) for path, array in zip(files, pixels, strict=True))

    empty = tmp_path / "empty"
    empty.mkdir()
    assert artifacts.save_samples(empty, iter([])) == [] and not (empty / "samples").exists()


def test_json_files_and_card_are_written_byte_for_byte(tmp_path):
    folder = new_artifact(tmp_path)
    summary = {"seconds_total": 1.5, "hardware": "CPU", "stages": [{"name": "stage 1 · trigger", "steps": 3}]}
    artifacts.save_summary(folder, summary)
    card = "---\nlicense: creativeml-openrail-m\n---\n# <my-box> box · samples\n"
    assert artifacts.save_card(folder, card) == folder / "README.md"

    # sorted keys, indent 2, final newline: the same settings always give the same bytes
    assert (folder / "training_config.json").read_text() == json.dumps(CONFIG, indent=2, sort_keys=True) + "\n"
    assert json.loads((folder / "training_summary.json").read_text(encoding="utf-8")) == summary
    assert (folder / "README.md").read_bytes() == card.encode("utf-8")
    assert artifacts.read_card(folder) == card


# ---- refusals of damaged folders ------------------------------------------------------------------------------------
def test_missing_folder_or_a_file_in_its_place_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing: no such artifact folder"):
        read_artifact(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"file: no such artifact folder"):
        read_artifact(tmp_path / "file")


@pytest.mark.parametrize(("config", "message"), [
    (None, r"run: no training_config\.json; is this a folder written by this engine\?"),
    (b'{"method": "two_stage",', r"run/training_config\.json is not valid JSON \(Expecting"),
    (b"\xff\xfe not text", r"run/training_config\.json is not valid JSON"),
    (b'["a list"]', r"run/training_config\.json is not a JSON object"),
])
def test_a_missing_or_broken_config_is_refused(tmp_path, config, message):
    folder = tmp_path / "run"
    folder.mkdir()
    artifacts.save_embedding(folder, TRIGGER, torch.zeros(32))
    if config is not None:
        (folder / "training_config.json").write_bytes(config)
    with pytest.raises(ArtifactError, match=message):
        read_artifact(folder)


def test_a_folder_without_weights_is_refused(tmp_path):
    folder = new_artifact(tmp_path)
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # weights without their config.json
    artifacts.save_webui_copies(folder, TRIGGER, torch.zeros(32), None)  # web-UI copies are not what diffusers loads
    with pytest.raises(ArtifactError, match=r"run: holds no weights \(learned_embeds\.safetensors, "):
        read_artifact(folder)


@pytest.mark.parametrize("keys", [[], [TRIGGER, "<other>"]])
def test_an_embeddings_file_must_hold_exactly_one_trigger(tmp_path, keys):
    folder = new_artifact(tmp_path)
    save_file({key: torch.zeros(1, 32) for key in keys}, str(folder / artifacts.EMBEDDINGS_FILE))
    with pytest.raises(ArtifactError, match=rf"learned_embeds\.safetensors must hold exactly one trigger, found "
                                            rf"{len(keys)}"):
        read_artifact(folder)


def test_a_lora_file_without_tensors_is_refused(tmp_path):
    folder = new_artifact(tmp_path)
    save_file({}, str(folder / artifacts.LORA_FILE))
    with pytest.raises(ArtifactError, match=r"run/pytorch_lora_weights\.safetensors holds no tensors"):
        read_artifact(folder)


@pytest.mark.parametrize("name", [artifacts.EMBEDDINGS_FILE, artifacts.LORA_FILE])
@pytest.mark.parametrize("keep", [0.5, 0.999, 6])
def test_a_truncated_or_foreign_safetensors_file_is_refused(tmp_path, name, keep):
    folder = new_artifact(tmp_path)
    path = folder / name
    save_file({TRIGGER: torch.ones(4, 32)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:int(len(whole) * keep)] if keep < 1 else b"not a safetensors file"[:keep])
    with pytest.raises(ArtifactError, match=rf"run/{name.replace('.', '[.]')} is damaged or not a safetensors file"):
        read_artifact(folder)


# ---- web-UI copy names -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("trigger", "stem"), [
    ("<my-dog>", "my-dog"),
    ("sks", "sks"),
    ("my dog", "my-dog"),
    ("../../etc/passwd", "etc-passwd"),  # never a path: separators and dots become dashes
    ("a\\b:c*d", "a-b-c-d"),
    ("<ünï>", "n"),
    ("<>", "subject"),
    ("", "subject"),
])
def test_web_ui_copy_names_come_from_the_trigger(trigger, stem):
    assert artifacts.webui_name(trigger) == stem
    assert artifacts.webui_embedding_file(trigger) == f"{stem}_emb.safetensors"
    assert artifacts.webui_lora_file(trigger) == f"{stem}_lora_kohya.safetensors"


def test_the_card_names_the_web_ui_copies_the_folder_holds(tmp_path):
    from personalization.config import TrainingConfig
    from personalization.model_card import build_model_card

    config = TrainingConfig(class_noun="box", trigger_token=TRIGGER, method="two_stage", stage2_mode="lora")
    card = str(build_model_card(config, {}, []))
    written = artifacts.save_webui_copies(tmp_path, TRIGGER, torch.zeros(32), {"x.lora.down.weight": torch.zeros(1)})
    assert [path.name for path in written] == ["my-box_emb.safetensors", "my-box_lora_kohya.safetensors"]
    assert all(f"`{path.name}`" in card for path in written)
