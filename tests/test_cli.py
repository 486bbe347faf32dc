import subprocess
import sys

import numpy as np
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
