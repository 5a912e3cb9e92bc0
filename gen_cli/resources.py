"""Where gen finds its shipped files (presets, default model) and where it writes its own."""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def models_dir() -> Path:
    """The shipped `models/` folder: inside the installed wheel, or at the checkout's root."""
    packaged = _PACKAGE_DIR / "models"
    return packaged if packaged.is_dir() else _PACKAGE_DIR.parent / "models"


def default_model_dir() -> Path:
    """The shipped default model, in the model-directory format."""
    return models_dir() / "default"


def work_dir() -> Path:
    """gen's project-local folder for outputs and caches: `./.gen`, or `$GEN_HOME` when set."""
    return Path(os.environ.get("GEN_HOME", ".gen"))


def cache_dir() -> Path:
    """Reusable derived data (extracted corpora, token files)."""
    return work_dir() / "cache"
