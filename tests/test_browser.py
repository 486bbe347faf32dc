"""The app in a real browser: Debian's chromium, driven by Playwright, clicks through Upload, Train, Generate and Hub.

It also saves the screenshots the README shows (docs/screenshots/*.png). Needs `/usr/bin/chromium`
(`apt-get install chromium`; scripts/test.sh installs it); set SKIP_BROWSER_TESTS=1 to skip on purpose.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from personalization.device import BUNDLED_MINI_MODEL
from personalization.mini_world.world import COLOR_NAMES, SHAPES
from scripts.chromium import CHROMIUM, CHROMIUM_ARGS, VIEWPORT
from tests.test_app import TOKEN, Served, assert_no_token, assert_no_token_in_files, running_app

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
TIMEOUT_MS = 60_000


def duck_photos(folder: Path, count: int = 4, size: int = 192) -> list[Path]:
    """A few 'photos' of one subject (a yellow toy duck) at different places and sizes, on a soft backdrop."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        shade = np.linspace(0, 1, size)[:, None, None]
        top, bottom = np.array([170, 205, 235]) - 10 * index, np.array([235, 225, 200])
        image = Image.fromarray((top * (1 - shade) + bottom * shade).repeat(size, axis=1).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        scale = rng.uniform(0.8, 1.1) * size / 192
        x, y = rng.uniform(20, 60) * size / 192, rng.uniform(40, 70) * size / 192

        def box(left: float, upper: float, right: float, lower: float) -> tuple[float, float, float, float]:
            return x + left * scale, y + upper * scale, x + right * scale, y + lower * scale  # noqa: B023

        draw.ellipse(box(0, 50, 120, 120), fill=(250, 205, 40), outline=(200, 150, 20), width=2)  # body
        draw.ellipse(box(70, 0, 125, 55), fill=(250, 205, 40), outline=(200, 150, 20), width=2)  # head
        draw.polygon([box(118, 22, 118, 22)[:2], box(150, 30, 150, 30)[:2], box(118, 38, 118, 38)[:2]],
                     fill=(240, 120, 30))  # beak
        draw.ellipse(box(98, 16, 108, 26), fill=(30, 30, 30))  # eye
        draw.ellipse(box(20, 65, 75, 95), fill=(235, 185, 30))  # wing
        path = folder / f"duck_{index}.png"
        image.save(path)
        paths.append(path)
    return paths


@contextmanager
def browser_page(url: str, profile: Path, errors: list[str] | None = None) -> Iterator[tuple[Any, Any]]:
    """A fresh chromium (its own profile) on the app's page; page errors are collected in ``errors``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, viewport=VIEWPORT,
            device_scale_factor=1)
        try:
            context.set_default_timeout(TIMEOUT_MS)
            page = context.pages[0] if context.pages else context.new_page()
            if errors is not None:
                page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            yield context, page
        finally:
            context.close()


@pytest.fixture(scope="module")
def browser_app(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if os.environ.get("SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SKIP_BROWSER_TESTS=1")
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: `apt-get install -y chromium` "
                    "(scripts/test.sh does it), or set SKIP_BROWSER_TESTS=1 to skip them", pytrace=False)
    with running_app(tiny_base, tmp_path_factory.mktemp("browser-app")) as running:
        yield running


def test_click_through_upload_train_generate_and_push(
    browser_app: Served, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    caplog.set_level(logging.DEBUG)

    photos = duck_photos(tmp_path / "photos")
    shots = tmp_path / "shots"
    shots.mkdir()
    errors: list[str] = []
    with browser_page(browser_app.url, tmp_path / "profile", errors) as (context, page):

        # 1 · Upload
        page.locator("#subject-files input[type=file]").set_input_files([str(p) for p in photos])
        expect(page.locator("#upload-status")).to_contain_text("4 image(s) ready")
        expect(page.locator("#prepared-gallery img")).to_have_count(4)
        page.locator("#class-noun textarea, #class-noun input").first.fill("duck")
        page.screenshot(path=shots / "upload.png", full_page=True)

        # 2 · Train
        page.get_by_role("tab", name="2 · Train").click()
        page.get_by_text("Hyperparameters (prefilled by the preset)").click()
        for label, value in (("Stage 1 / TI steps", "2"), ("U-Net steps", "2"),
                             ("Preview every N steps (0: off)", "2")):
            field = page.get_by_label(label, exact=True)
            field.fill(value)
            field.press("Tab")
        expect(page.locator("#estimate")).to_contain_text("(2 + 2 steps)")
        page.locator("#start-training").click()
        expect(page.locator("#train-result")).to_contain_text("Trained", timeout=120_000)
        expect(page.locator("#train-progress")).to_contain_text("Done.")
        expect(page.locator("#train-preview img")).to_have_count(1)  # the last preview stays up
        expect(page.locator("#train-samples img").first).to_be_visible()  # the run's samples under the base's
        expect(page.locator("#train-base-samples img")).to_have_count(page.locator("#train-samples img").count())
        prompt = re.search(r"a photo of a \S+ duck", page.locator("#train-result").inner_text())
        assert prompt is not None
        page.screenshot(path=shots / "train.png", full_page=True)

        # 3 · Generate: the new run is already chosen and the prompt suggested
        page.get_by_role("tab", name="3 · Generate").click()
        expect(page.locator("#prompt textarea")).to_have_value(f"{prompt.group(0)} on the beach")
        page.locator("#generate").click()
        expect(page.locator("#personal-gallery img")).to_have_count(2, timeout=120_000)
        expect(page.locator("#base-gallery img")).to_have_count(2)
        page.screenshot(path=shots / "generate.png", full_page=True)

        # 4 · Hub
        page.get_by_role("tab", name="4 · Hub").click()
        expect(page.locator("#repo-name textarea, #repo-name input").first).to_have_value(
            re.compile(r"duck-.+-two_stage"))
        page.locator("#hub-token input, #hub-token textarea").first.fill(TOKEN)
        page.locator("#push").click()
        link = page.locator("#push-status a")
        expect(link).to_have_attribute("href", re.compile(rf"^{re.escape(browser_app.hub.endpoint)}/alice/duck-"))
        expect(page.locator("#push-status")).to_contain_text("Pushed to")
        page.screenshot(path=shots / "hub.png", full_page=True)
        page_html = page.content()
        # Nothing the browser keeps holds the token: Gradio's run history (localStorage, /gradio_api/runs) is off.
        stored = page.evaluate("""async () => JSON.stringify({
            local: Object.entries(localStorage), session: Object.entries(sessionStorage),
            databases: indexedDB.databases ? await indexedDB.databases() : []})""")
        cookies = str(context.cookies())
        runs_page = page.goto(f"{browser_app.url}gradio_api/runs")
        runs_text = f"{runs_page.status if runs_page else ''} {page.content()}"

    assert errors == []
    out, err = capfd.readouterr()
    assert_no_token(page_html, stored, cookies, runs_text, out, err,
                    "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records))
    assert_no_token_in_files(browser_app)
    assert len(browser_app.hub.repos) == 1
    (repo_id, repo), = browser_app.hub.repos.items()
    assert repo_id.startswith("alice/duck-") and repo.private and "training_config.json" in repo.files
    for name in ("upload", "train", "generate", "hub"):
        shot = Image.open(shots / f"{name}.png")
        assert shot.width == VIEWPORT["width"] and shot.height >= 600
    # The README's pictures change only on request (UPDATE_SCREENSHOTS=1), after a complete run.
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("upload", "train", "generate", "hub"):
            shutil.copyfile(shots / f"{name}.png", SCREENSHOTS / f"{name}.png")


@pytest.fixture(scope="module")
def mini_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The app as the CPU Space runs it: on the bundled mini model."""
    if os.environ.get("SKIP_BROWSER_TESTS") == "1":
        pytest.skip("SKIP_BROWSER_TESTS=1")
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}", pytrace=False)
    with running_app(BUNDLED_MINI_MODEL, tmp_path_factory.mktemp("mini-app")) as running:
        yield running


# Every text #train-progress shows, in order, kept by the page itself: a step's line may be replaced before a
# Playwright poll could read it.
RECORD_PROGRESS = """() => {
    const box = document.querySelector('#train-progress');
    window.progressTexts = [];
    new MutationObserver(() => window.progressTexts.push(box.innerText))
        .observe(box, {childList: true, subtree: true, characterData: true});
}"""
MINI_WORDS = {"a", "photo", "of", "on", "background", *COLOR_NAMES, *SHAPES}


def clock_seconds(text: str) -> int:
    """'1:05' or '1:02:03' -> seconds."""
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def words_outside_the_mini_world(prompt: str) -> set[str]:
    return {word for word in prompt.split() if not re.fullmatch(r"<[^>]+>", word)} - MINI_WORDS


def test_an_example_thumbnail_then_train_and_show_me(mini_app: Served, tmp_path: Path) -> None:
    """The CPU Space's first minute: an example thumbnail, 'Train and show me', the grid; an honest first ETA and
    suggestions the mini model can draw."""
    from playwright.sync_api import expect

    with browser_page(mini_app.url, tmp_path / "profile") as (_, page):
        expect(page.locator("#mini-world-note")).to_contain_text("shapes")  # said before any upload
        thumbnails = page.locator("#example-gallery button img")
        expect(thumbnails).to_have_count(4)
        thumbnails.first.click()
        expect(page.locator("#upload-status")).to_contain_text("5 image(s) ready")
        expect(page.locator("#prepared-gallery img")).to_have_count(5)
        expect(page.locator("#class-noun textarea, #class-noun input").first).to_have_value("heart")
        page.locator("#subject-files button[aria-label='Remove this file']").first.click()
        # Out of the list, out of training.
        expect(page.locator("#upload-status")).to_contain_text("4 image(s) ready")
        expect(page.locator("#prepared-gallery img")).to_have_count(4)

        # Enough steps that training, not loading, is most of the estimate and the steps are seen going by;
        # few enough that the walk stays quick on two cores. Everything else stays at the defaults.
        page.get_by_role("tab", name="2 · Train").click()
        page.get_by_text("Hyperparameters (prefilled by the preset)").click()
        for label in ("Stage 1 / TI steps", "U-Net steps"):
            page.get_by_label(label, exact=True).fill("60")
            page.get_by_label(label, exact=True).press("Tab")
        expect(page.locator("#estimate")).to_contain_text("(60 + 60 steps)")
        shown = re.search(r"about (\d+(?::\d\d)+)", page.locator("#estimate").inner_text())
        assert shown is not None, page.locator("#estimate").inner_text()
        estimate_s = clock_seconds(shown[1])
        page.evaluate(RECORD_PROGRESS)
        page.get_by_role("tab", name="1 · Upload").click()
        page.locator("#train-now").click()  # straight from the example to its trained model in new places
        expect(page.get_by_role("tab", name="2 · Train")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#train-samples img").first).to_be_visible(timeout=400_000)  # minutes on a loaded machine
        samples = page.locator("#train-samples img").count()
        expect(page.locator("#train-base-samples img")).to_have_count(samples)  # the base, same seeds
        expect(page.locator("#train-result")).to_contain_text("Trained")

        # The checkpoints (60 + 60 steps: stage 1's end and four over stage 2), scored by the mini world's checker:
        # the curve with the recommended step, the same sample at each, and a step the user picks instead.
        # The chart by its label: while the box updates, Gradio's loading spinner is an svg in it too.
        expect(page.get_by_role("img", name="fidelity and drift against step")).to_be_visible()
        expect(page.locator("#checkpoint-summary")).to_contain_text("recommended")
        expect(page.locator("#checkpoint-grid img")).to_have_count(5)
        grid_captions = page.locator("#checkpoint-grid .caption-label").all_inner_texts()
        assert [caption.split(" · ")[0] for caption in grid_captions] == [f"step {n}" for n in (60, 75, 90, 105, 120)]
        assert sum("recommended" in caption for caption in grid_captions) == 1, grid_captions
        page.locator("#step-picker input").click()
        page.get_by_role("option", name=re.compile(r"^step 60\b")).click()
        page.locator("#pick-step").click()
        expect(page.locator("#pick-message")).to_contain_text("holds the checkpoint at step 60")

        # The first ETA the page showed comes from the estimate it showed before Start, not from the warm-up.
        texts: list[str] = page.evaluate("window.progressTexts")
        etas = [eta[1] for text in texts if (eta := re.search(r"ETA (\d+(?::\d\d)+)", text))]
        assert etas, texts
        assert estimate_s / 2 <= clock_seconds(etas[0]) <= estimate_s * 2, (shown[1], etas[:5])

        # Everything suggested is in the mini world's words: the grid's prompts (the card's widget) and the
        # Generate tab's prompt.
        instance = re.search(r"a photo of a \S+ heart", page.locator("#train-result").inner_text())
        assert instance is not None
        captions = page.locator("#train-samples .caption-label, #train-base-samples .caption-label").all_inner_texts()
        assert len(captions) == 2 * samples, captions
        page.get_by_role("tab", name="3 · Generate").click()
        expect(page.locator("#prompt textarea")).to_have_value(re.compile(re.escape(instance[0])))
        suggested = page.locator("#prompt textarea").input_value()
        for prompt in [suggested, *(caption.removeprefix("base · ") for caption in captions)]:
            assert not words_outside_the_mini_world(prompt), prompt
