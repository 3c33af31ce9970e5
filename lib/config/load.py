"""The one reader of `.config`: a loaded Kconfig -> frozen gpt2.settings.Settings.

Defaults, ranges and dependencies are Kconfig's own (through kconfiglib). This module adds what Kconfig
cannot say: float strings that parse, and limits that involve two options at once. Those that the library
also enforces are asked of the library (the head dimension, R-MLP width and budget of gpt2.settings, the
reciprocal rank of the attention backend registry) and only placed here at the file and line of the culprit. Nothing
here writes `.config` except `write_config_atomically`, which validates first and renames a finished file.
"""

import dataclasses
import math
import os
import re
from pathlib import Path

from gpt2.io import atomic_path
from gpt2.model.attention.registry import lookup
from gpt2.settings import Settings, check_budget, component_classes
from lib.config.environment import apply_environment
from lib.config.kconfig import ConfigError, load_strict, parse_assignments, read_config_lines
from lib.config.paths import results_dir

def _selected_choice_value(kconf, prefix):
    candidates = [c for c in kconf.choices if c.syms and all(s.name.startswith(prefix + "_") for s in c.syms)]
    if len(candidates) != 1:
        raise ConfigError(f"Kconfig tree: expected one choice with members {prefix}_*, found {len(candidates)}")
    selection = candidates[0].selection
    if selection is None:
        return ""  # the whole choice depends on something that is off
    return selection.name[len(prefix) + 1:].lower().replace("_", "-")


def _read_field(kconf, config_path, field):
    symbol, kind = field.metadata["symbol"], field.metadata["kind"]
    if kind == "choice":
        return _selected_choice_value(kconf, symbol)
    sym = kconf.syms.get(symbol)
    if sym is None or not sym.nodes:
        raise ConfigError(f"Kconfig tree has no symbol {symbol} (needed for settings field {field.name})")
    raw = sym.str_value
    if kind == "bool":
        return raw == "y"
    if kind == "int":
        return int(raw, 10) if raw else 0  # '' when its dependency is off; base 10: "010" is ten, as in kconfiglib
    if kind == "str":
        return raw
    if kind == "list":
        return tuple(item for item in re.split(r"[,\s]+", raw) if item)
    if kind == "float":
        if raw == "" and sym.visibility == 0:
            return 0.0
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol}=\"{raw}\" is not a number; "
                              f"write a float such as \"0.1\" or \"6e-4\"") from None
        low, high = field.metadata.get("min"), field.metadata.get("max")
        if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol}={raw} is outside {low}..{high}")
        return value
    raise AssertionError(f"unknown field kind {kind}")


def _where(config_path, symbol) -> str:
    """The file and line that set `symbol`; config_path may also name a source that is not a file."""
    if not Path(config_path).is_file():
        return str(config_path)
    try:
        for a in parse_assignments(config_path):
            if a.symbol == symbol:
                return a.where()
    except ConfigError:
        pass
    return f"{config_path} (default of CONFIG_{symbol})"


# Path options: the results and data directories, the custom text file, a Hugging Face checkpoint directory.
PATH_SYMBOLS = {"RESULTS_DIR": ("general", "results_dir"), "DATA_DIR": ("data", "data_dir"),
                "DATASET_CUSTOM_PATH": ("data", "custom_text_path"),
                "MODEL_HF_CHECKPOINT_DIR": ("model", "hf_checkpoint_dir")}
MAX_PATH_CHARS = 1024  # well under Linux's PATH_MAX (4096), leaving room for the run and cell names below it
MAX_NAME_BYTES = 255  # one path component (NAME_MAX)


def _check_paths(settings: Settings, config_path) -> None:
    """A path option is refused at load time, naming it, when it could only fail later with an OSError (or
    write a file name no one can type): control characters, over MAX_PATH_CHARS, a component over NAME_MAX."""
    for symbol, (component, field) in PATH_SYMBOLS.items():
        value = getattr(getattr(settings, component), field)
        bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
        if bad:
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol} holds control character(s) "
                              f"{', '.join(repr(c) for c in dict.fromkeys(bad))}; write a plain path")
        if len(value) > MAX_PATH_CHARS:
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol} is {len(value)} characters long; "
                              f"at most {MAX_PATH_CHARS} are allowed")
        longest = max((len(part.encode("utf-8")) for part in value.split("/")), default=0)
        if longest > MAX_NAME_BYTES:
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol} has a path component of {longest} "
                              f"bytes; at most {MAX_NAME_BYTES} are allowed")


def _check_cross_field(settings: Settings, config_path) -> None:
    """Limits that depend on two options at once (Kconfig ranges are constants)."""
    model, attn, mlp, train = settings.model, settings.attention, settings.mlp, settings.train
    # Rules the library enforces too, in order (the rank check needs a valid head dim); each ValueError is
    # placed at the file and line of the symbol to change (None: no single one, e.g. the two budget caps).
    library_checks = (
        ("MODEL_N_EMBD", lambda: model.head_dim),
        ("ATTN_RA_RANK", lambda: lookup(attn.backend).check_rank(model.head_dim, attn.reciprocal_rank,
                                                                  attn.discoverability, attn.reciprocal_form)),
        ("MLP_RA_RFF", lambda: mlp.check_reciprocal_ff(model.n_embd)),
        (None, lambda: check_budget(train.max_time_s, train.max_iters)),
    )
    for symbol, check in library_checks:
        try:
            check()
        except ValueError as error:
            raise ConfigError(f"{_where(config_path, symbol) if symbol else config_path}: {error}") from None
    if train.lr_min > train.lr:
        raise ConfigError(f"{_where(config_path, 'TRAIN_LR_MIN')}: CONFIG_TRAIN_LR_MIN={train.lr_min} exceeds "
                          f"CONFIG_TRAIN_LR={train.lr}")
    if train.grad_accum % train.num_gpus:
        raise ConfigError(f"{_where(config_path, 'TRAIN_GRAD_ACCUM')}: CONFIG_TRAIN_GRAD_ACCUM={train.grad_accum} "
                          f"must be a multiple of CONFIG_TRAIN_NUM_GPUS={train.num_gpus} (the global batch is kept)")
    if settings.general.cuda_graphs and (train.grad_accum > 1 or train.num_gpus > 1):
        raise ConfigError(f"{_where(config_path, 'TORCH_COMPILE_CUDA_GRAPHS')}: CONFIG_TORCH_COMPILE_CUDA_GRAPHS=y "
                          f"needs one GPU and no gradient accumulation (CONFIG_TRAIN_NUM_GPUS={train.num_gpus}, "
                          f"CONFIG_TRAIN_GRAD_ACCUM={train.grad_accum}); a graph's outputs are overwritten by its "
                          f"next replay")
    if settings.model.init_from == "hf" and not settings.model.hf_checkpoint_dir:
        raise ConfigError(f"{config_path}: CONFIG_MODEL_INIT_HF=y needs CONFIG_MODEL_HF_CHECKPOINT_DIR")
    if settings.data.dataset == "custom" and not settings.data.custom_text_path:
        raise ConfigError(f"{config_path}: CONFIG_DATASET_CUSTOM=y needs CONFIG_DATASET_CUSTOM_PATH")


def settings_from_kconfig(kconf, config_path="<kconfig>") -> Settings:
    components = {}
    for name, cls in component_classes():
        components[name] = cls(**{f.name: _read_field(kconf, config_path, f) for f in dataclasses.fields(cls)})
    settings = Settings(**components)
    _check_paths(settings, config_path)
    _check_cross_field(settings, config_path)
    return settings


def load_settings(config_path=".config", kconfig_path=None, environ=None) -> Settings:
    """Read and validate a full configuration; environment overrides applied."""
    kconf = load_strict(config_path, kconfig_path)
    apply_environment(kconf, os.environ if environ is None else environ)
    return settings_from_kconfig(kconf, config_path)


def configured_results_dir(config_path, default_if_unreadable: bool = False) -> Path:
    """The results directory a .config names (CONFIG_RESULTS_DIR, from the repository root when relative). A
    config that cannot be read raises ConfigError, or with default_if_unreadable gives the default directory
    (report and eval look there for runs even without a .config)."""
    try:
        return results_dir(load_settings(config_path, environ={}).general)
    except ConfigError:
        if not default_if_unreadable:
            raise
        return results_dir(Settings().general)


def write_effective_config(config_path, out_path, environ=None) -> Settings:
    """The configuration a run trains with: `config_path` with the environment overrides folded in, validated
    and written to `out_path` (atomically). Returns its settings.

    The .config's opening comments (the `# preset: NAME` marker `defconfig` writes) stay at the top, followed by
    a line naming the overrides (if any), so the snapshot says both where it came from and what changed.
    """
    kconf = load_strict(config_path)
    applied = apply_environment(kconf, os.environ if environ is None else environ)
    settings = settings_from_kconfig(kconf, config_path)
    header = _opening_comments(config_path)
    if applied:  # without any, the snapshot is the .config as kconfiglib writes it
        overrides = ", ".join(f"{variable}={value}" for variable, value in applied.items())
        header += f"# Effective configuration: {config_path} with the environment's {overrides}\n"
    write_config_atomically(kconf, out_path, header=header)
    return settings


def _opening_comments(config_path) -> str:
    """The comment lines a .config opens with, up to its first blank or bare `#` line (the start of kconfiglib's
    first menu comment) or `# CONFIG_X is not set`."""
    lines = []
    for line in read_config_lines(config_path):
        if not line.startswith("# ") or line.startswith("# CONFIG_"):
            break
        lines.append(line + "\n")
    return "".join(lines)


def write_config_atomically(kconf, out_path, header=None, write=None) -> Settings:
    """Write what kconf holds to a temporary sibling of `out_path`, validate that file as every command would
    read it, and only then rename it over `out_path`; returns its settings.

    A config that fails validation never reaches `out_path`, so a bad preset, override, `make set` or
    menuconfig save leaves the current .config untouched; the error names the line of the file it would have
    been, and says that it was not written. `write` is kconf's own write_config unless given (menuconfig replaces
    kconf's with a validated save, which hands the original in).
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConfigError(f"{out_path}: is a directory; a configuration is written to a file")
    try:
        with atomic_path(out_path) as tmp:
            write = write or kconf.write_config
            if header is None:
                write(str(tmp), save_old=False)
            else:
                write(str(tmp), header=header, save_old=False)
            try:
                settings = settings_from_kconfig(load_strict(tmp), tmp)  # must read back cleanly
            except ConfigError as error:
                where = str(error).replace(f"{tmp}:", "line ").replace(str(tmp), "the new configuration")
                raise ConfigError(f"{out_path} not written: {where}") from None
    except OSError as error:
        raise ConfigError(f"{out_path}: cannot write it ({error.strerror or error})") from None
    return settings
