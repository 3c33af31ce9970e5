"""Kconfig tree + a .config or defconfig file -> a kconfiglib.Kconfig, refusing anything that did not take.

kconfiglib silently drops assignments to unknown symbols and falls back to the default for an out-of-range
int; this module catches both, names the file and line, and says what is allowed. Every error is a
ConfigError whose message is meant for the user.
"""

import dataclasses
import os
import re
from pathlib import Path

import kconfiglib

from lib.config.paths import KCONFIG_PATH, preset_names

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


def describe_allowed(sym) -> str:
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


def why_not_taken(kconf, sym) -> str:
    if not sym.nodes or all(node.prompt is None for node in sym.nodes):
        return "it has no prompt (it is derived from other options)"
    if sym.visibility == 0:
        owner = sym.choice if sym.choice is not None else sym
        return f"it depends on {kconfiglib.expr_str(owner.direct_dep)}, which is off"
    return f"allowed: {describe_allowed(sym)}"


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
                              f"allowed: {describe_allowed(sym)}")
        actual = sym.str_value
        if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and actual:
            same = int(actual, 0) == int(a.value, 0)
        else:
            same = actual == a.value or (a.value == "n" and actual in ("", "n"))
        if not same:
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={a.value} does not take "
                              f"(it resolves to {actual or 'nothing'}); {why_not_taken(kconf, sym)}")


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
