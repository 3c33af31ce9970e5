"""The one reader of `.config`: Kconfig tree + .config -> frozen Settings.

Defaults, ranges and dependencies are Kconfig's own (through kconfiglib). This
module adds what Kconfig cannot say: that an assignment really took (kconfiglib
silently drops unknown symbols, and falls back to the default for an
out-of-range int), that float strings parse, cross-field limits such as the
reciprocal rank versus the head dimension, and environment overrides.

Every error is a ConfigError whose message names the symbol, the file and line,
and what is allowed. Nothing here writes `.config` except through
`write_config_atomically`, which validates first and renames a finished file.
"""

import dataclasses
import os
import re
import tempfile
from pathlib import Path

import kconfiglib

from lib.settings import Settings, component_classes

REPO_ROOT = Path(__file__).resolve().parent.parent
KCONFIG_PATH = REPO_ROOT / "Kconfig"
DEFCONFIG_DIR = REPO_ROOT / "defconfigs"

# Environment variables that override a symbol for one invocation, validated
# exactly like a .config assignment.
ENV_OVERRIDES = {
    "GPT2_MAX_TIME": "GPT2_MAX_TIME",
    "GPT2_MAX_ITERS": "TRAIN_MAX_ITERS",
    "GPT2_SEED": "SEED",
    "GPT2_NUM_GPUS": "TRAIN_NUM_GPUS",
}

# Options that exist in the menu before their code does. Selecting one is an
# error, never a silent no-op.
NOT_IMPLEMENTED = {
    "TRACKING_TRACKIO": "the trackio tracker",
    "TRACKING_WANDB": "the Weights & Biases tracker",
}

PRESET_MARKER = "preset:"

_ASSIGNMENT = re.compile(r"^(?:CONFIG_(\w+)=(.*)|# CONFIG_(\w+) is not set)\s*$")


class ConfigError(Exception):
    """A configuration problem, with a message meant for the user."""


@dataclasses.dataclass(frozen=True)
class Assignment:
    symbol: str
    value: str  # unquoted
    path: str
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


def parse_assignments(path) -> list:
    """CONFIG_ lines of a .config/defconfig with their line numbers.

    kconfiglib does the real loading; this pass only keeps line numbers for
    error messages and catches what kconfiglib accepts silently (duplicate
    choice members, lines that are not assignments at all).
    """
    assignments = []
    for number, text in enumerate(Path(path).read_text().splitlines(), start=1):
        stripped = text.strip()
        if not stripped or (stripped.startswith("#") and "is not set" not in stripped):
            continue
        match = _ASSIGNMENT.match(stripped)
        if not match:
            raise ConfigError(f"{path}:{number}: cannot parse {stripped!r}; expected CONFIG_NAME=value "
                              f"or '# CONFIG_NAME is not set'")
        if match.group(3):
            assignments.append(Assignment(match.group(3), "n", str(path), number))
        else:
            value = match.group(2)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            assignments.append(Assignment(match.group(1), value, str(path), number))
    return assignments


def load_kconfig(kconfig_path=None) -> kconfiglib.Kconfig:
    """Parse the Kconfig tree (sources resolve relative to its directory)."""
    kconfig_path = Path(kconfig_path or KCONFIG_PATH).resolve()
    saved = os.environ.get("srctree")
    os.environ["srctree"] = str(kconfig_path.parent)
    try:
        kconf = kconfiglib.Kconfig(str(kconfig_path), warn_to_stderr=False)
    finally:
        if saved is None:
            del os.environ["srctree"]
        else:
            os.environ["srctree"] = saved
    kconf.warn_assign_undef = True
    kconf.warn_assign_override = True
    kconf.warn_assign_redun = False
    return kconf


def _describe_allowed(sym) -> str:
    """What values a symbol accepts right now, for error messages."""
    if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        if sym.choice is not None:
            members = ", ".join(s.name for s in sym.choice.syms)
            return f"one member of its choice ({members})"
        return "y or n"
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX):
        for low, high, cond in sym.ranges:
            if kconfiglib.expr_value(cond):
                return f"an integer in {low.str_value}..{high.str_value}"
        return "an integer"
    return "a string"


def _why_not_taken(kconf, sym) -> str:
    if not sym.nodes or all(node.prompt is None for node in sym.nodes):
        return "it has no prompt (it is derived from other options)"
    if sym.visibility == 0:
        owner = sym.choice if sym.choice is not None else sym
        return f"it depends on {kconfiglib.expr_str(owner.direct_dep)}, which is off"
    return f"allowed: {_describe_allowed(sym)}"


def check_assignments_took(kconf, assignments) -> None:
    """Every assignment must name a known symbol and end up with its value."""
    by_choice = {}
    for a in assignments:
        sym = kconf.syms.get(a.symbol)
        if sym is None or not sym.nodes:
            close = [s for s in kconf.syms if s.startswith(a.symbol.split("_")[0])][:6]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(f"{a.where()}: unknown symbol CONFIG_{a.symbol}{hint}")
        if sym.choice is not None and a.value == "y":
            by_choice.setdefault(id(sym.choice), []).append(a)
    for members in by_choice.values():
        if len(members) > 1:
            listed = ", ".join(f"CONFIG_{m.symbol} ({m.where()})" for m in members)
            raise ConfigError(f"two members of one choice are set: {listed}; keep exactly one")
    for a in assignments:
        sym = kconf.syms[a.symbol]
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and not re.fullmatch(r"-?\d+", a.value):
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={a.value!r} is not an integer; "
                              f"allowed: {_describe_allowed(sym)}")
        actual = sym.str_value
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and actual:
            same = int(actual, 0) == int(a.value, 0)
        else:
            same = actual == a.value or (a.value == "n" and actual in ("", "n"))
        if not same:
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={a.value} does not take "
                              f"(it resolves to {actual or 'nothing'}); {_why_not_taken(kconf, sym)}")


def _raise_on_warnings(kconf, path) -> None:
    if kconf.warnings:
        raise ConfigError(f"{path}: " + "; ".join(w.replace("warning: ", "") for w in kconf.warnings))


def load_strict(config_path, kconfig_path=None):
    """Kconfig with `config_path` loaded, refusing anything that did not take."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: no such configuration file; run `make defconfig-<preset>` "
                          f"(presets: {', '.join(preset_names())}) or `make menuconfig`")
    kconf = load_kconfig(kconfig_path)
    assignments = parse_assignments(config_path)
    kconf.warnings.clear()
    kconf.load_config(str(config_path), replace=True)
    check_assignments_took(kconf, assignments)
    _raise_on_warnings(kconf, config_path)
    return kconf


def apply_environment(kconf, environ) -> None:
    """GPT2_MAX_TIME and friends, validated as if they were .config lines."""
    for variable, symbol in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value is None or value == "":
            continue
        value = value.strip()
        sym = kconf.syms[symbol]
        if not re.fullmatch(r"\d+", value):
            raise ConfigError(f"environment {variable}={value!r} is not a non-negative integer "
                              f"(it sets CONFIG_{symbol}; allowed: {_describe_allowed(sym)})")
        sym.set_value(value)
        if sym.str_value != str(int(value)):
            raise ConfigError(f"environment {variable}={value} does not take for CONFIG_{symbol}; "
                              f"{_why_not_taken(kconf, sym)}")


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
        return int(raw, 0) if raw else 0  # '' when its dependency is off
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
        if value != value or (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol}={raw} is outside {low}..{high}")
        return value
    raise AssertionError(f"unknown field kind {kind}")


def _where(config_path, symbol) -> str:
    try:
        for a in parse_assignments(config_path):
            if a.symbol == symbol:
                return a.where()
    except (OSError, ConfigError):
        pass
    return f"{config_path} (default of CONFIG_{symbol})"


def _check_cross_field(settings: Settings, config_path) -> None:
    """Limits that depend on two options at once (Kconfig ranges are constants)."""
    model, attn, mlp, train = settings.model, settings.attention, settings.mlp, settings.train
    if model.n_embd % model.n_head:
        raise ConfigError(f"{_where(config_path, 'MODEL_N_EMBD')}: CONFIG_MODEL_N_EMBD={model.n_embd} is not "
                          f"divisible by CONFIG_MODEL_N_HEAD={model.n_head}")
    head_dim = model.n_embd // model.n_head
    if attn.backend in ("ra-same-flop", "ra-unified", "ra-fold-lowrank"):
        # same-flop/unified take R dims from the standard term (keeping at least one) and
        # the discoverability bias takes one more; fold-lowrank appends R dims, up to D.
        if attn.backend == "ra-fold-lowrank":
            top = head_dim
        else:
            top = head_dim - 1 - (1 if attn.discoverability else 0)
        if not 1 <= attn.reciprocal_rank <= top:
            raise ConfigError(f"{_where(config_path, 'ATTN_RA_RANK')}: CONFIG_ATTN_RA_RANK={attn.reciprocal_rank} "
                              f"is outside 1..{top} (head dim {head_dim}"
                              f"{', one dim taken by the discoverability bias' if attn.discoverability else ''})")
    if mlp.kind == "reciprocal" and mlp.reciprocal_ff >= mlp.expansion * model.n_embd:
        raise ConfigError(f"{_where(config_path, 'MLP_RA_RFF')}: CONFIG_MLP_RA_RFF={mlp.reciprocal_ff} must be "
                          f"below the hidden size {mlp.expansion * model.n_embd}")
    if train.max_iters == 0 and train.max_time_s == 0:
        raise ConfigError(f"{config_path}: both CONFIG_TRAIN_MAX_ITERS and CONFIG_GPT2_MAX_TIME are 0, so the run "
                          f"would never stop; set one (GPT2_MAX_TIME=600 make)")
    if train.lr_min > train.lr:
        raise ConfigError(f"{_where(config_path, 'TRAIN_LR_MIN')}: CONFIG_TRAIN_LR_MIN={train.lr_min} exceeds "
                          f"CONFIG_TRAIN_LR={train.lr}")
    if train.grad_accum % train.num_gpus:
        raise ConfigError(f"{_where(config_path, 'TRAIN_GRAD_ACCUM')}: CONFIG_TRAIN_GRAD_ACCUM={train.grad_accum} "
                          f"must be a multiple of CONFIG_TRAIN_NUM_GPUS={train.num_gpus} (the global batch is kept)")
    if settings.model.init_from == "hf" and not settings.model.hf_checkpoint_dir:
        raise ConfigError(f"{config_path}: CONFIG_MODEL_INIT_HF=y needs CONFIG_MODEL_HF_CHECKPOINT_DIR")
    if settings.data.dataset == "custom" and not settings.data.custom_text_path:
        raise ConfigError(f"{config_path}: CONFIG_DATASET_CUSTOM=y needs CONFIG_DATASET_CUSTOM_PATH")


def settings_from_kconfig(kconf, config_path="<kconfig>") -> Settings:
    for symbol, what in NOT_IMPLEMENTED.items():
        if kconf.syms[symbol].str_value == "y":
            raise ConfigError(f"{_where(config_path, symbol)}: CONFIG_{symbol}=y selects {what}, which is not "
                              f"implemented yet; choose another option in menuconfig")
    components = {}
    for name, cls in component_classes():
        components[name] = cls(**{f.name: _read_field(kconf, config_path, f) for f in dataclasses.fields(cls)})
    settings = Settings(**components)
    _check_cross_field(settings, config_path)
    return settings


def load_settings(config_path=".config", kconfig_path=None, environ=None) -> Settings:
    """Read and validate a full configuration; environment overrides applied."""
    kconf = load_strict(config_path, kconfig_path)
    apply_environment(kconf, os.environ if environ is None else environ)
    return settings_from_kconfig(kconf, config_path)


# ---- writing configurations -------------------------------------------------

def write_config_atomically(kconf, out_path, header=None) -> None:
    """Validate what kconf holds, then write it to a temp file and rename.

    A config that fails validation never reaches `out_path`, so a bad preset
    or override leaves the current .config untouched.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    os.close(fd)
    try:
        if header is None:
            kconf.write_config(tmp, save_old=False)
        else:
            kconf.write_config(tmp, header=header, save_old=False)
        settings_from_kconfig(load_strict(tmp), out_path)  # must read back cleanly
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def preset_names() -> list:
    return sorted(p.name for p in DEFCONFIG_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


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


def write_cell_config(base_config_path, overrides: dict, out_path) -> None:
    """Base config + {SYMBOL: value} overrides, re-validated, written atomically.

    Overrides apply in order; setting a choice member to y replaces any earlier
    member of the same choice. An unknown symbol, or a value that does not take
    (out of range, dependency off), raises ConfigError naming the symbol.
    """
    kconf = load_strict(base_config_path)
    effective = {}
    for symbol, value in overrides.items():
        symbol = symbol.removeprefix("CONFIG_")
        sym = kconf.syms.get(symbol)
        if sym is None or not sym.nodes:
            raise ConfigError(f"override CONFIG_{symbol}={value}: unknown symbol")
        if sym.choice is not None and value == "y":
            for other in sym.choice.syms:
                effective.pop(other.name, None)
        effective[symbol] = str(value)
    for _ in range(2):  # a second pass lets an override enable the dependency of an earlier one
        for symbol, value in effective.items():
            kconf.syms[symbol].set_value(value)
    check_assignments_took(kconf, [Assignment(s, v, f"override of {base_config_path}", 0) for s, v in effective.items()])
    write_config_atomically(kconf, out_path)
