"""Faults injected at exact points (kills, interrupts): what is left on disk afterwards.

Kills happen in child processes at a chosen call, never after a sleep, so each case is the same on every run.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from personalization import artifacts

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, byte for byte."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def hidden_beside(folder: Path) -> list[str]:
    """The staging and backup names a write of ``folder`` uses (``.NAME.partial-*``, ``.NAME.old-*``)."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}\.(partial|old)-")
    return sorted(p.name for p in folder.parent.iterdir() if pattern.match(p.name))


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- the final write: kills and SIGTERM at each phase of atomic_output_dir -------------------------------------------
# A real (tiny) embeddings file: the reader opens it and refuses a damaged one.
EARLIER = {"training_config.json": b'{"run": "earlier"}\n',
           "learned_embeds.safetensors": safetensors.torch.save({"<earlier>": torch.zeros(1, 4)})}
NEW = {"training_config.json": b'{"run": "new"}\n', "marker.bin": b"new result\n", "samples/sample_0.png": b"png"}

# The child enters atomic_output_dir for an --out that holds the earlier result and signals itself at one phase:
# a) while the staging folder is written, b) after the first rename (earlier result moved aside) before the second,
# c) after the second rename before the earlier result is removed. os.replace is wrapped to find b) and c).
CHILD = """
import json, os, signal, sys
from pathlib import Path
from personalization import artifacts

phase, signame, handled, out = sys.argv[1], sys.argv[2], sys.argv[3] == "handled", Path(sys.argv[4])
new = {name: bytes.fromhex(data) for name, data in json.loads(sys.argv[5]).items()}
signum = getattr(signal, signame)
real_replace, renames = os.replace, []

def replace(src, dst):
    renames.append(dst)
    if phase == "b" and len(renames) == 2:
        os.kill(os.getpid(), signum)
    real_replace(src, dst)
    if phase == "c" and len(renames) == 2:
        os.kill(os.getpid(), signum)

def write():
    with artifacts.atomic_output_dir(out, overwrite=True) as staging:
        os.replace = replace  # armed only now: the recovery on entry renames nothing here
        for name, data in new.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
            if phase == "a":
                os.kill(os.getpid(), signum)

if handled:
    from personalization.cli import sigterm_as_interrupt
    try:
        with sigterm_as_interrupt():
            write()
    except KeyboardInterrupt:
        sys.exit(143)
else:
    write()
sys.exit(0)
"""


def crash_write(tmp_path: Path, phase: str, signame: str, handled: bool = False) -> tuple[Path, int]:
    """Run the child against ``runs/out`` holding the earlier result; return --out and the child's exit code."""
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    for name, data in EARLIER.items():
        (out / name).write_bytes(data)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    new = json.dumps({name: data.hex() for name, data in NEW.items()})
    child = subprocess.run([sys.executable, str(script), phase, signame, "handled" if handled else "default",
                            str(out), new], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120)
    return out, child.returncode


EXPECTED = {"a": EARLIER, "b": EARLIER, "c": NEW}


@pytest.mark.parametrize("signame", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("phase", ["a", "b", "c"])
def test_a_later_run_clears_a_killed_write(tmp_path, phase, signame):
    """Killed outright (SIGKILL, or SIGTERM with Python's default handler): the next write of --out finds the debris,
    restores the earlier result if it was moved aside, and leaves --out whole with nothing hidden beside it."""
    out, code = crash_write(tmp_path, phase, signame)
    assert code == -getattr(signal, signame)
    with pytest.raises(RuntimeError), artifacts.atomic_output_dir(out, overwrite=True):
        raise RuntimeError("a later run that fails: it must still have cleared the debris")
    assert snapshot(out) == EXPECTED[phase]
    assert hidden_beside(out) == []


@pytest.mark.parametrize("phase", ["a", "b", "c"])
def test_sigterm_in_the_cli_cleans_up_at_once(tmp_path, phase):
    """With the CLI's SIGTERM handler the interrupted process cleans up itself: no recovery needed afterwards."""
    out, code = crash_write(tmp_path, phase, "SIGTERM", handled=True)
    assert code == 143
    assert snapshot(out) == EXPECTED[phase]
    assert hidden_beside(out) == []


def test_the_reader_restores_a_result_left_aside(tmp_path):
    """Killed between the two renames, --out is missing: reading it puts the earlier result back."""
    out, _ = crash_write(tmp_path, "b", "SIGKILL")
    assert not out.exists() and hidden_beside(out)
    assert artifacts.read_artifact(out).config == {"run": "earlier"}
    assert snapshot(out) == EARLIER
    assert hidden_beside(out) == []


def test_recovery_touches_only_dead_owners_exact_names(tmp_path):
    """Live writers (another process, or this one's current staging) and look-alike names are left alone."""
    parent = tmp_path / "runs"
    (parent / "out").mkdir(parents=True)
    dead, alive = dead_pid(), os.getppid()
    keep = [f".out.partial-{alive}-abc123", f".out.old-{alive}", ".out.partial-abc_1234", f".out.old-{dead}x",
            f"out.old-{dead}", f".other.partial-{alive}-aa", "notes"]
    for name in [*keep, f".out.partial-{dead}-ab", f".out.old-{dead}"]:
        (parent / name).mkdir()
    (parent / f".out.partial-{dead}-cd").write_text("a file, not a folder this engine made")
    keep.append(f".out.partial-{dead}-cd")
    with artifacts.atomic_output_dir(parent / "out", overwrite=True) as staging:
        (parent / f".out.partial-{os.getpid()}-cafe").mkdir()  # this PID, but no write in progress: debris
        assert artifacts.recover_output_dir(parent / "out") == 1
        assert artifacts.clean_stale_staging(parent) == 0
        assert staging.is_dir()
        (staging / artifacts.CONFIG_FILE).write_text("{}")
    assert sorted(p.name for p in parent.iterdir()) == sorted([*keep, "out"])
    assert (parent / "out" / artifacts.CONFIG_FILE).read_text() == "{}"


def test_clean_stale_staging_restores_and_clears_every_name(tmp_path):
    parent = tmp_path / "session"
    parent.mkdir()
    dead = dead_pid()
    for name in (f".run-1.partial-{dead}-0a", f".run-1.old-{dead}", "run-1", f".run-2.old-{dead}",
                 f".run.x.partial-{dead}-1b"):
        (parent / name).mkdir()
    (parent / f".run-2.old-{dead}" / "kept.txt").write_text("the earlier result")
    assert artifacts.clean_stale_staging(parent) == 4
    assert sorted(p.name for p in parent.iterdir()) == ["run-1", "run-2"]
    assert (parent / "run-2" / "kept.txt").read_text() == "the earlier result"
    assert artifacts.clean_stale_staging(parent / "missing") == 0


def test_sigterm_stops_cli_training_with_one_line(tiny_base, subject_dir, tmp_path):
    """SIGTERM (a Space stop) during `train`: exit 143 with one line, --out untouched, nothing hidden beside it.

    stderr is a terminal so the progress bar shows; the signal goes once the bar's first line has appeared.
    """
    out = tmp_path / "out"
    out.mkdir()
    for name, data in EARLIER.items():
        (out / name).write_bytes(data)
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "personalization", "train", "--images", str(subject_dir), "--class-noun", "box",
         "--out", str(out), "--overwrite", "--base-model", str(tiny_base), "--stage1-steps", "5000",
         "--stage2-steps", "5000", "--samples", "0"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    try:
        while not re.search(rb"\d+/\d+ \[", seen):
            chunk = _read_or_eof(leader)
            assert chunk, f"the CLI ended before any progress: {seen.decode(errors='replace')}"
            seen += chunk
        child.send_signal(signal.SIGTERM)
        while chunk := _read_or_eof(leader):
            seen += chunk
        code = child.wait(timeout=120)
    finally:
        child.kill()
        os.close(leader)
    text = seen.decode(errors="replace")
    assert code == 143, text
    assert "Traceback" not in text and "Exception ignored" not in text
    # The bar may stop mid-line (interrupted while drawing), so the message is found by its start, not by line.
    assert re.findall(r"error:[^\r\n]*", text) == ["error: interrupted (SIGTERM); nothing was written"]
    assert text.rstrip().endswith("error: interrupted (SIGTERM); nothing was written")
    assert snapshot(out) == EARLIER
    assert hidden_beside(out) == []


def _read_or_eof(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # Linux reports the closed terminal's end as EIO
        return b""


# ---- the Hub: a server killed mid-push -------------------------------------------------------------------------------
PUSH_CHILD = """
import sys
from pathlib import Path
from personalization import hub
hub.push_artifact(Path(sys.argv[1]), "killed", sys.argv[2], endpoint=sys.argv[3])
"""


def test_a_server_killed_mid_push_leaves_the_local_run_as_it_was(tmp_path):
    """The push process is killed while the Hub holds its commit (the client is retrying a dropped connection): the
    local run is byte for byte what it was (its card still has the placeholder, not the repo that was never pushed),
    nothing else is left beside it once cleaned, and pushing again works."""
    import time

    from personalization.hub import push_artifact
    from tests.fake_hub import FakeHub, make_token

    token = make_token("alice")
    run = tmp_path / "session" / "run"
    (run / "samples").mkdir(parents=True)
    (run / "README.md").write_text('pipe.load_lora_weights("YOUR_NAME/THIS_REPO")\n')
    (run / "pytorch_lora_weights.safetensors").write_bytes(bytes(range(256)) * 16)
    (run / "samples" / "0.png").write_bytes(b"png")
    before = snapshot(run)
    with FakeHub({token: "alice"}) as hub:
        hub.fail_next_commits(times=20, status=None)  # every commit dropped: the client keeps retrying
        child = subprocess.Popen([sys.executable, "-c", PUSH_CHILD, str(run), token, hub.endpoint], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not any(path.endswith("/commit/main") for _, path in list(hub.requests)):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.kill()
        child.wait()
        assert snapshot(run) == before
        assert "alice/killed" not in hub.repos or hub.repos["alice/killed"].files == {}
        assert artifacts.clean_stale_staging(run.parent) == 1 and sorted(os.listdir(run.parent)) == ["run"]

        hub.clear_failures()
        push_artifact(run, "killed", token, endpoint=hub.endpoint)
        card = hub.repos["alice/killed"].files["README.md"]
    assert card == before["README.md"].replace(b"YOUR_NAME/THIS_REPO", b"alice/killed")
    assert snapshot(run) == before and sorted(os.listdir(run.parent)) == ["run"]


def test_session_cleaning_clears_half_written_runs_of_a_killed_server(tmp_path):
    from personalization.jobs import Workspace

    session = Workspace(tmp_path / "sessions", "live")
    (session.folder / "run-1").mkdir()
    (session.folder / "run-1" / "training_config.json").write_text("{}")
    debris = session.folder / f".run-2.partial-{dead_pid()}-0badf00d"
    debris.mkdir()
    assert Workspace.clean_old(tmp_path / "sessions") == 0
    assert not debris.exists() and (session.folder / "run-1").is_dir()
