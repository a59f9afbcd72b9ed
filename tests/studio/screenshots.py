"""Regenerate the studio screenshots in docs/ (docs/studio_<tab>.png) with the headless Debian Chromium.

    python tests/studio/screenshots.py [--out docs]

Runs the studio on the procedural backend (deterministic, no weights), builds a small document and
photographs each tab in use. Not a test (pytest does not collect it); the browser test checks behaviour.
"""
import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_browser import TIMEOUT_MS, generate, launch_chromium  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="studio-shots-"))
    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp / "gradio"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    from layergen.atomic import atomic_path
    from layergen.data.scenes import make_scene
    from layergen.studio.app import launch
    from layergen.studio.backends import ProceduralBackend

    def shoot(page, name):
        with atomic_path(out / f"studio_{name}.png") as path:
            page.screenshot(path=str(path), full_page=True)
        print("wrote", out / f"studio_{name}.png")

    demo, url = launch(ProceduralBackend(), prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1440, "height": 1080}, accept_downloads=True)
            page.goto(url)
            expect(page.locator("#status")).to_contain_text("Empty", timeout=TIMEOUT_MS)

            prompts = ["a horizon background", "a red star with a drop shadow", "a blue glass heart",
                       "a yellow circle with a soft glow"]
            for k, prompt in enumerate(prompts, start=1):
                generate(page, prompt, k, expect)
            shoot(page, "generate")

            # Layout: draw two boxes on the sketch, turn them into table rows.
            page.get_by_role("tab", name="Layout").click()
            page.locator("#layout-prompt textarea").fill("a green square")
            canvas = page.locator("#layout-sketch canvas").first
            expect(canvas).to_be_visible(timeout=TIMEOUT_MS)
            page.wait_for_timeout(1000)
            box = canvas.bounding_box()
            side = min(box["width"], box["height"], 259)  # the 256 px document at the editor's 101 % zoom
            left, top = box["x"] + (box["width"] - side) / 2, box["y"] + (box["height"] - side) / 2
            for (x0, y0, x1, y1) in [(0.08, 0.55, 0.4, 0.92), (0.6, 0.08, 0.92, 0.4)]:
                page.mouse.move(left + x0 * side, top + y0 * side)
                page.mouse.down()
                for (x, y) in [(x1, y0), (x1, y1), (x0, y1), (x0, y0)]:
                    page.mouse.move(left + x * side, top + y * side, steps=12)
                page.mouse.up()
                page.wait_for_timeout(300)
            page.get_by_role("button", name="Add drawn boxes to the table").first.click()
            expect(page.locator("#layout-boxes")).to_contain_text(re.compile(r"\d\d"), timeout=TIMEOUT_MS)
            page.wait_for_timeout(500)
            shoot(page, "layout")

            # Repaint: select the star, give it a new prompt.
            page.get_by_role("tab", name="Repaint").click()
            page.locator("#layers-gallery").get_by_text("1: red star").click()
            expect(page.locator("#status")).to_contain_text("selected: red star", timeout=TIMEOUT_MS)
            page.locator("#repaint-prompt textarea").fill("a purple triangle")
            page.locator("#repaint-button").click()
            expect(page.locator("#status")).to_contain_text("Repaint layer", timeout=TIMEOUT_MS)
            shoot(page, "repaint")

            # File: export a PSD.
            page.get_by_role("tab", name="File").click()
            page.locator("#export-button").click()
            expect(page.locator("#export-file a[download]").first).to_be_visible(timeout=TIMEOUT_MS)
            shoot(page, "file")

            # Decompose: upload a flat picture; its layers become the document.
            flat = tmp / "flat.png"
            Image.fromarray(make_scene(1_000_007, 256).composite).save(flat)
            page.get_by_role("tab", name="Decompose").click()
            page.locator("#decompose-image input[type=file]").set_input_files(str(flat))
            page.wait_for_timeout(1500)
            page.locator("#decompose-button").click()
            expect(page.locator("#status")).to_contain_text("Decompose image", timeout=TIMEOUT_MS)
            shoot(page, "decompose")

            # Actions: example exemplars, learn <jump> briefly, generate it, add one image to the document.
            page.get_by_role("tab", name="Actions").click()
            page.locator("#action-example-button").click()
            expect(page.locator("#action-exemplars")).to_contain_text("metadata.jsonl", timeout=TIMEOUT_MS)
            page.locator("#action-steps input[type=number]").fill("100")
            page.locator("#action-steps input[type=number]").press("Enter")
            page.locator("#action-learn").click()
            expect(page.locator("#action-learned")).to_contain_text("Learned", timeout=4 * TIMEOUT_MS)
            page.locator("#action-generate").click()
            expect(page.locator("#action-status")).to_contain_text("images of", timeout=TIMEOUT_MS)
            page.locator("#action-gallery .thumbnail-item").nth(1).click()
            page.locator("#action-add").click()
            expect(page.locator("#action-status")).to_contain_text("Added image", timeout=TIMEOUT_MS)
            page.keyboard.press("Escape")  # close the gallery's preview
            shoot(page, "actions")
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
