import json
import shutil
from pathlib import Path

import pytest

from personalization.config import TrainingConfig
from personalization.device import (
    BUNDLED_MINI_MODEL,
    MINI_MODEL_DIR,
    SD15_HUB_ID,
    SD15_UNET_PARAMETERS,
    memory_refusal,
    plan_memory,
    portable_base_model,
    resolve_base_model_path,
)
from personalization.jobs import hardware_key

REPO = Path(__file__).resolve().parent.parent


def on_mini_world(base_model: str) -> bool:
    return TrainingConfig(class_noun="star", base_model=base_model).on_mini_world

SD15 = int(SD15_UNET_PARAMETERS)
GIB = 2**30
T4 = 15_835_660_288  # what torch reports for a 16 GB T4
EIGHT_GB = 8_589_934_592
RTX_3070 = int(7.8 * GIB)  # an 8 GB consumer card as torch reports it (the GPU check emulates this one)
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


def test_an_8_gb_card_trains_an_sd15_lora_and_is_pointed_to_it_for_the_full_unet():
    """Measured on a capped H200: the 8 GB plan (LoRA + checkpointing) peaked at 6.52 GiB, inside 7.8 GiB x 0.9.
    With the earlier 10 GiB guess the app refused an SD-1.5 LoRA on these cards."""
    from personalization.families import SD15 as SD15_FAMILY

    for card in (EIGHT_GB, RTX_3070):
        assert plan(card, full_unet=False).fits
        assert memory_refusal(SD15_FAMILY, card, full_unet=False) is None
    assert memory_refusal(SD15_FAMILY, RTX_3070, full_unet=True) == (
        "Stable Diffusion 1.x/2.x with a full U-Net needs about 11 GiB with gradient checkpointing and 8-bit Adam "
        "and this GPU has 8 GiB: a Stable Diffusion 1.x/2.x LoRA fits this GPU.")


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


# ---- base model names from hostile or unusual input -------------------------------------------------------------
# resolve_base_model_path turns a name into what from_pretrained loads; it is not a gatekeeper (the CLI takes any
# folder; the app refuses paths before they get here, see ui.services.Services.checked_base).
# portable_base_model is what a run records: Hub ids as they are, local folders by their name only, never a path.


@pytest.fixture
def hostile_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory two levels down in tmp_path, and a home directory beside it."""
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return cwd


@pytest.mark.parametrize("name", ["../../etc", "/abs/path", "my models/sd 1.5",
                                  "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_resolve_passes_paths_and_hub_ids_through_unchanged(name, hostile_cwd):
    assert resolve_base_model_path(name) == name


def test_resolve_expands_a_home_folder_which_from_pretrained_would_take_for_a_hub_id(hostile_cwd, tmp_path):
    assert resolve_base_model_path("~/x") == str(tmp_path / "home" / "x")


def test_resolve_maps_the_renamed_hub_id_and_the_bundled_name():
    assert resolve_base_model_path("runwayml/stable-diffusion-v1-5") == SD15_HUB_ID
    assert resolve_base_model_path(BUNDLED_MINI_MODEL) == str(MINI_MODEL_DIR)


def test_resolve_keeps_a_symlinked_folder_as_given(hostile_cwd, tmp_path):
    (tmp_path / "real_folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real_folder", target_is_directory=True)
    assert resolve_base_model_path(str(tmp_path / "link")) == str(tmp_path / "link")


def test_resolve_refuses_a_recorded_local_name_and_says_what_to_give():
    with pytest.raises(FileNotFoundError, match=r"local base model \(foo\)") as refused:
        resolve_base_model_path("local:foo")
    assert "--base-model FOLDER" in str(refused.value)


@pytest.mark.parametrize("name", ["", "   "])
def test_resolve_refuses_an_empty_name_in_words(name):
    with pytest.raises(ValueError, match="no base model given"):
        resolve_base_model_path(name)


@pytest.mark.parametrize(("name", "recorded"), [
    ("../../etc", "local:etc"),
    ("~/x", "local:x"),
    ("/abs/path", "local:path"),
    ("./", "local:here"),
    ("local:foo", "local:foo"),
    ("local:/home/alice/models/sd", "local:sd"),  # never a path, even when one comes in after the prefix
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_HUB_ID),
    ("runwayml/stable-diffusion-v1-5", SD15_HUB_ID),
    (BUNDLED_MINI_MODEL, BUNDLED_MINI_MODEL),
    ("", ""),  # no model named: not the name of the current folder
])
def test_portable_names_hold_no_path(name, recorded, hostile_cwd, tmp_path):
    portable = portable_base_model(name)
    assert portable == recorded
    assert str(tmp_path) not in portable
    if portable != SD15_HUB_ID:
        assert "/" not in portable


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_a_folder_with_spaces_is_recorded_by_its_name(form, hostile_cwd):
    folder = hostile_cwd / "my models" / "sd 1.5"
    folder.mkdir(parents=True)
    given = "my models/sd 1.5" if form == "relative" else str(folder)
    assert portable_base_model(given) == "local:sd 1.5"


def test_a_hub_id_shaped_folder_in_the_working_directory_is_local(hostile_cwd):
    (hostile_cwd / "someone" / "model").mkdir(parents=True)  # from_pretrained would load this folder, not the Hub
    assert portable_base_model("someone/model") == "local:model"


def test_a_symlinked_folder_is_recorded_by_the_folder_it_points_at(hostile_cwd, tmp_path):
    # The same folder by any path records the same name, so an artifact trained through the link is recognized
    # when the real folder is chosen as its base (and the other way round).
    real = tmp_path / "sd15-finetune"
    real.mkdir()
    (hostile_cwd / "link").symlink_to(real, target_is_directory=True)
    assert portable_base_model("link") == portable_base_model(str(real)) == "local:sd15-finetune"


def test_a_recorded_local_name_resolves_to_the_refusal_naming_it(hostile_cwd):
    with pytest.raises(FileNotFoundError, match=r"\(etc\)"):
        resolve_base_model_path(portable_base_model("../../etc"))
