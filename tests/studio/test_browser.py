"""End to end in a real headless Chromium (Debian's `chromium`, driven by Playwright; never a downloaded build):
open the studio, type a prompt, generate, see the layer in the panel, hide it, export a PSD, read it back."""
import os

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-quic", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 60_000  # generous: CI machines are shared


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def generate(page, prompt, expected_layers, expect):
    page.locator("#gen-prompt textarea").fill(prompt)
    page.locator("#gen-button").click()
    expect(page.locator("#status")).to_contain_text(f"{expected_layers} layer", timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = launch_chromium(p)
        try:
            yield b
        finally:
            b.close()


def test_generate_hide_and_export_psd_in_chromium(studio, browser, tmp_path):
    from playwright.sync_api import expect
    from psd_tools import PSDImage

    from layergen.studio.backends import ProceduralBackend

    page = browser.new_page(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(studio[1])
    expect(page.locator("#status")).to_contain_text("Empty", timeout=TIMEOUT_MS)

    generate(page, "a red star", 1, expect)
    gallery = page.locator("#layers-gallery")
    expect(gallery).to_contain_text("0: red star")
    expect(page.locator("#layer-name textarea, #layer-name input").first).to_have_value("red star")
    visible = page.locator("#layer-visible input[type=checkbox]")
    expect(visible).to_be_checked()

    visible.click()  # hide the new layer
    expect(gallery).to_contain_text("0: red star (hidden)", timeout=TIMEOUT_MS)
    expect(visible).not_to_be_checked()
    expect(page.locator("#status")).to_contain_text("Hide layer")

    page.locator("#gen-prompt textarea").fill("")  # a user error: a message, and the panel stays readable
    page.locator("#gen-button").click()
    expect(page.get_by_text("type a prompt").first).to_be_visible(timeout=TIMEOUT_MS)
    page.wait_for_timeout(1000)
    for panel in ("#preview", "#layers-gallery", "#layer-name"):  # Gradio badged every output "Error" before
        assert "Error" not in page.locator(panel).inner_text(), panel
    expect(gallery).to_contain_text("0: red star (hidden)")

    page.get_by_role("tab", name="File").click()
    expect(page.locator("#export-format")).to_contain_text("PSD")
    page.locator("#export-button").click()
    link = page.locator("#export-file a[download]").first
    expect(link).to_be_visible(timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        link.click()
    path = tmp_path / download.value.suggested_filename
    download.value.save_as(path)
    assert path.suffix == ".psd"
    page.screenshot(path=str(tmp_path / "after_export.png"))
    page.close()

    psd = PSDImage.open(path)
    assert (psd.width, psd.height) == (256, 256)
    layers = list(psd)
    assert [l.name for l in layers] == ["red star"] and layers[0].visible is False
    expected = ProceduralBackend().generate_layer("a red star", 0, 256, 256)  # seed 0 was in the form
    got = np.asarray(layers[0].topil().convert("RGBA"))
    assert (layers[0].left, layers[0].top) == (expected.x, expected.y)
    assert got.shape == expected.pixels.shape
    assert np.array_equal(got[..., 3], expected.pixels[..., 3])
    solid = expected.pixels[..., 3] > 0
    assert np.array_equal(got[solid, :3], expected.pixels[solid, :3])
    assert not errors, errors


def test_actions_tab_picks_the_clicked_image_in_chromium(studio, browser, tmp_path):
    """Load an identifier file, generate with its token, click the third image: that one goes to the document
    (the gallery's select event fills "Image # to add"), and the token survives in both status lines."""
    from playwright.sync_api import expect

    from layergen.studio.actions import ActionBackend

    backend = ActionBackend()
    ident = backend.learn(backend.make_exemplars("jump"), "jump", steps=3)
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(studio[1])
    page.get_by_role("tab", name="Actions").click()
    page.locator("#action-load input[type=file]").set_input_files(str(ident))
    expect(page.locator("#action-learned")).to_contain_text("Identifiers: <jump>", timeout=TIMEOUT_MS)
    page.locator("#action-generate").click()
    status = page.locator("#action-status")
    expect(status).to_contain_text("4 images of a blue cat in the snow <jump>, seed 0", timeout=TIMEOUT_MS)
    page.locator("#action-gallery .thumbnail-item").nth(2).click()
    expect(page.locator("#action-pick input")).to_have_value("3", timeout=TIMEOUT_MS)
    page.locator("#action-add").click()
    expect(status).to_contain_text("Added image 3 as a new layer", timeout=TIMEOUT_MS)
    page.get_by_role("tab", name="Layers").click()
    expect(page.locator("#status")).to_contain_text("selected: a blue cat in the snow <jump>", timeout=TIMEOUT_MS)
    assert errors == []
    page.close()
