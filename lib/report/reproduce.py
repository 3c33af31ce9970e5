"""One command line per run that trains it again: the commit it ran (env.json), the preset it was configured from,
the GPT2_* budget overrides of its environment, and the make target.

    git checkout <commit> && make defconfig-<preset> && [GPT2_X=v ]make cell CELL=<id>[ DEFCONFIGS="a b"]
    git checkout <commit> && make defconfig-<preset> && [GPT2_X=v ]make train

`make defconfig-<preset>` only gives the configuration back when it is the preset as it stands; a .config edited
afterwards (menuconfig keeps the preset marker) or one without a marker is restored by copying the saved file
instead (the matrix's base.config, or the run's snapshot, which has the overrides folded in).

plan.json is read as plain JSON and defensively: which field records the preset and the environment has changed
over time, and a report must still be written for an older matrix.
"""

import json
import tempfile
from pathlib import Path

from lib import config as kcfg
from lib.matrix.describe import config_difference
from lib.matrix.plan import PLAN_FILE, config_values
from lib.report.code import ran_code
from gpt2.io import CONFIG_NAME, ENV_NAME

# The snapshot's header line naming the overrides folded in (lib.config.load.write_effective_config).
EFFECTIVE_MARKER = " with the environment's "


def _shown(path) -> str:
    """A path as the command line should name it: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(kcfg.REPO_ROOT))
    except ValueError:
        return str(path)


def _is_preset(name) -> bool:
    try:
        return isinstance(name, str) and bool(name) and kcfg.preset_path(name).is_file()
    except kcfg.ConfigError:
        return False


def checkout(env: dict, where) -> tuple:
    """("git checkout <commit> && " or "", warning or ""), from env.json's git record: the commit with the files
    that ran (lib/report/code.py), else the recorded one with a warning."""
    code = ran_code(env)
    if not code.commit:
        return "", "commit not recorded (no env.json with git info): run it from the commit it used"
    warning = (f"uncommitted changes: the checkout lacks them; the diff is in `{_shown(Path(where) / ENV_NAME)}` "
               f"(git.diff)") if code.dirty else ""
    return f"git checkout {code.commit[:12]} && ", warning


def matches_preset(config_path, preset, ignore=()) -> bool:
    """Whether `make defconfig-<preset>` writes the same assignments as config_path (symbols in `ignore` aside)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            expanded = Path(tmp) / "preset.config"
            kcfg.apply_defconfig(kcfg.preset_path(preset), expanded)
            theirs, ours = config_values(expanded), config_values(config_path)
    except (kcfg.ConfigError, OSError):
        return False
    for symbol in ignore:
        theirs.pop(symbol, None)
        ours.pop(symbol, None)
    return not config_difference(theirs, ours)


def _env_prefix(overrides: dict) -> str:
    return "".join(f"{variable}={value} " for variable, value in overrides.items())


# ---- a matrix -----------------------------------------------------------------------------------------

def plan_preset(matrix_dir, raw: dict) -> str:
    """The preset the matrix's .config came from: plan.json's "preset", else base.config's marker, else the plan's
    name when it is a preset; '' when none is known."""
    if _is_preset(raw.get("preset")):
        return raw["preset"]
    try:
        marker = kcfg.preset_of(Path(matrix_dir) / "base.config")
    except (OSError, kcfg.ConfigError):
        marker = ""
    if marker:
        return marker
    return raw["name"] if _is_preset(raw.get("name")) else ""


def plan_environment(raw: dict) -> dict:
    """{GPT2_VARIABLE: value}: the budget overrides the matrix baked into every cell (GPT2_SEED never: the
    matrix sets seeds). A dedicated plan.json field when there is one (keyed by variable or by symbol), else the
    fingerprint's "environment GPT2_X" entries, which every plan has recorded."""
    by_symbol = {symbol: variable for variable, symbol in kcfg.ENV_OVERRIDES.items()}
    found = None
    for key in ("environment", "environment_overrides", "env_overrides"):
        if isinstance(raw.get(key), dict):
            found = raw[key]
            break
    if found is None:
        base = (raw.get("fingerprint") or {}).get("base") or {}
        found = {key.split(" ", 1)[1]: value for key, value in base.items() if key.startswith("environment ")}
    overrides = {}
    for key, value in found.items():
        variable = key if key in kcfg.ENV_OVERRIDES else by_symbol.get(key)
        if variable and variable != "GPT2_SEED" and str(value).strip():
            overrides[variable] = str(value).strip()
    return overrides


def _defconfigs_argument(raw: dict) -> str:
    """' DEFCONFIGS="a b"' when the cells compare presets the base config does not name itself."""
    named = [v.get("defconfig") for v in raw.get("variants") or [] if v.get("defconfig")]
    named = list(dict.fromkeys(named))
    own = (raw.get("base_assignments") or {}).get("MATRIX_DEFCONFIGS", "").replace(",", " ").split()
    return f' DEFCONFIGS="{" ".join(named)}"' if named and named != own else ""


def matrix_commands(matrix_dir, records) -> dict:
    """{cell label: (command, warning)} for every cell of the matrix, in plan order."""
    matrix_dir = Path(matrix_dir)
    try:
        raw = json.loads((matrix_dir / PLAN_FILE).read_text())
    except (OSError, ValueError):
        raw = {}
    preset = plan_preset(matrix_dir, raw)
    base = matrix_dir / "base.config"
    configure = (f"make defconfig-{preset}" if preset and matches_preset(base, preset)
                 else f"cp {_shown(base)} .config")
    tail = _defconfigs_argument(raw)
    env = _env_prefix(plan_environment(raw))
    commands = {}
    for r in records:
        git, warning = checkout(r.env, r.run_dir)
        if not r.env and r.status == "pending":
            warning = "not started yet: the commit is the one the matrix will run"
        commands[r.label] = (f"{git}{configure} && {env}make cell CELL={r.run_dir.name}{tail}", warning)
    return commands


# ---- a single run ---------------------------------------------------------------------------------------

def run_overrides(run_dir, env: dict) -> dict:
    """{GPT2_VARIABLE: value} the run applied: named in the snapshot's header line, else env.json's environment."""
    applied = {}
    try:
        lines = (Path(run_dir) / CONFIG_NAME).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if not line.startswith("#"):
            break
        if line.startswith("# Effective configuration:") and EFFECTIVE_MARKER in line:
            for item in line.rpartition(EFFECTIVE_MARKER)[2].split(","):
                variable, _, value = item.strip().partition("=")
                if variable in kcfg.ENV_OVERRIDES and value:
                    applied[variable] = value
    for variable, value in ((env or {}).get("environment") or {}).items():
        if variable in kcfg.ENV_OVERRIDES and str(value).strip():
            applied.setdefault(variable, str(value).strip())
    return applied


def run_command(run_dir, record) -> tuple:
    """(command, warning) that trains the run again."""
    run_dir = Path(run_dir)
    snapshot = run_dir / CONFIG_NAME
    git, warning = checkout(record.env, run_dir)
    try:
        preset = kcfg.preset_of(snapshot)
    except (OSError, kcfg.ConfigError):
        preset = ""
    overrides = run_overrides(run_dir, record.env)
    folded = {kcfg.ENV_OVERRIDES[v] for v in overrides}  # the snapshot holds them; the command sets them again
    if preset and matches_preset(snapshot, preset, ignore=folded):
        return f"{git}make defconfig-{preset} && {_env_prefix(overrides)}make train", warning
    # The snapshot is the effective configuration (overrides folded in): copied, it needs no environment.
    return f"{git}cp {_shown(snapshot)} .config && make train", warning
