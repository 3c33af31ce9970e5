"""Presets: defconfigs/<name> expanded into a .config, and the preset name a .config was made from."""

from pathlib import Path

from lib.config.kconfig import ConfigError, load_strict
from lib.config.load import write_config_atomically
from lib.config.paths import DEFCONFIG_DIR, REPO_ROOT, preset_names

PRESET_MARKER = "preset:"


def preset_path(name) -> Path:
    path = DEFCONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r} in {DEFCONFIG_DIR.relative_to(REPO_ROOT)}/; "
                          f"available: {', '.join(preset_names())}")
    return path


def preset_description(name) -> str:
    """The preset's first comment line (what it is for and how long it runs)."""
    for line in preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def apply_defconfig(defconfig_path, out_path=".config") -> None:
    """`make defconfig-NAME`: expand a minimal defconfig to a full .config."""
    kconf = load_strict(defconfig_path)
    header = f"# {PRESET_MARKER} {Path(defconfig_path).name}\n# Generated from a preset; edit with make menuconfig\n"
    write_config_atomically(kconf, out_path, header=header)


def preset_of(config_path) -> str:
    """The preset a .config was made from (the marker `defconfig` writes), or ''."""
    for line in Path(config_path).read_text().splitlines()[:5]:
        if line.startswith(f"# {PRESET_MARKER} "):
            return line.split(maxsplit=2)[2].strip()
    return ""
