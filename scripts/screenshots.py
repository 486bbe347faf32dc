"""Screenshots of the four tabs for the README, on the bundled mini model with an example subject.

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshots/{upload,train,generate,hub}.png

Runs the real app on 127.0.0.1 (CPU, the default recipe, so it takes a minute or two) and drives Debian's chromium
with Playwright. Nothing leaves the machine: the push is answered in this process with the URL a real push returns
(the push itself is tested against a loopback fake Hub in tests/test_browser.py and tests/test_hub.py).
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personalization.device import BUNDLED_MINI_MODEL  # noqa: E402
from scripts.chromium import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
HUB_USER = "alice"


@contextmanager
def serve(base: str, scratch: Path) -> Iterator[str]:
    """The app on a free loopback port, on CPU, with its sessions under ``scratch``; yields its URL."""
    import socket

    import torch

    import app
    from personalization import hub
    from personalization.device import choose_placement
    from personalization.generation import Generator

    def push_here(folder: Path, repo: str, token: str, *, private: bool = True) -> str:
        return hub.repo_url(f"{HUB_USER}/{hub.slugify_repo_name(repo)}")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hub.push_artifact = push_here
    services = app.Services(default_base=base, generator=Generator(torch.device("cpu"), torch.float32),
                            hardware=choose_placement(device="cpu").describe(), work_root=scratch / "sessions")
    demo = app.build_app(services)
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **app.LAUNCH_OPTIONS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def main() -> None:
    import tempfile

    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=300_000)  # a real training run on a CPU takes a minute or two

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_name, serve(BUNDLED_MINI_MODEL, Path(scratch_name)) as url, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(Path(scratch_name) / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport=VIEWPORT, device_scale_factor=1,
        )
        context.set_default_timeout(300_000)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(url)

        page.locator("#example input").first.click()
        page.get_by_role("option", name="striped star").click()
        expect(page.locator("#upload-status")).to_contain_text("5 image(s) ready")
        expect(page.locator("#prepared-gallery img")).to_have_count(5)
        page.screenshot(path=OUT / "upload.png", full_page=True)

        page.get_by_role("tab", name="2 · Train").click()
        page.get_by_text("Hyperparameters (prefilled by the preset)").click()
        page.locator("#start-training").click()
        expect(page.locator("#train-result")).to_contain_text("Trained")
        prompt = re.search(r"a photo of a \S+ star", page.locator("#train-result").inner_text())
        page.screenshot(path=OUT / "train.png", full_page=True)

        page.get_by_role("tab", name="3 · Generate").click()
        if prompt is not None:
            page.locator("#prompt textarea").fill(f"{prompt.group(0)} on a blue background")
        page.locator("#generate").click()
        expect(page.locator("#personal-gallery img")).to_have_count(2)
        page.screenshot(path=OUT / "generate.png", full_page=True)

        page.get_by_role("tab", name="4 · Hub").click()
        page.locator("#hub-token input, #hub-token textarea").first.fill(f"hf_{secrets.token_hex(17)}")
        page.locator("#push").click()
        expect(page.locator("#push-status")).to_contain_text("Pushed to")
        page.screenshot(path=OUT / "hub.png", full_page=True)
        context.close()
    print(f"wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} to {OUT}")


if __name__ == "__main__":
    main()
