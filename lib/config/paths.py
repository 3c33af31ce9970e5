"""Where the framework's inputs live: the Kconfig tree, the presets, the results directory."""

from pathlib import Path

from gpt2.io import REPO_ROOT

KCONFIG_PATH = REPO_ROOT / "Kconfig"
DEFCONFIG_DIR = REPO_ROOT / "defconfigs"
DEFAULT_PRESET = "cpu-default"  # what `make defconfig` and a missing .config load


def preset_names() -> list:
    return sorted(p.name for p in DEFCONFIG_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


def results_dir(general) -> Path:
    """GeneralSettings.results_dir as an absolute path (relative paths are from the repository root)."""
    path = Path(general.results_dir)
    return path if path.is_absolute() else REPO_ROOT / path
