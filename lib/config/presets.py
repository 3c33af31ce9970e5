"""Presets: defconfigs/<name> expanded into a .config, and the preset name a .config was made from.

A .config made from a preset starts with the header `# preset: <name>`; the run directory and the report take
the name from it, so every command that rewrites .config (olddefconfig, menuconfig) writes the header back.
"""

import re
from pathlib import Path

from lib.config.kconfig import ConfigError, load_kconfig, load_strict, read_config_lines
from lib.config.load import settings_from_kconfig, write_config_atomically
from lib.config.paths import DEFCONFIG_DIR, REPO_ROOT, preset_names

PRESET_MARKER = "preset:"
# A preset is a file directly in defconfigs/: a name, never a path (it also names run directories).
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_preset_name(name) -> bool:
    return bool(PRESET_NAME.fullmatch(name)) and ".." not in name


def preset_path(name) -> Path:
    where = f"{DEFCONFIG_DIR.relative_to(REPO_ROOT)}/"
    if not is_preset_name(name):
        raise ConfigError(f"{name!r} is not a preset name (a file in {where}, not a path); "
                          f"available: {', '.join(preset_names())}")
    path = DEFCONFIG_DIR / name
    if not path.is_file():
        raise ConfigError(f"no preset named {name!r} in {where}; available: {', '.join(preset_names())}")
    return path


def preset_description(name) -> str:
    """The preset's first comment line (what it is for and how long it runs)."""
    for line in read_config_lines(preset_path(name)):
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def preset_header(name) -> str:
    return f"# {PRESET_MARKER} {name}\n# Generated from a preset; edit with make menuconfig\n"


def apply_defconfig(defconfig_path, out_path=".config") -> None:
    """`make defconfig-NAME`: expand a minimal defconfig to a full .config."""
    kconf = load_strict(defconfig_path)
    settings_from_kconfig(kconf, defconfig_path)  # cross-field errors named at the defconfig's own lines
    write_config_atomically(kconf, out_path, header=preset_header(Path(defconfig_path).name))


def preset_of(config_path) -> str:
    """The preset a .config was made from (the marker `defconfig` writes), or ''; a marker that is not a
    preset name (`# preset: ../../x`) is an error, since the name becomes a directory under results/."""
    prefix = f"# {PRESET_MARKER}"
    for line in read_config_lines(config_path)[:5]:
        if line.startswith(prefix):
            name = line[len(prefix):].strip()
            if not is_preset_name(name):
                raise ConfigError(f"{config_path}: '{line.strip()}' names {name!r}, which is not a preset name "
                                  f"(letters, digits, '.', '_', '-'; no '/' or '..'); fix the line or run "
                                  f"make defconfig-<preset>")
            return name
    return ""


def header_of(config_path):
    """The preset header to write back when config_path is rewritten; None when it has none (or no file)."""
    name = preset_of(config_path) if Path(config_path).is_file() else ""
    return preset_header(name) if name else None


def rewrite_keeping_preset(kconf, config_path) -> None:
    """Write kconf over config_path (validated, atomic), keeping the preset header of the file it replaces."""
    write_config_atomically(kconf, config_path, header=header_of(config_path))


def kconfig_keeping_preset(config_path, kconfig_class=None):
    """The Kconfig tree, set so that its own saves (menuconfig's) keep config_path's preset header."""
    kconf = load_kconfig() if kconfig_class is None else load_kconfig(kconfig_class=kconfig_class)
    header = header_of(config_path)
    if header is not None:
        kconf.config_header = header  # what kconfiglib's write_config() writes when given no header
    return kconf
