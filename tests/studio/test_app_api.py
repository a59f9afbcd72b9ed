"""The studio app through its API (gradio_client against a launched server): the README flow, every layer
operation, sessions, undo/redo, layout, decomposition, import/export and user errors."""
import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from layergen.data.scenes import make_scene
from layergen.layers import formats
from layergen.studio.document import checkerboard

PSD = "PSD (Photoshop, Photopea, Krita)"
ZIP = "PNG stack (zip)"
INFO, STATUS, PREVIEW, GALLERY = 10, 11, 0, 1


def info(result):
    return result[INFO]


def val(output):
    """The value of an output, whether it came back plain or as a component update."""
    return output["value"] if isinstance(output, dict) and output.get("__type__") == "update" else output


def names(result):
    return [l["name"] for l in info(result)["layers"]]


def png_header(width, height) -> bytes:
    """The start of a PNG declaring a width x height RGB canvas (its pixel data cut off)."""
    import struct
    import zlib

    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 1000) + b"IDAT" + bytes(64))


def table(rows):
    return {"headers": ["x0", "y0", "x1", "y1", "prompt"], "data": rows, "metadata": None}


def test_readme_flow_generate_reorder_repaint_export(client, tmp_path):
    """Three layers, reorder, repaint one (others bit-identical), download a PSD that keeps every layer."""
    for seed, prompt in enumerate(["a horizon background", "a red star", "a blue heart"]):
        r = client.predict(prompt, seed, "none", api_name="/generate")
    assert names(r) == ["horizon with a blue sky and red ground", "red star", "blue heart"]
    assert [l["kind"] for l in info(r)["layers"]] == ["background", "instance", "instance"]
    assert info(r)["selected"] == 2 and [l["prompt"] for l in info(r)["layers"]][1] == "a red star"
    gallery = val(r[GALLERY])
    assert [g["caption"] for g in gallery] == [f"{i}: {n}" for i, n in reversed(list(enumerate(names(r))))]

    r = client.predict(api_name="/move_down")  # the heart goes below the star
    order = names(r)
    assert order[1:] == ["blue heart", "red star"] and info(r)["selected"] == 1
    before = formats.load(client.predict(ZIP, api_name="/export"))

    r = client.predict("a green square", 11, api_name="/repaint")  # repaints the selected heart
    after = formats.load(client.predict(ZIP, api_name="/export"))
    assert names(r) == [order[0], "green square", order[2]] and info(r)["layers"][1]["prompt"] == "a green square"
    assert not np.array_equal(after[1].pixels, before[1].pixels)
    for i in (0, 2):
        assert after[i] == before[i]  # every other layer is untouched, pixel for pixel

    psd_path = client.predict(PSD, api_name="/export")
    from psd_tools import PSDImage

    psd = PSDImage.open(psd_path)
    assert [l.name for l in psd] == names(r) and (psd.width, psd.height) == (256, 256)
    reloaded = formats.load(psd_path)
    assert np.array_equal(reloaded.composite(), after.composite())


def test_preview_is_live_and_layer_ops(client):
    r = client.predict("a red square", 3, "none", api_name="/generate")
    layer = info(r)["layers"][0]
    cx, cy = layer["x"] + layer["width"] // 2, layer["y"] + layer["height"] // 2
    shown = np.asarray(Image.open(r[PREVIEW]).convert("RGBA"))
    assert shown[cy, cx, 0] > 150 and shown[cy, cx, 1] < 100  # red in the preview

    r = client.predict(False, api_name="/set_visible")
    shown = np.asarray(Image.open(r[PREVIEW]).convert("RGBA"))
    assert np.array_equal(shown, checkerboard(256, 256))  # hidden: only the checkerboard is left
    assert val(r[GALLERY])[0]["caption"].endswith("(hidden)") and val(r[4]) is False
    r = client.predict(True, api_name="/set_visible")

    r = client.predict("Hero", api_name="/rename")
    assert names(r) == ["Hero"] and val(r[3]) == "Hero"
    r = client.predict(40, api_name="/set_opacity")
    assert info(r)["layers"][0]["opacity"] == pytest.approx(0.4)
    r = client.predict("multiply", api_name="/set_blend_mode")
    assert info(r)["layers"][0]["blend_mode"] == "multiply"
    r = client.predict(api_name="/duplicate")
    assert names(r) == ["Hero", "Hero copy"] and info(r)["selected"] == 1
    r = client.predict(10, 20, 50, api_name="/transform")  # move to (10, 20), then scale 50 % about the centre
    moved = info(r)["layers"][1]
    assert (moved["width"], moved["height"]) == (round(layer["width"] / 2), round(layer["height"] / 2))
    assert abs(moved["x"] - (10 + layer["width"] / 4)) <= 1 and abs(moved["y"] - (20 + layer["height"] / 4)) <= 1
    r = client.predict(0, api_name="/select_layer")
    assert info(r)["selected"] == 0 and val(r[3]) == "Hero"
    r = client.predict(1, api_name="/select_layer")
    r = client.predict(api_name="/merge_down")
    assert names(r) == ["Hero"] and info(r)["selected"] == 0
    r = client.predict(api_name="/delete")
    assert names(r) == [] and info(r)["selected"] is None

    # undo walks back through every edit; redo replays it
    r = client.predict(api_name="/undo")
    assert names(r) == ["Hero"]
    r = client.predict(api_name="/undo")
    assert names(r) == ["Hero", "Hero copy"]
    r = client.predict(api_name="/redo")
    assert names(r) == ["Hero"] and info(r)["redo"] == "Delete layer"


def test_sessions_are_isolated(studio, tmp_path):
    from gradio_client import Client

    alice = Client(studio[1], verbose=False, download_files=str(tmp_path / "a"))
    bob = Client(studio[1], verbose=False, download_files=str(tmp_path / "b"))
    alice.predict("a red star", 0, "none", api_name="/generate")
    alice.predict("a blue ring", 1, "none", api_name="/generate")
    r = bob.predict(api_name="/refresh")
    assert info(r)["layers"] == [] and not info(r)["undo"]
    bob.predict("a pink cross", 2, "none", api_name="/generate")
    assert names(alice.predict(api_name="/refresh")) == ["red star", "blue ring"]


def test_conditioned_generation_and_layout(client):
    with pytest.raises(AppError, match="nothing to condition on"):
        client.predict("a star", 0, "background", api_name="/generate")
    r = client.predict("a heart", 0, "none", api_name="/generate")
    r = client.predict("a sky", 1, "foreground", api_name="/generate")  # a background behind the heart
    assert [l["kind"] for l in info(r)["layers"]] == ["background", "instance"]
    assert names(r) == ["horizon with a blue sky and teal ground", "purple heart"]
    r = client.predict("a star", 2, "background", api_name="/generate")  # a foreground on the current image
    assert info(r)["layers"][2]["kind"] == "instance" and len(names(r)) == 3

    rows = [[10, 10, 100, 100, "a yellow circle"], [120, 30, 240, 200, ""], [None, None, None, None, ""]]
    r = client.predict("a purple triangle", table(rows), 5, False, api_name="/generate_layout")
    layers = info(r)["layers"][3:]
    assert len(layers) == 2 and [l["prompt"] for l in layers] == ["a yellow circle", "a purple triangle"]
    for l, (x0, y0, x1, y1, _) in zip(layers, rows):
        assert x0 <= l["x"] and y0 <= l["y"] and l["x"] + l["width"] <= x1 and l["y"] + l["height"] <= y1
    r = client.predict(api_name="/undo")  # the whole layout is one undo step
    assert len(info(r)["layers"]) == 3
    # a layout with a background on a document that has layers: the background goes under them, one undo step
    r = client.predict("a red star on a sky", table([[10, 10, 90, 90, ""]]), 6, True, api_name="/generate_layout")
    kinds = [l["kind"] for l in info(r)["layers"]]
    assert kinds[:1] == ["background"] and kinds[-1] == "instance" and len(kinds) == 5
    assert names(r)[1:3] == ["horizon with a blue sky and teal ground", "purple heart"]  # still in order above it
    assert len(info(client.predict(api_name="/undo"))["layers"]) == 3
    with pytest.raises(AppError, match="row 1"):
        client.predict("x", table([[0, 0, 999, 10, ""]]), 0, False, api_name="/generate_layout")


def test_decompose_upload(client, tmp_path):
    scene = make_scene(21, 128)
    path = tmp_path / "flat.png"
    Image.fromarray(scene.composite).save(path)
    rows = [list(o.box) + [f"object {k}"] for k, o in enumerate(scene.objects)]
    r = client.predict(handle_file(str(path)), table(rows), api_name="/decompose")
    doc = info(r)
    assert (doc["width"], doc["height"]) == (128, 128) and len(doc["layers"]) == 1 + len(rows)
    stack = formats.load(client.predict(ZIP, api_name="/export"))
    assert np.array_equal(stack.composite()[..., :3], scene.composite)
    r = client.predict(api_name="/undo")
    assert info(r)["layers"] == [] and info(r)["width"] == 256
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:400])  # a PNG cut short: decoded by layergen, named in the message
    with pytest.raises(AppError, match="cut.png: cannot decode image"):
        client.predict(handle_file(str(cut)), table([]), api_name="/decompose")
    garbage = tmp_path / "garbage.png"  # Pillow cannot even open it: Gradio's own preprocessing used to fail first
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(AppError, match="garbage.png: not a PNG image|garbage.png: cannot decode image"):
        client.predict(handle_file(str(garbage)), table([]), api_name="/decompose")
    for side, message in ((12000, "canvas must be between 32 and 2048 pixels per side, got 12000x12000"),
                          (20000, "huge.png: canvas must be at most 2048 pixels per side")):
        huge = tmp_path / "huge.png"
        huge.write_bytes(png_header(side, side))  # refused from the header: nothing is decoded
        for endpoint, args in (("/decompose", (table([]),)), ("/import_file", ())):
            with pytest.raises(AppError, match=message):
                client.predict(handle_file(str(huge)), *args, api_name=endpoint)


def test_import_and_file_validation(client, tmp_path):
    scene = make_scene(4, 96)
    path = formats.save(scene.to_stack(), tmp_path / "scene.ora")
    r = client.predict(handle_file(str(path)), api_name="/import_file")
    assert names(r) == scene.to_stack().names() and info(r)["width"] == 96
    assert "Notes" not in val(r[STATUS])

    import io
    import zipfile

    krita = tmp_path / "krita.ora"  # a faded group of two layers: flattening cannot keep how they overlap
    px = io.BytesIO()
    Image.new("RGBA", (32, 32), (255, 0, 0, 255)).save(px, format="PNG")
    with zipfile.ZipFile(krita, "w") as zf:
        zf.writestr("mimetype", "image/openraster")
        zf.writestr("stack.xml", '<image w="32" h="32"><stack><stack name="g" opacity="0.5">'
                                 '<layer name="a" src="a.png"/><layer name="b" src="a.png"/></stack></stack></image>')
        zf.writestr("a.png", px.getvalue())
    r = client.predict(handle_file(str(krita)), api_name="/import_file")
    assert "Notes: group 'g': its opacity is applied to each of its layers" in val(r[STATUS])
    path = formats.save(scene.to_stack(), tmp_path / "scene.ora")
    client.predict(handle_file(str(path)), api_name="/import_file")

    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(AppError, match="(?i)invalid file type|unsupported file type"):
        client.predict(handle_file(str(txt)), api_name="/import_file")
    fake = tmp_path / "fake.psd"
    fake.write_bytes(b"this is not a psd file")
    with pytest.raises(AppError, match="^fake.psd: not a PSD file") as exc:  # not the server's upload path
        client.predict(handle_file(str(fake)), api_name="/import_file")
    assert "/" not in str(exc.value).split(":")[0]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (5 * 2**20))  # over the 4 MB limit the test server was launched with
    with pytest.raises(Exception):
        client.predict(handle_file(str(big)), api_name="/import_file")
    assert names(client.predict(api_name="/refresh")) == scene.to_stack().names()  # nothing changed


USER_ERRORS = [  # (inputs..., endpoint, text the message must contain)
    ("", 0, "none", "/generate", "type a prompt"),
    ("a star", -3, "none", "/generate", "minimum"),  # Gradio checks a Number's range itself
    ("x" * 600, 0, "none", "/generate", "limit"),
    ("a star", 1, "/repaint", "no layers yet"),
    ("/move_up", "no layers yet"),
    ("/undo", "nothing to undo"),
    (PSD, "/export", "empty"),
    ("Nope", "/export", "Nope"),
    (3000, 10, "/new_document", "maximum"),
]


def test_user_errors_are_one_line_messages(client):
    for *args, api, match in USER_ERRORS:
        with pytest.raises((AppError, ValueError)) as err:
            client.predict(*args, api_name=api)
        text = str(err.value)
        assert match in text and "Traceback" not in text, (api, text)
    assert info(client.predict(api_name="/refresh"))["layers"] == []


def test_an_edit_during_a_generation_is_refused_not_applied_to_the_new_layer(tmp_path, monkeypatch):
    """Queued behind a generation, an opacity change would wait and then land on the layer the generation
    selected: it is refused instead, naming what runs, and the document is unchanged by it."""
    import threading

    from gradio_client import Client

    from layergen.studio.app import launch
    from layergen.studio.backends import ProceduralBackend

    started, release = threading.Event(), threading.Event()

    class SlowBackend(ProceduralBackend):
        def generate_layer(self, *args, **kwargs):
            if kwargs.get("condition") is None and args[0] == "a blue ring":
                started.set()
                release.wait(30)
            return super().generate_layer(*args, **kwargs)

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    demo, url = launch(SlowBackend(), prevent_thread_lock=True, quiet=True, extra_tabs=[])
    try:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        client.predict("a red star", 0, "none", api_name="/generate")
        job = client.submit("a blue ring", 1, "none", api_name="/generate")
        assert started.wait(30)
        with pytest.raises(AppError, match=r"busy \(generating a layer\): nothing was changed"):
            client.predict(40, api_name="/set_opacity")
        release.set()
        r = job.result(timeout=60)
        assert names(r) == ["red star", "blue ring"]
        assert [l["opacity"] for l in info(r)["layers"]] == [1.0, 1.0]
        r = client.predict(40, api_name="/set_opacity")  # once it has finished, edits work again
        assert [l["opacity"] for l in info(r)["layers"]] == [1.0, pytest.approx(0.4)]
    finally:
        release.set()
        demo.close()
