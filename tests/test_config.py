"""The configuration spine: real kconfiglib over the real Kconfig tree and presets."""

import dataclasses
import os
import re
import subprocess
import sys

import kconfiglib
import pytest

from lib import config as cfg
from gpt2.settings import Settings
from lib.config.steps import load_steps


def write(tmp_path, text, name="defconfig"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_field_kind_maps_to_its_python_type(make_config):
    settings = cfg.load_settings(make_config({
        "ATTN_BACKEND_RA_SAME_FLOP": "y", "ATTN_RA_RANK": "5", "ATTN_W_REC_INIT": "0.25",
        "ATTN_SELF_RESTART": "y", "MATRIX": "y", "MATRIX_SEEDS": "1, 2,3", "MATRIX_STEPS": "V0,V1",
        "RESULTS_DIR": "somewhere",
    }, tiny=False), environ={})
    assert settings.attention.backend == "ra-same-flop"            # choice -> suffix
    assert settings.attention.reciprocal_rank == 5                 # int
    assert settings.attention.w_rec_init == 0.25                   # float string
    assert settings.attention.self_restart is True                 # bool
    assert settings.model.bias is True
    assert settings.general.results_dir == "somewhere"             # string
    assert settings.matrix.seeds == ("1", "2", "3")                # list
    assert settings.model.size == "gpt2-tiny"
    assert (settings.model.n_layer, settings.model.n_head, settings.model.n_embd) == (2, 2, 64)
    assert settings.data.token_cap == 0                            # int whose dependency is off
    assert settings.optimizer.spam_theta == 0.0                    # float whose dependency is off
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.attention.reciprocal_rank = 3


def test_sizes_follow_the_size_choice(make_config):
    big = cfg.load_settings(make_config({"MODEL_SIZE_GPT2_1558M": "y"}), environ={})
    assert (big.model.n_layer, big.model.n_head, big.model.n_embd) == (48, 25, 1600)
    custom = cfg.load_settings(make_config({"MODEL_SIZE_CUSTOM": "y", "MODEL_N_LAYER": "3", "MODEL_N_HEAD": "4",
                                            "MODEL_N_EMBD": "96"}), environ={})
    assert (custom.model.n_layer, custom.model.n_head, custom.model.n_embd) == (3, 4, 96)


@pytest.mark.parametrize("preset", cfg.preset_names())
def test_preset_loads_cleanly_and_round_trips_through_savedefconfig(preset, tmp_path):
    first = tmp_path / "first"
    cfg.apply_defconfig(cfg.preset_path(preset), first)
    kconf = cfg.load_kconfig()
    kconf.load_config(str(first))
    assert kconf.warnings == []                                      # olddefconfig-clean
    minimal = tmp_path / "defconfig"
    kconf.write_min_config(str(minimal))
    preset_lines = {a.symbol: a.value for a in cfg.parse_assignments(cfg.preset_path(preset))}
    minimal_lines = {a.symbol: a.value for a in cfg.parse_assignments(minimal)}
    assert minimal_lines == preset_lines                             # presets are minimal defconfigs
    second = tmp_path / "second"
    cfg.apply_defconfig(minimal, second)
    strip = lambda p: [l for l in p.read_text().splitlines() if not l.startswith("# preset:")]  # noqa: E731
    assert strip(first) == strip(second)
    assert cfg.preset_description(preset)                            # `make help` shows it
    assert isinstance(cfg.load_settings(first, environ={}), Settings)


def test_unknown_symbol_is_named_with_file_and_line(tmp_path):
    path = write(tmp_path, "CONFIG_MODEL_SIZE_GPT2_TINY=y\nCONFIG_ATTN_RA_RANKK=4\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:2: unknown symbol CONFIG_ATTN_RA_RANKK"):
        cfg.load_settings(path, environ={})


def test_out_of_range_int_is_refused_with_the_range(tmp_path):
    path = write(tmp_path, "CONFIG_MODEL_BLOCK_SIZE=4\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:1: CONFIG_MODEL_BLOCK_SIZE=4 .*8\.\.131072"):
        cfg.load_settings(path, environ={})


def test_cuda_graphs_with_gradient_accumulation_is_refused_at_its_line(tmp_path):
    path = write(tmp_path, "CONFIG_TORCH_COMPILE=y\nCONFIG_TORCH_COMPILE_CUDA_GRAPHS=y\nCONFIG_TRAIN_GRAD_ACCUM=2\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:2: CONFIG_TORCH_COMPILE_CUDA_GRAPHS=y needs one GPU and no "
                                              r"gradient accumulation .*CONFIG_TRAIN_GRAD_ACCUM=2"):
        cfg.load_settings(path, environ={})
    ok = write(tmp_path, "CONFIG_TORCH_COMPILE=y\nCONFIG_TORCH_COMPILE_CUDA_GRAPHS=y\n")
    assert cfg.load_settings(ok, environ={}).general.cuda_graphs


def test_non_integer_int_is_refused(tmp_path):
    path = write(tmp_path, "CONFIG_SEED=one\n")
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_SEED='one' is not an integer"):
        cfg.load_settings(path, environ={})


def test_malformed_float_string_is_refused(tmp_path):
    path = write(tmp_path, 'CONFIG_TRAIN_LR="6e-4x"\n')
    with pytest.raises(cfg.ConfigError, match=r"defconfig:1: CONFIG_TRAIN_LR=\"6e-4x\" is not a number"):
        cfg.load_settings(path, environ={})


def test_float_outside_its_bounds_is_refused(tmp_path):
    path = write(tmp_path, 'CONFIG_MODEL_DROPOUT="1.5"\n')
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_MODEL_DROPOUT=1.5 is outside 0.0..0.9"):
        cfg.load_settings(path, environ={})


def test_two_members_of_one_choice_are_refused(tmp_path):
    path = write(tmp_path, "CONFIG_ATTN_BACKEND_RA_UNIFIED=y\nCONFIG_ATTN_BACKEND_RA_FOLD_FULL=y\n")
    with pytest.raises(cfg.ConfigError, match=r"two members of one choice.*RA_UNIFIED \(.*:1\).*FOLD_FULL \(.*:2\)"):
        cfg.load_settings(path, environ={})


def test_option_whose_dependency_is_off_is_refused(tmp_path):
    path = write(tmp_path, "CONFIG_ATTN_RA_RANK=4\n")
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_ATTN_RA_RANK=4 does not take.*depends on"):
        cfg.load_settings(path, environ={})


def test_reciprocal_rank_must_fit_the_head_dimension(tmp_path):
    path = write(tmp_path, "CONFIG_MODEL_SIZE_GPT2_TINY=y\nCONFIG_ATTN_BACKEND_RA_UNIFIED=y\nCONFIG_ATTN_RA_RANK=40\n"
                           "CONFIG_ATTN_RA_FORM_UNTIED=y\n")
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_ATTN_RA_RANK=40 is outside 1\.\.31 \(head dim 32"):
        cfg.load_settings(path, environ={})
    # the tied form (the default) reads R dims from the D - R standard ones: R <= D / 2
    path = write(tmp_path, "CONFIG_MODEL_SIZE_GPT2_TINY=y\nCONFIG_ATTN_BACKEND_RA_UNIFIED=y\nCONFIG_ATTN_RA_RANK=17\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:3: CONFIG_ATTN_RA_RANK=17 is outside 1\.\.16 \(head dim 32; "
                                              r"tied ra-unified"):
        cfg.load_settings(path, environ={})


def test_width_must_split_into_the_heads(tmp_path):
    path = write(tmp_path, "CONFIG_MODEL_SIZE_CUSTOM=y\nCONFIG_MODEL_N_HEAD=3\nCONFIG_MODEL_N_EMBD=100\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:3: CONFIG_MODEL_N_EMBD=100 is not divisible by "
                                              r"CONFIG_MODEL_N_HEAD=3"):
        cfg.load_settings(path, environ={})


def test_reciprocal_mlp_units_must_leave_standard_ones(tmp_path):
    path = write(tmp_path, "CONFIG_MODEL_SIZE_GPT2_TINY=y\nCONFIG_MLP_RECIPROCAL=y\nCONFIG_MLP_RA_RFF=256\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:3: CONFIG_MLP_RA_RFF=256 is outside 1\.\.255"):
        cfg.load_settings(path, environ={})


def test_a_run_without_any_budget_is_refused(tmp_path):
    path = write(tmp_path, "CONFIG_GPT2_MAX_TIME=0\nCONFIG_TRAIN_MAX_ITERS=0\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig: no budget: .* both 0, so the run would never stop"):
        cfg.load_settings(path, environ={})


def test_environment_overrides_are_validated(make_config):
    path = make_config()
    assert cfg.load_settings(path, environ={"GPT2_MAX_TIME": "123"}).train.max_time_s == 123
    with pytest.raises(cfg.ConfigError, match=r"GPT2_MAX_TIME='ten' is not a non-negative integer"):
        cfg.load_settings(path, environ={"GPT2_MAX_TIME": "ten"})
    with pytest.raises(cfg.ConfigError, match=r"GPT2_SEED=99999999999 does not take"):
        cfg.load_settings(path, environ={"GPT2_SEED": "99999999999"})


def test_missing_config_file_names_the_presets(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"no such configuration file.*cpu-default"):
        cfg.load_settings(tmp_path / "nothing", environ={})


def test_every_ablation_step_is_a_valid_override_on_the_tiny_and_124m_presets(make_config, tmp_path):
    for preset in ("cpu-default", "gpt2-unified-ra-ablation"):
        base = make_config(preset=preset, tiny=False, name=f"base-{preset}")
        for step in load_steps().values():
            out = tmp_path / f"{preset}-{step.id}"
            cfg.write_cell_config(base, step.overrides, out)
            cfg.load_settings(out, environ={})
            kconf = cfg.load_strict(out)
            for symbol, value in step.own.items():
                assert kconf.syms[symbol].str_value == value, (step.id, symbol)


def test_cell_override_that_does_not_take_names_the_symbol(make_config, tmp_path):
    base = make_config()
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_NOT_A_SYMBOL=1: unknown symbol"):
        cfg.write_cell_config(base, {"NOT_A_SYMBOL": "1"}, tmp_path / "cell")
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_TRAIN_BATCH_SIZE=0 does not take"):
        cfg.write_cell_config(base, {"TRAIN_BATCH_SIZE": "0"}, tmp_path / "cell")
    assert not (tmp_path / "cell").exists()


def run_make(repo, *targets, env=None):
    return subprocess.run(["make", "-s", "-C", str(repo), *targets], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_make_defconfig_and_bad_presets_leave_config_untouched(repo_copy):
    assert run_make(repo_copy, "defconfig-cpu-tiny-run").returncode == 0
    good = (repo_copy / ".config").read_text()
    missing = run_make(repo_copy, "defconfig-no-such-preset")
    assert missing.returncode != 0 and "no preset named 'no-such-preset'" in missing.stderr
    (repo_copy / "defconfigs" / "typo").write_text("# broken preset\nCONFIG_ATTN_BACKEND_RA_UNIFED=y\n")
    typo = run_make(repo_copy, "defconfig-typo")
    assert typo.returncode != 0 and "unknown symbol CONFIG_ATTN_BACKEND_RA_UNIFED" in typo.stderr
    (repo_copy / "defconfigs" / "half").write_text("# half\nCONFIG_SEED=7\nCONFIG_TRAIN_LR=\"fast\"\n")
    half = run_make(repo_copy, "defconfig-half")
    assert half.returncode != 0 and "CONFIG_TRAIN_LR" in half.stderr
    assert (repo_copy / ".config").read_text() == good               # nothing half-applied
    assert not [p for p in repo_copy.iterdir() if p.name.startswith(".config.")]  # no temp files left


def test_make_savedefconfig_olddefconfig_listnewconfig_and_help(repo_copy):
    assert run_make(repo_copy, "defconfig-shakespeare-gpu").returncode == 0
    assert run_make(repo_copy, "savedefconfig").returncode == 0
    saved = {a.symbol: a.value for a in cfg.parse_assignments(repo_copy / "defconfig")}
    assert saved == {a.symbol: a.value for a in cfg.parse_assignments(cfg.preset_path("shakespeare-gpu"))}
    # A hand-edited .config missing an option: listnewconfig names it, olddefconfig fills it in.
    config = repo_copy / ".config"
    config.write_text("\n".join(l for l in config.read_text().splitlines() if "CONFIG_SEED=" not in l) + "\n")
    new = run_make(repo_copy, "listnewconfig")
    assert new.returncode == 0 and new.stdout.strip() == "CONFIG_SEED=1"
    assert run_make(repo_copy, "olddefconfig").returncode == 0
    assert "CONFIG_SEED=1" in config.read_text()
    helptext = run_make(repo_copy, "help").stdout
    assert "defconfig-<preset>" in helptext and "GPT2_MAX_TIME" in helptext
    assert cfg.preset_description("gpt2-unified-ra-ablation") in helptext
    bad_env = run_make(repo_copy, "showconfig", env={"GPT2_MAX_TIME": "soon"})
    assert bad_env.returncode != 0 and "GPT2_MAX_TIME='soon'" in bad_env.stderr


def test_every_kconfig_option_has_a_prompt_default_and_help():
    kconf = cfg.load_kconfig()
    for sym in kconf.unique_defined_syms:
        assert any(node.help for node in sym.nodes), f"CONFIG_{sym.name} has no help text"
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and any(n.prompt for n in sym.nodes):
            assert sym.ranges, f"CONFIG_{sym.name} has no range"
    for choice in kconf.choices:
        assert any(node.help for node in choice.nodes)


def test_every_settings_field_reads_an_existing_symbol():
    kconf = cfg.load_kconfig()
    from gpt2.settings import component_classes
    for _, cls in component_classes():
        for field in dataclasses.fields(cls):
            symbol = field.metadata["symbol"]
            if field.metadata["kind"] == "choice":
                assert any(s.startswith(symbol + "_") for s in kconf.syms), symbol
            else:
                assert symbol in kconf.syms and kconf.syms[symbol].nodes, symbol


def test_config_cli_reports_errors_with_exit_code(tmp_path):
    path = write(tmp_path, "CONFIG_NOPE=y\n")
    result = subprocess.run([sys.executable, "-m", "scripts.config", "--config", str(path), "show"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown symbol CONFIG_NOPE" in result.stderr


@pytest.mark.parametrize("value, message", [
    ("res\tults", r"CONFIG_RESULTS_DIR holds control character\(s\) '\\t'"),
    ("r" * 1100, r"CONFIG_RESULTS_DIR is 1100 characters long; at most 1024"),
    ("results/" + "x" * 300, r"CONFIG_RESULTS_DIR has a path component of 300 bytes; at most 255"),
])
def test_path_options_are_confined_at_load_time(tmp_path, value, message):
    """Paths from configuration that could only fail later (OSError) or make untypeable names are refused when
    the configuration loads, naming the symbol, the file and the line."""
    path = write(tmp_path, f'CONFIG_RESULTS_DIR="{value}"\n')
    before = path.read_bytes()
    with pytest.raises(cfg.ConfigError, match=r"defconfig:1: " + message):
        cfg.load_settings(path, environ={})
    assert path.read_bytes() == before


def test_misspelled_symbols_suggest_the_closest_names(tmp_path, make_config):
    """Wherever an unknown name is reported (a .config or defconfig line, a matrix override, a GPT2_*
    variable), the message offers the nearest real names."""
    path = write(tmp_path, "CONFIG_MODEL_SIZE_GPT2_TINY=y\nCONFIG_ATTN_RA_RANKK=4\n")
    with pytest.raises(cfg.ConfigError, match=r"defconfig:2: unknown symbol CONFIG_ATTN_RA_RANKK "
                                              r"\(did you mean CONFIG_ATTN_RA_RANK\?\)"):
        cfg.apply_defconfig(path, tmp_path / ".config")
    with pytest.raises(cfg.ConfigError, match=r"CONFIG_TRAIN_LR_MINN=0.1: unknown symbol \(did you mean "
                                              r"CONFIG_TRAIN_LR_MIN\b"):
        cfg.write_cell_config(make_config(), {"TRAIN_LR_MINN": "0.1"}, tmp_path / "cell")
    with pytest.raises(cfg.ConfigError, match=r"GPT2_MAX_TIEM \(did you mean GPT2_MAX_TIME\?\)"):
        cfg.load_settings(make_config(), environ={"GPT2_MAX_TIEM": "60"})
    with pytest.raises(cfg.ConfigError, match=r"unknown symbol CONFIG_NOPE; search the names with /"):
        cfg.load_settings(write(tmp_path, "CONFIG_NOPE=1\n"), environ={})


@pytest.mark.parametrize("content, message", [
    (b"CONFIG_SEED=1\nCONFIG_RESULTS_DIR=\"r\xe9sults\"\n", r":2: byte 0xe9 is not UTF-8 text"),
    (b"CONFIG_SEED=1\r\nCONFIG_TRAIN_LR=\"6e-4\x00\"\r\n", r":2: NUL byte"),
    (None, r": is a directory, not a configuration file"),
])
def test_unreadable_configs_are_one_line_errors_from_every_command(tmp_path, capsys, content, message):
    """Bytes that are not UTF-8, NUL bytes, and a .config that is a directory: one line naming the file (and
    line) from every configuration command, never a traceback; nothing is written."""
    from scripts import config as config_cli

    config = tmp_path / ".config"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    for command in (["show"], ["savedefconfig", "--out", str(tmp_path / "defconfig")], ["olddefconfig"],
                    ["oldconfig"], ["listnewconfig"], ["menuconfig"], ["set", "SEED=2"]):
        assert config_cli.main(["--config", str(config), *command]) == 2, command
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and re.search(re.escape(str(config)) + message, err), (command, err)
    if content is not None:
        assert config.read_bytes() == content
    assert not (tmp_path / "defconfig").exists()


@pytest.mark.parametrize("command", [["lib.runs.train", "--config", "{config}", "--run-dir", "{run}"],
                                     ["scripts.run", "--config", "{config}"],
                                     ["scripts.matrix", "check", "--config", "{config}"],
                                     ["scripts.prepare_data", "--config", "{config}"]])
def test_entry_points_refuse_a_config_that_is_not_utf8_in_one_line(tmp_path, command):
    """lib/config is the only reader of .config, so the training, matrix and data entry points refuse it the
    same way (one line, exit status 2)."""
    config = tmp_path / ".config"
    config.write_bytes(b"# preset: cpu-tiny-run\nCONFIG_SEED=\xff\n")
    args = [a.format(config=config, run=tmp_path / "run") for a in command]
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cfg.REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and ":2: byte 0xff is not UTF-8" in proc.stderr


def test_a_missing_or_broken_kconfig_tree_is_one_line(repo_copy):
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), repo_copy / ".config")
    (repo_copy / "Kconfig").rename(repo_copy / "Kconfig.away")
    for command in (["show"], ["defconfig"], ["olddefconfig"], ["listnewconfig"], ["set", "SEED=2"]):
        proc = subprocess.run([sys.executable, "-m", "scripts.config", *command], cwd=repo_copy,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Kconfig tree's top file is missing" in proc.stderr, (command, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1
    (repo_copy / "Kconfig.away").rename(repo_copy / "Kconfig")
    (repo_copy / "kconfig" / "general.Kconfig").write_bytes(b"config BROKEN\n\tbool \"\xff\"\n")
    proc = subprocess.run([sys.executable, "-m", "scripts.config", "show"], cwd=repo_copy, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Kconfig tree" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_symbols_at_default_names_only_values_kconfig_would_pick_itself(make_config):
    config = make_config({"TRAIN_LR": "6e-4", "SEED": "5", "ATTN_BACKEND_SDPA": "y"})  # Kconfig: 6e-4, 1, sdpa
    at_default = cfg.symbols_at_default(config, ["TRAIN_LR", "SEED", "ATTN_BACKEND_SDPA", "NO_SUCH_SYMBOL"])
    assert at_default == {"TRAIN_LR", "ATTN_BACKEND_SDPA"}
