"""The kconfig make targets as a user types them, run by a real `make` in a copy of the repository: set,
olddefconfig, oldconfig, savedefconfig, alldefconfig, <preset>_defconfig, and KCONFIG_CONFIG honoured by
every target (issue 16)."""

import os
import re
import subprocess

import pytest

from lib import config as cfg


def config_targets() -> list:
    """Every target of the Makefile whose recipe passes --config (a pattern rule by one of its presets)."""
    makefile = (cfg.REPO_ROOT / "Makefile").read_text()
    targets = []
    for target, recipe in re.findall(r"^([^\s:#=][^:=]*):(?!=)[^\n]*\n((?:\t[^\n]*\n)+)", makefile, flags=re.M):
        if "--config" in recipe and "$(" not in target:
            targets.append(target.replace("%", "cpu-tiny-run"))
    return targets


def test_the_makefile_names_the_configuration_only_through_kconfig_config():
    makefile = (cfg.REPO_ROOT / "Makefile").read_text()
    assert "--config .config" not in makefile and "\n.config:" not in makefile
    assert {"train", "showconfig", "set", "cpu-tiny-run_defconfig"} <= set(config_targets())


def make(repo, *args, env=None, stdin=None):
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("GPT2_") and k not in ("ARGS", "KCONFIG_CONFIG")}
    return subprocess.run(["make", "-s", "-C", str(repo), *args], capture_output=True, text=True, timeout=120,
                          env={**environ, **(env or {})}, input=stdin)


def values(path) -> dict:
    return {a.symbol: a.value for a in cfg.parse_assignments(path)}


def test_set_changes_options_validated_and_atomically(repo_copy):
    config = repo_copy / ".config"
    assert make(repo_copy, "defconfig-cpu-tiny-run").returncode == 0
    done = make(repo_copy, "set", 'ARGS=ATTN_BACKEND_RA_UNIFIED=y ATTN_RA_RANK=8 CONFIG_SEED=3 TRAIN_LR="1e-3"')
    assert done.returncode == 0, done.stderr
    after = values(config)
    assert (after["ATTN_BACKEND_RA_UNIFIED"], after["ATTN_RA_RANK"], after["SEED"], after["TRAIN_LR"]) == \
        ("y", "8", "3", "1e-3")
    assert cfg.preset_of(config) == "cpu-tiny-run"                  # the preset header is kept
    good = config.read_bytes()
    refusals = {
        "ARGS=ATTN_RA_RANKK=4": "unknown symbol (did you mean CONFIG_ATTN_RA_RANK?)",
        "ARGS=ATTN_RA_RANK=600": "CONFIG_ATTN_RA_RANK=600 does not take",
        "ARGS=ATTN_RA_RANK=40": "CONFIG_ATTN_RA_RANK=40 is outside 1..16",  # head dim 32, tied form
        "ARGS=SEED=3 TRAIN_LR=fast": "CONFIG_TRAIN_LR=\"fast\" is not a number",
        "ARGS=": "nothing to set",
        "SEED=4": "nothing to set",                                  # a make variable, not an option
    }
    for argument, message in refusals.items():
        refused = make(repo_copy, "set", argument)
        assert refused.returncode != 0 and message in refused.stderr, (argument, refused.stderr)
        assert len([l for l in refused.stderr.splitlines() if not l.startswith("make")]) == 1
        assert config.read_bytes() == good, argument
    ignored = make(repo_copy, "set", env={"ARGS": "SEED=5"})        # ARGS left in the environment
    assert ignored.returncode != 0 and config.read_bytes() == good
    assert not [p for p in repo_copy.iterdir() if p.name.startswith(".config.")]


def test_olddefconfig_says_what_it_changed(repo_copy):
    config = repo_copy / ".config"
    assert make(repo_copy, "defconfig-cpu-tiny-run").returncode == 0
    text = config.read_text().replace("CONFIG_MODEL_BLOCK_SIZE=64", "CONFIG_MODEL_BLOCK_SIZE=4")
    config.write_text(text.replace("# CONFIG_TORCH_COMPILE is not set", "CONFIG_TORCH_COMPILE=yes")
                      + "CONFIG_ATTN_RA_RANKK=4\n")
    result = make(repo_copy, "olddefconfig")
    assert result.returncode == 0, result.stderr
    notes = result.stderr.splitlines()
    assert any(re.search(r"\.config:\d+: CONFIG_MODEL_BLOCK_SIZE 4 -> 1024: allowed: an integer in 8\.\.", n)
               for n in notes), notes
    assert any("CONFIG_TORCH_COMPILE yes -> y" in n for n in notes), notes
    assert any("CONFIG_ATTN_RA_RANKK=4 dropped: unknown symbol (did you mean CONFIG_ATTN_RA_RANK?)" in n
               for n in notes), notes
    assert len(notes) == 3
    assert values(config)["MODEL_BLOCK_SIZE"] == "1024" and cfg.preset_of(config) == "cpu-tiny-run"
    # What kconfiglib cannot fix (a rank over the head dimension) is refused, naming the line; nothing written.
    config.write_text(config.read_text() + "CONFIG_ATTN_BACKEND_RA_UNIFIED=y\nCONFIG_ATTN_RA_RANK=40\n")
    before = config.read_bytes()
    refused = make(repo_copy, "olddefconfig")
    assert refused.returncode != 0 and re.search(r"\.config:\d+: CONFIG_ATTN_RA_RANK=40 is outside", refused.stderr)
    assert config.read_bytes() == before


def test_savedefconfig_refuses_a_malformed_float(repo_copy):
    """It wrote `CONFIG_TRAIN_LR="6e-4x"` to ./defconfig and exited 0; it validates .config like every command."""
    config = repo_copy / ".config"
    assert make(repo_copy, "defconfig-cpu-tiny-run").returncode == 0
    config.write_text(config.read_text().replace('CONFIG_TRAIN_LR="3e-3"', 'CONFIG_TRAIN_LR="6e-4x"'))
    result = make(repo_copy, "savedefconfig")
    assert result.returncode != 0
    assert re.search(r"\.config:\d+: CONFIG_TRAIN_LR=\"6e-4x\" is not a number", result.stderr), result.stderr
    assert not (repo_copy / "defconfig").exists()


def test_oldconfig_asks_for_each_new_option(repo_copy):
    config = repo_copy / ".config"
    assert make(repo_copy, "defconfig-cpu-tiny-run").returncode == 0
    config.write_text("".join(l for l in config.read_text().splitlines(keepends=True)
                              if not l.startswith(("CONFIG_SEED=", "CONFIG_TRAIN_LR="))))
    before = config.read_bytes()
    ended = make(repo_copy, "oldconfig", stdin="7\n")               # input ends before the second question
    assert ended.returncode != 0 and "nothing was written" in ended.stderr
    assert config.read_bytes() == before
    answered = make(repo_copy, "oldconfig", stdin="seven\n7\n?\n6e-4x\n\n")
    assert answered.returncode == 0, answered.stderr
    assert "(CONFIG_SEED) [1] (NEW)" in answered.stdout and "is not allowed" in answered.stdout
    assert "is not a number" in answered.stdout                     # the float was asked again
    after = values(config)
    assert (after["SEED"], after["TRAIN_LR"]) == ("7", "6e-4")      # an empty answer takes the default
    assert cfg.preset_of(config) == "cpu-tiny-run"


def test_alldefconfig_and_the_linux_spelling_of_presets(repo_copy):
    config = repo_copy / ".config"
    assert make(repo_copy, "alldefconfig").returncode == 0
    assert cfg.preset_of(config) == "" and cfg.load_settings(config, environ={})
    assert make(repo_copy, "shakespeare-gpu_defconfig").returncode == 0
    assert cfg.preset_of(config) == "shakespeare-gpu"
    missing = make(repo_copy, "no-such_defconfig")
    assert missing.returncode != 0 and "no preset named 'no-such'" in missing.stderr
    assert cfg.preset_of(config) == "shakespeare-gpu"


@pytest.mark.parametrize("target", config_targets())
def test_every_target_takes_its_configuration_from_kconfig_config(repo_copy, target):
    """`make -n` prints the recipe: every one names KCONFIG_CONFIG's file, and none falls back to .config."""
    dry = make(repo_copy, "-n", target, "KCONFIG_CONFIG=alt.config")
    assert dry.returncode == 0, dry.stderr
    assert "--config alt.config" in dry.stdout and "--config .config" not in dry.stdout, dry.stdout


def test_kconfig_config_is_honoured_for_real(repo_copy):
    alt = "KCONFIG_CONFIG=alt.config"
    shown = make(repo_copy, "showconfig", alt)                      # bootstraps alt.config, not .config
    assert shown.returncode == 0, shown.stderr
    assert (repo_copy / "alt.config").is_file() and not (repo_copy / ".config").exists()
    assert make(repo_copy, "cpu-tiny-run_defconfig", alt).returncode == 0
    assert make(repo_copy, "set", "ARGS=SEED=9", alt).returncode == 0
    assert values(repo_copy / "alt.config")["SEED"] == "9"
    assert "seed = 9" in make(repo_copy, "showconfig", alt).stdout
    assert make(repo_copy, "savedefconfig", alt).returncode == 0
    assert values(repo_copy / "defconfig")["SEED"] == "9"
    assert make(repo_copy, "olddefconfig", alt).returncode == 0
    environment = make(repo_copy, "showconfig", env={"KCONFIG_CONFIG": "alt.config"})  # from the environment too
    assert "seed = 9" in environment.stdout
    assert not (repo_copy / ".config").exists()
