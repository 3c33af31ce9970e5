"""The Kconfig framework's front door: Kconfig tree + .config -> gpt2.settings.Settings.

Modules (each with one job): paths (where inputs live), kconfig (read and load a .config strictly),
environment (GPT2_* overrides), load (typed settings and cross-field limits; the only reader of .config),
presets (defconfigs/), cells (overrides: a matrix cell's config, make set), edit (set, olddefconfig,
savedefconfig, alldefconfig, listnewconfig), oldconfig (its questions), menu (menuconfig with validated
saves), steps (the ablation steps). The names below are the package's interface; callers outside lib/config
use them rather than the modules (scripts/config.py also calls edit and menu, the commands themselves).
"""

from lib.config.cells import write_cell_config
from lib.config.environment import ENV_OVERRIDES
from lib.config.kconfig import ConfigError, load_kconfig, load_strict, parse_assignments, symbols_at_default
from lib.config.load import configured_results_dir, load_settings, settings_from_kconfig, \
    write_config_atomically, write_effective_config
from lib.config.paths import KCONFIG_PATH, REPO_ROOT, preset_names, results_dir
from lib.config.presets import apply_defconfig, preset_description, preset_of, preset_path

__all__ = ["ConfigError", "ENV_OVERRIDES", "KCONFIG_PATH", "REPO_ROOT", "apply_defconfig", "configured_results_dir",
           "load_kconfig", "load_settings", "load_strict", "parse_assignments", "preset_description", "preset_names",
           "preset_of", "preset_path", "results_dir", "settings_from_kconfig", "symbols_at_default",
           "write_cell_config", "write_config_atomically", "write_effective_config"]
