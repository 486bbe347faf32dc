"""Runs a restarted app can resume (personalization.resumable): the key, the record kept by its hash, finding a run
in any workspace by key only, adopting it into another workspace, and the adopted run resumed bit-identical to a run
never interrupted (tiny pipeline, CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from personalization import artifacts
from personalization.config import ResolvedConfig, TrainingConfig
from personalization.images import SubjectImages, load_subject_images
from personalization.jobs import Workspace
from personalization.resumable import (
    KEY_LENGTH,
    LIVE,
    LIVE_DISCARD,
    NOT_STARTED,
    RECORD_PREFIX,
    UNKNOWN,
    ResumeError,
    adopt_run,
    check_key,
    discard_run,
    find_run,
    forget_earlier_runs,
    key_digest,
    key_refusal,
    new_key,
    record_run,
    settle,
)
from personalization.snapshots import resume_dir
from personalization.trainer import train
from tests.tiny_pipeline import TINY_RESOLUTION

HOSTILE_CODES = ["", "   ", "abc", "../../etc/passwd", "/etc/passwd", "..", "x" * (KEY_LENGTH - 1) + "/",
                 "x" * (KEY_LENGTH + 1), "é" * KEY_LENGTH, "x" * 20_000, "%2e%2e%2f" + "x" * (KEY_LENGTH - 9)]


class Crash(RuntimeError):
    pass


def tiny_config(base: Path, **changes: object) -> ResolvedConfig:
    values = {"class_noun": "box", "base_model": str(base), "resolution": TINY_RESOLUTION, "stage1_steps": 3,
              "stage2_steps": 4, "stage2_mode": "lora", "checkpoints": 2, "sample_count": 2, "sample_steps": 2,
              **changes}
    return TrainingConfig(**values).resolved()


def interrupted_run(workspace: Workspace, key: str, config: ResolvedConfig, images: SubjectImages,
                    crash_step: int = 6) -> Path:
    """A run recorded under ``key`` as the app records it, killed after a checkpoint (the trainer keeps its state
    for a crash as for a kill); returns its output folder, which does not exist."""
    output = workspace.new_run_dir(f"{config.method}-{config.class_noun}")
    record_run(workspace.folder, key, config, images, output)

    def crash(event) -> None:
        if event.step == crash_step and event.loss is not None:
            raise Crash(f"killed at step {crash_step}")

    with pytest.raises(Crash):
        train(config, images, output, progress=crash)
    return output


@pytest.fixture
def images(subject_dir: Path) -> SubjectImages:
    return load_subject_images(subject_dir, TINY_RESOLUTION)


def test_keys_are_random_and_only_their_own_format_is_accepted():
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(key) == KEY_LENGTH and key_refusal(key) is None for key in keys)
    key = keys.pop()
    assert check_key(f"  {key}\n") == key  # pasted with spaces around it
    for code in [*HOSTILE_CODES, None, 7, [key], {"key": key}]:
        reason = key_refusal(code)
        assert reason is not None and "\n" not in reason, code
        with pytest.raises(ResumeError, match=r"^The resume code (is|must) .*\.$"):
            check_key(code)


def test_a_run_is_recorded_under_the_keys_hash_and_found_from_the_root_by_the_key_alone(tmp_path, tiny_base,
                                                                                        images):
    root = tmp_path / "sessions"
    workspace, other = Workspace(root, "alice"), Workspace(root, "bob")
    key = new_key()
    config = tiny_config(tiny_base)
    output = workspace.new_run_dir("two-stage-box")
    record = record_run(workspace.folder, key, config, images, output)
    assert record == workspace.folder / f"{RECORD_PREFIX}{key_digest(key)}"
    # The key itself is written nowhere: only whoever holds it can find the run.
    assert not [path for path in root.rglob("*") if path.is_file() and key.encode() in path.read_bytes()]
    run = find_run(root, key)
    assert run.output_dir == output and run.training_config() == config
    restored = run.subject_images()
    assert restored.names == images.names and [im.tobytes() for im in restored.images] == [
        im.tobytes() for im in images.images]
    assert not run.resumable and not run.live
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        find_run(root, new_key())
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):  # one letter off
        find_run(root, key[:-1] + ("A" if key[-1] != "A" else "B"))
    with pytest.raises(ValueError, match="is not a run folder of the workspace"):
        record_run(other.folder, new_key(), config, images, output)


@pytest.mark.parametrize("code", HOSTILE_CODES)
def test_a_path_or_anything_but_a_key_is_never_looked_up(tmp_path, code):
    root = tmp_path / "sessions"
    Workspace(root, "alice")
    for action in (lambda: find_run(root, code), lambda: adopt_run(root, code, root / "alice"),
                   lambda: discard_run(root, code)):
        with pytest.raises(ResumeError, match=r"^The resume code "):
            action()


def test_an_adopted_run_resumes_bit_identical_to_one_never_interrupted(tmp_path, tiny_base, images):
    config = tiny_config(tiny_base)
    whole = train(config, images, tmp_path / "whole").output_dir
    root = tmp_path / "sessions"
    old, new = Workspace(root, "before-restart"), Workspace(root, "after-restart")
    key = new_key()
    output = interrupted_run(old, key, config, images)
    assert find_run(root, key).resumable and find_run(root, key).stopped_at() == 5  # stage 1's end, 2nd checkpoint

    with new.in_use():
        run = adopt_run(root, key, new.folder)
        assert run.workspace == new.folder and not resume_dir(output).exists()
        assert sorted(p.name for p in old.folder.iterdir()) == []  # the photos, config and state moved
        result = train(run.training_config(), run.subject_images(), run.output_dir, resume=True)
    assert any("resumed from the checkpoint at step 5" in note for note in result.notes)
    assert not settle(run.record) and not run.record.exists()
    files = sorted(p.relative_to(whole).as_posix() for p in whole.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(run.output_dir).as_posix()
                                     for p in run.output_dir.rglob("*.safetensors"))
    for name in files:
        expected, got = load_file(whole / name), load_file(run.output_dir / name)
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[tensor], got[tensor]) for tensor in expected), name


def test_a_run_whose_workspace_is_in_use_is_not_adopted_or_discarded(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner, first, second = Workspace(root, "owner"), Workspace(root, "first"), Workspace(root, "second")
    key = new_key()
    interrupted_run(owner, key, tiny_config(tiny_base), images)
    with owner.in_use():  # still training there (the run's own server is alive)
        assert find_run(root, key).live
        with pytest.raises(ResumeError, match=re.escape(LIVE)):
            adopt_run(root, key, first.folder)
        with pytest.raises(ResumeError, match=re.escape(LIVE_DISCARD)):
            discard_run(root, key)
    with first.in_use():  # adopted, and training in its new workspace: nobody else takes it meanwhile
        adopt_run(root, key, first.folder)
        with pytest.raises(ResumeError, match=re.escape(LIVE)):
            adopt_run(root, key, second.folder)
    # That training was killed too (its state is still there): the next session takes it over.
    assert adopt_run(root, key, second.folder).workspace == second.folder


def test_a_marker_left_with_this_processs_pid_by_a_killed_server_does_not_hold_a_run(tmp_path, tiny_base, images):
    """A restarted container often gives the new server the killed one's PID."""
    root = tmp_path / "sessions"
    owner, new = Workspace(root, "owner"), Workspace(root, "new")
    key = new_key()
    interrupted_run(owner, key, tiny_config(tiny_base), images)
    (owner.folder / f".in-use-{os.getpid()}-0123abcd").touch()
    assert not find_run(root, key).live
    assert adopt_run(root, key, new.folder).workspace == new.folder


def test_a_run_killed_before_its_first_checkpoint_has_nothing_to_resume(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner, new = Workspace(root, "owner"), Workspace(root, "new")
    key = new_key()
    config = tiny_config(tiny_base)
    record = record_run(owner.folder, key, config, images, owner.new_run_dir("run"))
    with pytest.raises(ResumeError, match=re.escape(NOT_STARTED)):
        adopt_run(root, key, new.folder)
    assert record.is_dir() and not settle(record) and not record.exists()  # the end of such a run drops it
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        find_run(root, key)


def test_discard_removes_the_state_and_the_record_and_settle_keeps_a_resumable_run(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    output = interrupted_run(owner, key, tiny_config(tiny_base), images)
    record = find_run(root, key).record
    assert settle(record) and record.is_dir()  # a crash after a checkpoint: still resumable
    run = discard_run(root, key)
    assert run.output_dir == output and not resume_dir(output).exists() and not record.exists()
    assert sorted(p.name for p in owner.folder.iterdir()) == []
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        discard_run(root, key)


def test_a_new_run_in_a_session_removes_its_earlier_runs_states_and_no_one_elses(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner, other = Workspace(root, "owner"), Workspace(root, "other")
    earlier, others = new_key(), new_key()
    output = interrupted_run(owner, earlier, tiny_config(tiny_base), images)
    interrupted_run(other, others, tiny_config(tiny_base), images)
    (owner.folder / f"{RECORD_PREFIX}{'0' * 64}").mkdir()  # a damaged record goes too
    assert resume_dir(output).is_dir()
    assert forget_earlier_runs(owner.folder) == 2
    assert not resume_dir(output).exists() and sorted(p.name for p in owner.folder.iterdir()) == []
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        find_run(root, earlier)
    assert find_run(root, others).resumable  # another session's run is untouched
    assert forget_earlier_runs(owner.folder) == 0


def test_a_resumable_run_is_kept_as_long_as_its_workspace_folder(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    interrupted_run(owner, key, tiny_config(tiny_base), images)
    assert Workspace.clean_old(root, max_age_hours=24) == 0 and find_run(root, key).resumable
    stale = time.time() - 48 * 3600
    for path in [owner.folder, *owner.folder.rglob("*")]:
        os.utime(path, (stale, stale), follow_symlinks=False)
    assert Workspace.clean_old(root, max_age_hours=24) == 1
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        find_run(root, key)


def test_a_damaged_record_is_one_sentence(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    record = record_run(owner.folder, key, tiny_config(tiny_base), images, owner.new_run_dir("run"))
    values = json.loads((record / "run.json").read_text())
    (record / "run.json").write_text(json.dumps({**values, "run": "../../elsewhere"}))
    with pytest.raises(ResumeError, match=r"^The record of this run cannot be read \(not a run folder name"):
        find_run(root, key)
    (record / "run.json").write_text("{")
    with pytest.raises(ResumeError, match=r"^The record of this run cannot be read"):
        find_run(root, key)


def test_describe_names_the_run_and_where_it_stopped_and_its_own_session_takes_it_in_place(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    key = new_key()
    output = interrupted_run(Workspace(root, "owner"), key, tiny_config(tiny_base), images)
    run = find_run(root, key)
    text = run.describe()
    assert text == (f"Two-stage (recommended) on 3 photo(s) of a box (run {output.name}), stopped at step 5 of 7.")
    assert (resume_dir(output) / artifacts.RESUME_STATE_FILE).is_file()
    # A run that failed after a checkpoint is resumed in its own session: nothing moves.
    assert adopt_run(root, key, run.workspace) == run and resume_dir(output).is_dir()


def test_a_record_this_version_cannot_read_is_one_sentence_and_can_be_discarded(tmp_path, tiny_base, images):
    """Records outlive the server, and a restart is often a new version of the app: a setting it no longer has is
    a refusal naming it, never an error from describing the run (the page describes it on every load)."""
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    output = interrupted_run(owner, key, tiny_config(tiny_base), images)
    record = find_run(root, key).record
    values = json.loads((record / "run.json").read_text())
    values["config"]["retired_option"] = 1
    (record / "run.json").write_text(json.dumps(values))
    for action in (lambda: find_run(root, key).describe(), lambda: adopt_run(root, key, root / "owner")):
        with pytest.raises(ResumeError, match=r"^This run was recorded by another version of this app .*"
                                              r"retired_option.*\.$"):
            action()
    discard_run(root, key)
    assert not record.exists() and not resume_dir(output).exists()
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        find_run(root, key)


class Killed(BaseException):
    """The process killed at a file-system step: nothing after it runs, not even an except clause for Exception."""


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_a_server_killed_while_adopting_a_run_leaves_it_resumable(tmp_path, tiny_base, images, monkeypatch, kill_at):
    """Adopting moves the record and the trainer's state: killed between two moves, the run must still be found
    whole (not offered as "stopped before its first checkpoint" while its state sits in the other folder)."""
    root = tmp_path / "sessions"
    owner, first, second = Workspace(root, "owner"), Workspace(root, "first"), Workspace(root, "second")
    key = new_key()
    interrupted_run(owner, key, tiny_config(tiny_base), images)
    renames = []

    def rename(source, target, *args, **kwargs):
        renames.append(source)
        if len(renames) == kill_at:
            raise Killed(f"killed at move {kill_at}")
        return real_rename(source, target, *args, **kwargs)

    real_rename = os.rename
    with monkeypatch.context() as patch:  # the OS's rename, not this project's code
        patch.setattr(os, "rename", rename)
        patch.setattr(os, "replace", rename)
        with first.in_use(), contextlib.suppress(Killed):  # past the last move: the adoption completed
            adopt_run(root, key, first.folder)
    with second.in_use():  # after the restart, the code is sent again
        run = adopt_run(root, key, second.folder)
    assert run.workspace == second.folder and run.resumable and run.stopped_at() == 5
    assert not [path for path in root.rglob("*.resume") if path.parent != second.folder]


def test_a_server_killed_while_discarding_a_run_leaves_no_half_record(tmp_path, tiny_base, images, monkeypatch):
    """Killed mid-removal (here right after the record's run.json went), the code must find nothing, not a record
    it can neither read nor discard; what the kill left is cleared with the workspace's stale staging folders."""
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    interrupted_run(owner, key, tiny_config(tiny_base), images)
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        real_unlink(path, *args, **kwargs)
        if os.fspath(path).endswith("run.json"):
            raise Killed("killed while removing the record")

    with monkeypatch.context() as patch, contextlib.suppress(Killed):  # the OS's unlink, not this project's code
        patch.setattr(os, "unlink", unlink)
        discard_run(root, key)
    with pytest.raises(ResumeError, match=re.escape(UNKNOWN)):
        discard_run(root, key)
    Workspace.clean_old(root)
    assert sorted(p.name for p in owner.folder.iterdir()) == []


def test_an_unreadable_record_does_not_name_server_paths(tmp_path, tiny_base, images):
    root = tmp_path / "sessions"
    owner = Workspace(root, "owner")
    key = new_key()
    record = record_run(owner.folder, key, tiny_config(tiny_base), images, owner.new_run_dir("run"))
    (record / "run.json").unlink()
    (record / "run.json").mkdir()
    with pytest.raises(ResumeError, match=r"^The record of this run cannot be read") as refusal:
        find_run(root, key)
    assert str(tmp_path) not in str(refusal.value) and record.name not in str(refusal.value)
