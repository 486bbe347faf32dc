"""Screenshots of the four tabs for the README, on the bundled mini model with an example subject.

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshots/{upload,train,generate,hub}.png
    .venv/bin/python scripts/screenshots.py --steps 100   # quicker, for a loaded machine

Runs the real app on 127.0.0.1 and drives Debian's chromium with Playwright through the first minute a visitor of
the CPU Space sees: an example thumbnail, "Train and show me" (the default recipe: about a minute on two idle cores,
several on a loaded machine), the grid of the subject in new places beside the base model, then Generate and Hub.
Nothing leaves the machine: the push is answered in this process with the URL a real push returns (the push itself
is tested against a loopback fake Hub in tests/test_browser.py and tests/test_hub.py).
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
# The striped star: its stripes read well at 32 px, and stars are among the shapes the mini world knows.
EXAMPLE_INDEX, EXAMPLE_NOUN = 3, "star"
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
    with app.served_on_loopback(services, port) as url:
        yield url


def main(argv: list[str] | None = None) -> None:
    import argparse
    import tempfile

    from playwright.sync_api import expect, sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None,
                        help="stage 1 and U-Net steps (default: the recipe's, as a visitor gets them)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds to wait for any one thing (the training run: minutes on a loaded machine)")
    args = parser.parse_args(argv)
    expect.set_options(timeout=args.timeout * 1000)

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_name, serve(BUNDLED_MINI_MODEL, Path(scratch_name)) as url, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(Path(scratch_name) / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport=VIEWPORT, device_scale_factor=1,
        )
        context.set_default_timeout(args.timeout * 1000)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(url)

        # The first minute: a thumbnail, then "Train and show me", then the subject in new places.
        page.locator("#example-gallery button img").nth(EXAMPLE_INDEX).click()
        expect(page.locator("#upload-status")).to_contain_text("image(s) ready")
        expect(page.locator("#class-noun textarea, #class-noun input").first).to_have_value(EXAMPLE_NOUN)
        page.screenshot(path=OUT / "upload.png", full_page=True)

        if args.steps is not None:
            page.get_by_role("tab", name="2 · Train").click()
            page.get_by_text("Hyperparameters (prefilled by the preset)").click()
            for label in ("Stage 1 / TI steps", "U-Net steps"):
                page.get_by_label(label, exact=True).fill(str(args.steps))
                page.get_by_label(label, exact=True).press("Tab")
            expect(page.locator("#estimate")).to_contain_text(f"({args.steps} + {args.steps} steps)")
            page.get_by_role("tab", name="1 · Upload").click()
        page.locator("#train-now").click()
        expect(page.locator("#train-samples img").first).to_be_visible()
        expect(page.locator("#train-base-samples img")).to_have_count(page.locator("#train-samples img").count())
        expect(page.locator("#train-result")).to_contain_text("Trained")
        page.screenshot(path=OUT / "train.png", full_page=True)

        page.get_by_role("tab", name="3 · Generate").click()  # the prompt is already suggested
        expect(page.locator("#prompt textarea")).to_have_value(re.compile(f"{EXAMPLE_NOUN} on a "))
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
