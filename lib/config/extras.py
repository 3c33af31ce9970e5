"""Optional packages a configuration needs beyond requirements.txt: one pinned file per extra under extras/.

The default install stays small; `make` installs an extra the first time a .config selects what needs it
(scripts/extras.py), so choosing wandb in menuconfig and typing `make` just works.
"""

import importlib.util
from pathlib import Path

from gpt2.io import REPO_ROOT

EXTRAS_DIR = REPO_ROOT / "extras"

# tracker choice -> (the module it imports, its requirements file)
TRACKER_EXTRAS = {
    "tensorboard": ("tensorboard", EXTRAS_DIR / "tensorboard.txt"),
    "wandb": ("wandb", EXTRAS_DIR / "wandb.txt"),
    "trackio": ("trackio", EXTRAS_DIR / "trackio.txt"),
}


def needed_extras(settings) -> list:
    """Requirement files of the extras `settings` need that are not importable yet."""
    entry = TRACKER_EXTRAS.get(settings.tracking.backend)
    if entry is None:
        return []
    module, requirements = entry
    return [] if importlib.util.find_spec(module) is not None else [Path(requirements)]


def all_extras() -> list:
    """Every extra's requirements file (the test suite exercises each)."""
    return sorted(EXTRAS_DIR.glob("*.txt"))
