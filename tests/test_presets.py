"""Presets and the `# preset: <name>` header: it survives rewrites of .config, it is a name (never a path),
and `defconfig` with no name loads the default preset."""


import pytest

from lib import config as cfg
from lib.config import presets
from lib.config.paths import DEFAULT_PRESET
from scripts import config as config_cli


def test_olddefconfig_keeps_the_preset_after_a_hand_edit(tmp_path):
    config = tmp_path / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), config)
    text = config.read_text()
    assert "# CONFIG_TORCH_COMPILE is not set" in text
    config.write_text(text.replace("# CONFIG_TORCH_COMPILE is not set", "CONFIG_TORCH_COMPILE=y"))  # a hand edit
    assert config_cli.main(["--config", str(config), "olddefconfig"]) == 0
    assert cfg.preset_of(config) == "cpu-tiny-run"
    assert cfg.load_settings(config, environ={}).general.compile is True


def test_olddefconfig_of_a_config_without_preset_adds_none(tmp_path):
    config = tmp_path / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), config)
    config.write_text("\n".join(line for line in config.read_text().splitlines() if "preset:" not in line) + "\n")
    assert config_cli.main(["--config", str(config), "olddefconfig"]) == 0
    assert cfg.preset_of(config) == ""


@pytest.mark.parametrize("value", ["../../x", "a/b", "/tmp/x", "..", "a..b", ".hidden", ""])
def test_preset_header_must_be_a_name(tmp_path, value):
    config = tmp_path / ".config"
    config.write_text(f"# preset: {value}\nCONFIG_SEED=1\n")
    with pytest.raises(cfg.ConfigError) as error:
        cfg.preset_of(config)
    assert str(config) in str(error.value) and repr(value) in str(error.value)
    assert config_cli.main(["--config", str(config), "olddefconfig"]) == 2  # refused, not rewritten
    assert config.read_text().startswith(f"# preset: {value}\n")


def test_preset_header_names_pass(tmp_path):
    config = tmp_path / ".config"
    config.write_text("# preset: gpt2-unified_ra.v2\n")
    assert cfg.preset_of(config) == "gpt2-unified_ra.v2"


@pytest.mark.parametrize("name", ["../defconfigs/cpu-default", "./cpu-default", "cpu-default/.."])
def test_defconfig_takes_names_not_paths(tmp_path, capsys, name):
    with pytest.raises(cfg.ConfigError, match="not a preset name.*available: cpu-default"):
        cfg.preset_path(name)
    config = tmp_path / ".config"
    assert config_cli.main(["--config", str(config), "defconfig", name]) == 2
    assert not config.exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_defconfig_without_a_name_loads_the_default_preset(tmp_path):
    config = tmp_path / ".config"
    assert config_cli.main(["--config", str(config), "defconfig"]) == 0
    assert cfg.preset_of(config) == DEFAULT_PRESET


def test_default_preset_exists_and_the_makefile_leaves_the_choice_to_it():
    assert DEFAULT_PRESET in cfg.preset_names()
    assert "DEFAULT_PRESET" not in (cfg.REPO_ROOT / "Makefile").read_text()  # one source: lib/config/paths.py


def test_kconfig_keeping_preset_writes_the_header_on_its_own_saves(tmp_path):
    config = tmp_path / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), config)
    kconf = presets.kconfig_keeping_preset(config)
    kconf.load_config(str(config))
    kconf.write_config(str(config), save_old=False)  # as menuconfig saves
    assert cfg.preset_of(config) == "cpu-tiny-run"
