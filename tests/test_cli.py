import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from personalization.cli import main
from personalization.images import sort_subject_images
from tests.conftest import make_mixed_upload, make_subject_images
from tests.tiny_pipeline import TINY_RESOLUTION


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "personalization", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_exits_zero():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "generate" in result.stdout
    result = run_cli("train", "--help")
    assert result.returncode == 0 and "--class-noun" in result.stdout


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "photos"
    bad.mkdir()
    (bad / "cat.png").write_text("not really a png")
    result = run_cli("train", "--images", str(bad), "--class-noun", "cat", "--out", str(tmp_path / "out"),
                     "--resolution", "64", "--base-model", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: cat.png: not an image file Pillow can read"]
    assert not (tmp_path / "out").exists()

    result = run_cli("train", "--images", str(bad), "--class-noun", "cat!", "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: class_noun must be a plain word")

    result = run_cli("train", "--images", str(bad), "--class-noun", "cat", "--out", str(tmp_path / "o"),
                     "--method", "dreambooth", "--stage1-steps", "-3")
    assert result.returncode == 1 and "stage1_steps" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "generate", "--artifact", str(tmp_path / "missing"), "--prompt", "x", "--out",
                     str(tmp_path / "x.png"))
    assert result.returncode == 1 and "Traceback" in result.stderr


def test_train_then_generate_in_process(tiny_base, subject_dir, tmp_path, capsys):
    out = tmp_path / "artifact"
    code = main(["train", "--images", str(subject_dir), "--class-noun", "box", "--out", str(out), "--base-model",
                 str(tiny_base), "--stage1-steps", "2", "--stage2-steps", "2", "--samples", "1", "--sample-steps", "2"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    image_path = tmp_path / "gen.png"
    code = main(["generate", "--artifact", str(out), "--base-model", str(tiny_base), "--prompt",
                 "a photo of a <my-box> box", "--out", str(image_path), "--steps", "3", "--num-images", "2"])
    assert code == 0
    first, second = Image.open(image_path), Image.open(tmp_path / "gen_1.png")
    assert first.size == (64, 64) and not np.array_equal(np.asarray(first), np.asarray(second))
    # A second train into the same folder is refused unless --overwrite.
    code = main(["train", "--images", str(subject_dir), "--class-noun", "box", "--out", str(out), "--base-model",
                 str(tiny_base)])
    assert code == 1 and "folder exists and is not empty" in capsys.readouterr().err


def test_a_config_from_a_local_base_asks_for_the_folder(tmp_path, subject_dir):
    config = tmp_path / "training_config.json"
    config.write_text('{"class_noun": "box", "base_model": "local:tiny-base0"}')
    result = run_cli("train", "--config", str(config), "--images", str(subject_dir), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "trained on a local base model (tiny-base0)" in result.stderr and "--base-model" in result.stderr


def test_train_names_each_refused_file_until_the_folder_is_clean(tmp_path):
    folder = tmp_path / "photos"
    expected = make_mixed_upload(folder)
    _, rejected = sort_subject_images(sorted(folder.iterdir()), TINY_RESOLUTION)
    reasons = {r.name: r.reason for r in rejected}  # what the app shows for the same files
    refused = sorted(name for name, outcome in expected.items() if outcome == "refused")
    # The user fixes what the error names and runs again: every refused file is named, in the folder's order.
    for name in refused:
        result = run_cli("train", "--images", str(folder), "--class-noun", "dog", "--out", str(tmp_path / "out"),
                         "--resolution", str(TINY_RESOLUTION), "--base-model", str(tmp_path / "nowhere"))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [f"error: {name}: {reasons[name]}"]
        (folder / name).unlink()
    assert not (tmp_path / "out").exists() and sorted(reasons) == refused


def test_train_skips_system_files_and_says_so_once(tiny_base, tmp_path, capsys):
    folder = make_subject_images(tmp_path / "photos")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(56))
    (folder / "Thumbs.db").write_bytes(bytes.fromhex("d0cf11e0a1b11ae1") + bytes(504))
    (folder / "rejects").mkdir()
    code = main(["train", "--images", str(folder), "--class-noun", "box", "--out", str(tmp_path / "artifact"),
                 "--base-model", str(tiny_base), "--stage1-steps", "1", "--stage2-steps", "1", "--samples", "0"])
    out = capsys.readouterr().out
    assert code == 0, out
    for note in ("skipped .DS_Store (a macOS system file, not a photo)",
                 "skipped Thumbs.db (a Windows system file, not a photo)",
                 "skipped rejects/ (a sub-folder; only the files directly in the images folder are used)"):
        assert out.count(note) == 1, out


def test_generate_from_a_private_repo_needs_a_token_the_hub_accepts(tmp_path):
    """The CLI's machine cache holds the private repo after a download with the owner's token; a refused token, or
    none, is an error naming the reason, never a silent success from that cache."""
    import os

    from personalization.hub import download_repo, push_folder
    from tests.fake_hub import FakeHub, make_token

    owner = make_token("alice")
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "README.md").write_text("# private\n")
    (folder / "training_config.json").write_text("{}\n")
    cache = tmp_path / "hf-cache"
    with FakeHub({owner: "alice"}) as hub:
        push_folder(folder, "secret", owner, endpoint=hub.endpoint)
        download_repo("alice/secret", owner, endpoint=hub.endpoint, cache_dir=cache)
        env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_TELEMETRY": "1"}
        common = [sys.executable, "-m", "personalization", "generate", "--artifact", "alice/secret", "--prompt", "a",
                  "--out", str(tmp_path / "out.png")]
        for extra, says in (([], "(or it is private and no token was given)"),
                            (["--token", make_token("mallory")], "The Hugging Face token was refused")):
            result = subprocess.run(common + extra, capture_output=True, text=True, env=env, timeout=300)
            assert result.returncode == 1 and says in result.stderr, result.stderr
            assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.png").exists()


# ---- train options generated from the config's field metadata ------------------------------------------------------
def parse_train(*options: str):
    from personalization.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--images", "photos", "--out", "out", *options])
    return config_from_args(args)


def test_every_config_field_is_reachable_from_the_command_line():
    """Each field's flag (from its metadata) sets that field: given a value unlike its default, the config has it."""
    from personalization.config import config_fields

    values = {
        "class_noun": "teddy bear", "method": "dreambooth", "stage2_mode": "lora", "subject_type": "pet",
        "base_model": "some/model", "trigger_token": "zwx", "init_word": "bear", "resolution": 256,
        "prompt_templates": ["a {trigger} {noun}", "one {trigger} {noun}"], "center_crop": False, "flip": True,
        "stage1_steps": 11, "stage1_learning_rate": 0.25, "stage1_weight_decay": 0.01, "stage2_steps": 12,
        "stage2_learning_rate": 0.125, "max_batch_size": 2, "snr_gamma": 2.5, "max_grad_norm": 0.5, "lora_rank": 8,
        "lora_alpha": 4, "prior_preservation": True, "class_images": 7, "class_prompt": "a bear",
        "prior_loss_weight": 0.5, "train_text_encoder": True, "seed": 3, "mixed_precision": "bf16",
        "gradient_checkpointing": True, "use_8bit_adam": True, "compile_unet": True,
        "validation_prompts": ["a zwx teddy bear", "a zwx teddy bear in snow"], "preview_interval": 5,
        "sample_count": 2, "sample_steps": 9, "guidance_scale": 3.5, "checkpoints": 6, "keep_step": "last",
        "score_checkpoints": False,
    }
    options = []
    for spec in config_fields():
        value = values[spec.name]
        assert value != spec.default, spec.name
        if spec.kind is bool:
            options.append(spec.info.flag if value else "--no-" + spec.info.flag[2:])
        elif spec.kind is list:
            for item in value:
                options += [spec.info.flag, item]
        else:
            options += [spec.info.flag, str(value)]
    config = parse_train(*options)
    assert config.to_dict() == values


def test_the_documented_flag_names_keep_working(tmp_path):
    config = parse_train("--class-noun", "dog", "--method", "dreambooth_lora", "--stage2-lr", "0.001",
                         "--batch-size", "2", "--trigger", "sks", "--prior-preservation", "--samples", "1",
                         "--guidance", "3", "--stage2-steps", "40", "--lora-rank", "4", "--validation-prompt", "a dog")
    assert (config.stage2_learning_rate, config.max_batch_size, config.trigger_token) == (0.001, 2, "sks")
    assert config.prior_preservation and (config.sample_count, config.guidance_scale) == (1, 3.0)
    assert config.validation_prompts == ["a dog"] and config.lora_rank == 4
    # Options override a --config file; one not given keeps the file's value (booleans included).
    saved = tmp_path / "training_config.json"
    saved.write_text(json.dumps({"class_noun": "cat", "method": "dreambooth", "prior_preservation": True,
                                 "snr_gamma": None, "seed": 9}))
    from_file = parse_train("--config", str(saved), "--seed", "4")
    assert (from_file.class_noun, from_file.prior_preservation, from_file.snr_gamma, from_file.seed) == (
        "cat", True, None, 4)
    assert parse_train("--config", str(saved), "--no-prior-preservation").prior_preservation is False


@pytest.mark.parametrize(("given", "expected"), [(None, 5.0), ("2", 2.0), ("0", None), ("0.0", None),
                                                 ("none", None), ("None", None)])
def test_snr_gamma_is_set_or_switched_off(given, expected):
    options = ["--class-noun", "dog"] + ([] if given is None else ["--snr-gamma", given])
    assert parse_train(*options).snr_gamma == expected


def test_a_bad_snr_gamma_is_one_line(tmp_path):
    result = run_cli("train", "--images", str(tmp_path), "--class-noun", "dog", "--out", str(tmp_path / "o"),
                     "--snr-gamma", "-1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: snr_gamma must be greater than 0.0 and at most 100.0, got -1.0"]
    help_text = run_cli("train", "--help").stdout
    for flag in ("--snr-gamma", "--flip", "--no-flip", "--prior-loss-weight", "--max-grad-norm", "--stage1-lr",
                 "--batch-size", "--prompt-template", "--center-crop"):
        assert flag in help_text, flag


def test_generate_and_evaluate_defaults_are_the_generation_defaults():
    from personalization.cli import build_parser
    from personalization.config import GENERATION_DEFAULTS
    from personalization.generation import GenerationRequest

    args = build_parser().parse_args(["generate", "--artifact", "a", "--prompt", "p", "--out", "o.png"])
    request = GenerationRequest(prompt="p")
    assert (args.steps, args.guidance, args.lora_scale, args.num_images, args.seed, args.negative_prompt) == (
        request.steps, request.guidance_scale, request.lora_scale, request.num_images, request.seed,
        request.negative_prompt)
    assert (request.steps, request.guidance_scale) == (GENERATION_DEFAULTS.steps, GENERATION_DEFAULTS.guidance_scale)
    evaluate = build_parser().parse_args(["evaluate", "--artifact", "a", "--references", "r"])
    assert (evaluate.steps, evaluate.guidance) == (request.steps, request.guidance_scale)


# ---- push ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pushable(tiny_base, tmp_path_factory):
    """A real artifact folder from a one-step training on the tiny model."""
    from personalization.config import TrainingConfig
    from personalization.trainer import train
    from tests.conftest import make_subject_images

    root = tmp_path_factory.mktemp("pushable")
    config = TrainingConfig(class_noun="box", base_model=str(tiny_base), stage1_steps=1, stage2_steps=1,
                            sample_count=1, sample_steps=1)
    return train(config, make_subject_images(root / "subject"), root / "artifact").output_dir


def folder_bytes(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def run_push(hub, home, *options, token=None):
    import os

    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env |= {"HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "personalization", "push", *options], capture_output=True,
                          text=True, env=env, timeout=300)


def test_push_an_artifact_private_by_default_then_public(pushable, tmp_path):
    from tests.fake_hub import FakeHub, make_token

    token = make_token("alice")
    before = folder_bytes(pushable)
    outputs = []
    with FakeHub({token: "alice"}) as hub:
        # The token from HF_TOKEN; a bare name goes under the token's account.
        result = run_push(hub, tmp_path, "--artifact", str(pushable), "--repo", "box", token=token)
        outputs += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == f"{hub.endpoint}/alice/box"
        assert hub.repos["alice/box"].private
        card = hub.repos["alice/box"].files["README.md"].decode()
        assert 'pipe.load_textual_inversion("alice/box")' in card and "YOUR_NAME/THIS_REPO" not in card
        assert hub.repos["alice/box"].files["training_config.json"] == before["training_config.json"]
        # The token from --token; --public makes the new repo public.
        result = run_push(hub, tmp_path, "--artifact", str(pushable), "--repo", "alice/box-public", "--public",
                          "--token", token)
        outputs += [result.stdout, result.stderr]
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == f"{hub.endpoint}/alice/box-public"
        assert not hub.repos["alice/box-public"].private
    assert folder_bytes(pushable) == before  # the local card still has the placeholder: only read, never written
    assert "YOUR_NAME/THIS_REPO" in before["README.md"].decode()
    assert not any(token in text for text in outputs)
    assert not any(token.encode() in content for content in folder_bytes(tmp_path).values())
    assert not any(token.encode() in content for content in folder_bytes(pushable.parent).values())


def test_a_failed_push_is_one_line_and_a_retry_succeeds(pushable, tmp_path):
    from tests.fake_hub import FakeHub, make_token

    token = make_token("alice")
    before = folder_bytes(pushable)
    with FakeHub({token: "alice"}) as hub:
        hub.fail_next_commits(status=422, message="commit rejected")
        failed = run_push(hub, tmp_path, "--artifact", str(pushable), "--repo", "flaky", token=token)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines() == [
            "error: push failed: commit rejected; the local result is kept, try again"]
        assert hub.repos["alice/flaky"].files == {}
        retried = run_push(hub, tmp_path, "--artifact", str(pushable), "--repo", "flaky", token=token)
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.strip().splitlines()[-1] == f"{hub.endpoint}/alice/flaky"
        assert hub.repos["alice/flaky"].files["training_config.json"] == before["training_config.json"]
    assert folder_bytes(pushable) == before
    for text in (failed.stdout, failed.stderr, retried.stdout, retried.stderr):
        assert token not in text


def test_push_without_a_token_or_folder_is_one_line(pushable, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", "--artifact", str(pushable), "--repo", "box"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: A Hugging Face token is needed: pass --token or set HF_TOKEN (a token with write access)."]
    assert main(["push", "--artifact", str(tmp_path / "missing"), "--repo", "box", "--token", "hf_x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot push") and "does not exist" in err and len(err.strip().splitlines()) == 1
