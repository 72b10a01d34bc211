"""Fixtures for the training tests: tiny image folders made in the test (helpers in run_helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from run_helpers import make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Three classes, 16 train / 6 val images each."""
    return make_image_folder(tmp_path_factory.mktemp("rgb3"),
                             {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}, 16, 6)


@pytest.fixture(scope="session")
def image_folder_2cls(tmp_path_factory) -> Path:
    """Another task (two classes) for transfer learning."""
    return make_image_folder(tmp_path_factory.mktemp("rgb2"), {"dark": (40, 40, 40), "light": (220, 220, 220)},
                             12, 6, seed=1)
