import importlib.util
from pathlib import Path

import pytest


@pytest.fixture
def install_script():
    """scripts/install_mini_decomposer.py as a module (scripts/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "scripts" / "install_mini_decomposer.py"
    spec = importlib.util.spec_from_file_location("install_mini_decomposer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
