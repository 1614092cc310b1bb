"""The app in a real browser: headless Debian Chromium driven by playwright.

Set UPDATE_SCREENSHOT=1 to also save the page, after an answer, to docs/screenshot.png.
"""

import os
import shutil
from pathlib import Path

import easy_vqa
import pytest
from fixtures import ROOT, draw_shape
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        page.goto(server["url"])
        page.wait_for_selector("#image input[type=file]", state="attached")
        yield page
        browser.close()


def top_answer(page) -> str:
    return page.locator("#answers [data-testid=label-output-value]").inner_text().strip()


def ask(page, question: str) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()


def test_upload_ask_and_see_the_answer_and_heatmap(page, tmp_path):
    image = tmp_path / "red-circle.png"
    draw_shape("red", "circle", seed=4).resize((256, 256), Image.NEAREST).save(image)  # 64 px, shown larger
    page.locator("#image input[type=file]").set_input_files(str(image))
    page.wait_for_selector("#image img")
    ask(page, "what color is the shape?")

    page.wait_for_selector("#answers [data-testid=label-output-value]")
    assert top_answer(page) == "red"
    bars = page.locator("#answers [data-testid$=-confidence-set]")
    assert bars.count() == 5
    heatmap = page.locator("#heatmap img")
    heatmap.wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#heatmap img').naturalWidth > 0")
    assert heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]

    shot = tmp_path / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, ROOT / "docs" / "screenshot.png")


def wait_for_answer(page, answer: str) -> None:
    page.wait_for_function(
        "answer => document.querySelector('#answers [data-testid=label-output-value]')?.innerText.trim() === answer",
        arg=answer)


def test_enter_submits_and_mistakes_show_the_message(page):
    page.locator("#image input[type=file]").set_input_files(easy_vqa.get_test_image_paths()[0])  # a red triangle
    page.locator("#question textarea").fill("does the image contain a triangle?")
    page.locator("#question textarea").press("Enter")
    wait_for_answer(page, "yes")

    ask(page, "   ")
    toast = page.locator("[data-testid=toast-body]").filter(has_text="the question is empty")
    toast.first.wait_for(state="visible")
    assert top_answer(page) == "yes"  # the last good answer stays

    ask(page, "does the image contain a circle?")
    wait_for_answer(page, "no")


def test_an_example_fills_the_inputs_and_is_answered(page):
    page.locator("#examples table tbody tr").first.click()
    page.wait_for_function(
        "() => document.querySelector('#question textarea').value === 'what is the red shape?'")
    page.locator("#ask").click()
    wait_for_answer(page, "triangle")  # easy-VQA's answer: its first test image holds a red triangle


def test_a_file_name_with_markup_shows_as_text_in_the_error(page, tmp_path):
    """The error toast names the upload; a name full of HTML must not become a link or an image."""
    name = '<a href="http://127.0.0.1:9/x" id="injected">log in again</a><img src=x id="injected-img">.png'
    bad = tmp_path / name.replace("/", "_")
    bad.write_bytes(b"not an image at all")
    page.locator("#image input[type=file]").set_input_files(str(bad))
    ask(page, "what color is the shape?")
    toast = page.locator("[data-testid=toast-body]").filter(has_text="not a readable image")
    toast.first.wait_for(state="visible")
    assert page.locator("[data-testid=toast-body] a").count() == 0
    assert page.locator("[data-testid=toast-body] img").count() == 0
    assert "log in again" in toast.first.inner_text()  # shown, as text


def test_a_noise_image_shows_the_out_of_distribution_notice(page, tmp_path):
    import numpy as np

    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(noise)
    page.locator("#image input[type=file]").set_input_files(str(noise))
    page.wait_for_selector("#image img")
    ask(page, "how many cups are there?")
    page.wait_for_function(
        "() => document.querySelector('#notice')?.innerText.includes('unlike anything this model was trained on')")
    assert "cups" in page.locator("#notice").inner_text()


def choose_model(page, selector_id: str, name: str) -> None:
    page.locator(f"#{selector_id} input").click()
    page.locator("[role=option]").filter(has_text=name).first.click()
    page.wait_for_function("([id, name]) => document.querySelector(`#${id} input`).value === name",
                           arg=[selector_id, name])


def test_build_a_scene_ask_and_read_the_model_and_the_true_answer(page):
    page.get_by_role("tab", name="Build a scene").click()
    page.locator("#scene-new").click()
    # Gradio's tables draw their rows as [role=row] elements, the header first.
    page.wait_for_function("() => document.querySelectorAll('#scene-table [role=row]').length >= 4")
    page.wait_for_selector("#scene-image img")
    page.locator("#scene-suggestions [role=row]").nth(1).locator("[role=gridcell]").first.click()
    page.wait_for_function("() => document.querySelector('#scene-question textarea').value.length > 5")
    page.locator("#scene-ask").click()
    page.wait_for_function("() => document.querySelector('#scene-truth')?.innerText.includes('True answer')")
    truth = page.locator("#scene-truth").inner_text()
    model_answer = page.locator("#scene-answers [data-testid=label-output-value]").inner_text().strip()
    assert model_answer and ("right" in truth) != ("wrong" in truth)
    page.get_by_role("tab", name="Ask").click()


def test_the_suggestions_true_answer_column_is_in_view_at_1400_px(page):
    page.set_viewport_size({"width": 1400, "height": 900})
    try:
        page.get_by_role("tab", name="Build a scene").click()
        page.locator("#scene-new").click()
        page.wait_for_function("() => document.querySelectorAll('#scene-suggestions [role=row]').length >= 4")
        table = page.locator("#scene-suggestions").bounding_box()
        header = page.locator("#scene-suggestions [role=row]").first.get_by_text("true answer").bounding_box()
        assert header["x"] + header["width"] <= table["x"] + table["width"]
        # Nothing inside the table scrolls sideways (cells wrap their text).
        overflowing = page.evaluate("""() => [...document.querySelectorAll('#scene-suggestions *')]
            .filter(e => e.scrollWidth > e.clientWidth + 1 && ['auto', 'scroll'].includes(getComputedStyle(e).overflowX))
            .length""")
        assert overflowing == 0
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})
        page.get_by_role("tab", name="Ask").click()


def test_an_attention_model_shows_where_each_glimpse_looked(page, tmp_path):
    from vqa.worlds.shapes import random_scene, render_scene

    scene = tmp_path / "scene.png"
    render_scene(random_scene(3)).save(scene)
    page.get_by_role("tab", name="Ask").click()
    choose_model(page, "model", "shapes-world-attention")
    page.locator("#image input[type=file]").set_input_files(str(scene))
    page.wait_for_selector("#image img")
    ask(page, "how many circles are there?")
    page.wait_for_function("() => document.querySelectorAll('#attention img').length >= 2", timeout=60_000)
    choose_model(page, "model", "easy-vqa")
