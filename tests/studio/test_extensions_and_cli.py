"""Extension tabs (3D humans, actions plug in here), the `layergen studio` command and `apps/studio.py`."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from layergen.cli import main
from layergen.layers import Layer
from layergen.studio import Document, ProceduralBackend

REPO = Path(__file__).resolve().parents[2]


def test_extra_tabs_get_the_document_and_panel():
    import gradio as gr

    from layergen.studio.app import build_app

    made = {}

    def builder(ctx):
        button = gr.Button("Add a test layer")

        def add(doc, size):
            doc.add_layer(Layer(np.full((int(size), int(size), 4), 255, np.uint8), name="from tab"), label="Tab")

        made["ctx"], made["button"] = ctx, button
        made["handler"] = ctx.action(add)
        button.click(made["handler"], [ctx.doc, gr.Number(value=4, visible=False)], ctx.outputs)

    demo = build_app(ProceduralBackend(), extra_tabs=[("3D human", builder)])
    parent = made["button"].parent
    while parent is not None and not isinstance(parent, gr.Tab):
        parent = parent.parent
    assert parent is not None and parent.label == "3D human"

    ctx = made["ctx"]
    out = made["handler"](Document(), 4)
    assert len(out) == len(ctx.outputs) and ctx.outputs[0] is ctx.doc
    assert out[0].stack.names() == ["from tab"] and out[0].undo_label == "Tab"
    with pytest.raises(gr.Error, match="nothing to undo"):  # user errors become Gradio errors
        ctx.action(lambda d: d.undo())(Document())
    demo.close()


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["studio", "--port", "0"]) == 2
    assert main(["studio", "--procedural", "--model", str(tmp_path)]) == 2
    assert main(["studio", "--model", str(tmp_path / "missing")]) == 2
    assert "cannot load the layer model" in capsys.readouterr().err


def test_apps_studio_serves_the_app(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "apps" / "studio.py"), "--procedural", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "running on" in line:
                break
        assert any(f"running on http://127.0.0.1:{port}" in l for l in lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            html = page.read().decode()
        assert page.status == 200 and "layergen studio" in html
    finally:
        proc.terminate()
        proc.wait(timeout=30)
