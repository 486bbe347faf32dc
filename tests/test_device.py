import json
import shutil
from pathlib import Path

import pytest

from personalization.config import TrainingConfig
from personalization.device import (
    BUNDLED_MINI_MODEL,
    MINI_MODEL_DIR,
    SD15_UNET_PARAMETERS,
    plan_memory,
    portable_base_model,
)
from personalization.jobs import hardware_key

REPO = Path(__file__).resolve().parent.parent


def on_mini_world(base_model: str) -> bool:
    return TrainingConfig(class_noun="star", base_model=base_model).on_mini_world

SD15 = int(SD15_UNET_PARAMETERS)
GIB = 2**30
T4 = 15_835_660_288  # what torch reports for a 16 GB T4
EIGHT_GB = 8_589_934_592
A10G = 23_609_475_072


def plan(card_bytes, *, full_unet=True, checkpointing=False, eight_bit=False, bitsandbytes=True, params=SD15):
    return plan_memory(params, card_bytes, full_unet=full_unet, gradient_checkpointing=checkpointing,
                       use_8bit_adam=eight_bit, bitsandbytes_available=bitsandbytes)


def test_full_unet_on_a_t4_switches_on_both_memory_options_and_says_why():
    chosen = plan(T4)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam) == (True, True)
    assert chosen.note == ("this GPU has 15 GiB and the step needs about 17 GiB as configured: "
                           "switched on gradient checkpointing and 8-bit Adam")


def test_lora_on_an_8_gb_card_gets_checkpointing_and_keeps_the_32_bit_optimizer():
    chosen = plan(EIGHT_GB, full_unet=False)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam) == (True, False)
    assert chosen.note.endswith("switched on gradient checkpointing")


@pytest.mark.parametrize(("card", "full_unet"), [(A10G, True), (80 * GIB, True), (T4, False), (None, True)])
def test_cards_with_room_and_the_cpu_change_nothing(card, full_unet):
    assert plan(card, full_unet=full_unet) == plan_memory(SD15, None, full_unet=full_unet,
                                                          gradient_checkpointing=False, use_8bit_adam=False,
                                                          bitsandbytes_available=True)
    assert plan(card, full_unet=full_unet).note is None


def test_without_bitsandbytes_only_checkpointing_is_switched_on():
    chosen = plan(T4, bitsandbytes=False)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam, chosen.note.endswith("checkpointing")) == (
        True, False, True)


def test_options_the_user_chose_stay_on_and_are_not_reported_again():
    chosen = plan(80 * GIB, checkpointing=True, eight_bit=True)
    assert (chosen.gradient_checkpointing, chosen.use_8bit_adam, chosen.note) == (True, True, None)
    already = plan(T4, checkpointing=True, eight_bit=True)
    assert (already.gradient_checkpointing, already.use_8bit_adam, already.note) == (True, True, None)


def test_a_small_unet_fits_where_sd15_does_not():
    assert plan(T4, params=SD15 // 4).note is None


@pytest.fixture(scope="module")
def mini_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(shutil.copytree(MINI_MODEL_DIR, tmp_path_factory.mktemp("elsewhere") / "my_model"))


@pytest.mark.parametrize("form", ["relative path", "absolute path", "copy elsewhere"])
def test_the_mini_model_by_path_is_recorded_and_timed_as_the_bundled_one(form, mini_copy, monkeypatch):
    monkeypatch.chdir(REPO)
    base = {"relative path": "personalization/assets/mini_model", "absolute path": str(MINI_MODEL_DIR),
            "copy elsewhere": str(mini_copy)}[form]
    assert on_mini_world(base)
    # The bundled name loads anywhere the engine is installed; "local:mini_model" would need the folder again.
    assert portable_base_model(base) == BUNDLED_MINI_MODEL
    assert hardware_key("CPU (2 threads, fp32)", base) == "cpu-mini"


def test_a_retrained_mini_model_gets_the_recipe_but_keeps_its_own_name(tmp_path):
    weightless = shutil.ignore_patterns("*.safetensors")  # only the folder's description matters here
    retrained = Path(shutil.copytree(MINI_MODEL_DIR, tmp_path / "retrained", ignore=weightless))
    info_file = retrained / "training_info.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "step": 20000}))
    assert on_mini_world(str(retrained))
    assert portable_base_model(str(retrained)) == "local:retrained"


def test_other_folders_and_hub_ids_are_not_the_mini_model(tiny_base):
    for base in (str(tiny_base), "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert not on_mini_world(base)
        assert hardware_key("CPU (2 threads, fp32)", base) == "cpu"
    assert portable_base_model(str(tiny_base)) == f"local:{tiny_base.name}"
