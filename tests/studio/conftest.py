"""A studio served once per test session on the procedural backend (no weights, no network)."""
import contextlib
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def studio(tmp_path_factory):
    """(demo, url) of a launched studio; Gradio's cache lives in a temp dir; closed at the end."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from layergen.studio.app import launch
    from layergen.studio.backends import ProceduralBackend

    demo, url = launch(ProceduralBackend(), host="127.0.0.1", prevent_thread_lock=True, quiet=True,
                       max_upload_bytes=4 * 2**20)
    try:
        yield demo, url
    finally:
        demo.close()
        mp.undo()


@pytest.fixture
def client(studio, tmp_path):
    """A fresh browser-like session (its own Document)."""
    from gradio_client import Client

    return Client(studio[1], verbose=False, download_files=str(tmp_path))



@contextlib.contextmanager
def _serve_tab(tmp_path_factory, tab, name: str):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp(f"gradio-{name}")))
    mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from layergen.studio.app import launch
    from layergen.studio.backends import ProceduralBackend

    demo, url = launch(ProceduralBackend(), prevent_thread_lock=True, quiet=True, extra_tabs=[tab])
    try:
        yield Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    finally:
        demo.close()
        mp.undo()


@pytest.fixture(scope="session")
def serve_tab():
    """`with serve_tab(tmp_path_factory, tab, name) as client:` a studio with one extra tab on the procedural
    backend, and an API client."""
    return _serve_tab
