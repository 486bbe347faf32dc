"""Screenshots of the four tabs for the README, on the bundled mini model with an example subject.

    .venv/bin/python scripts/screenshots.py            # writes docs/screenshots/{upload,train,generate,hub}.png

Runs the real app on 127.0.0.1 (CPU, the default recipe, so it takes a minute or two), pushes to a loopback fake Hub
(nothing leaves the machine), and drives Debian's chromium with Playwright.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from personalization.device import BUNDLED_MINI_MODEL  # noqa: E402
from tests.test_app import TOKEN, running_app  # noqa: E402
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT  # noqa: E402

OUT = ROOT / "docs" / "screenshots"


def main() -> None:
    import tempfile

    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=300_000)  # a real training run on a CPU takes a minute or two

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch_name, running_app(BUNDLED_MINI_MODEL, Path(scratch_name)) as served, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(Path(scratch_name) / "profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
            viewport=VIEWPORT, device_scale_factor=1,
        )
        context.set_default_timeout(300_000)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(served.url)

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
        page.locator("#hub-token input, #hub-token textarea").first.fill(TOKEN)
        page.locator("#push").click()
        expect(page.locator("#push-status")).to_contain_text("Pushed to")
        page.screenshot(path=OUT / "hub.png", full_page=True)
        context.close()
    print(f"wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} to {OUT}")


if __name__ == "__main__":
    main()
