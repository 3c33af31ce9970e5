"""The kconfig commands that read or rewrite a .config without a menu: set, olddefconfig (and oldconfig's
questions), alldefconfig, savedefconfig, listnewconfig.

Every rewrite goes through write_config_atomically (validated like any load, renamed into place), so a value
that does not take leaves the .config as it was. olddefconfig is the one command that may change a value
by itself, as Linux's does; it says so, one line per value, naming the symbol, the old and new value and why.
"""

import re
import tempfile
from pathlib import Path

from gpt2.io import atomic_path
from lib.config.cells import apply_overrides
from lib.config.kconfig import (Assignment, ConfigError, load_config_file, load_kconfig, load_strict,
                                one_line, scan_assignments, shown, symbol_hint, took, value_problem, why_not_taken)
from lib.config.load import settings_from_kconfig, write_config_atomically
from lib.config.presets import rewrite_keeping_preset

_WORD = re.compile(r"(?:CONFIG_)?([^=\s]+)=(.*)", re.DOTALL)
_QUOTED = re.compile(r'"((?:[^\\"]|\\.)*)"', re.DOTALL)


def parse_set_words(words) -> list:
    """`SYMBOL=value` words (as `make set ARGS="..."` passes them) -> Assignments; the CONFIG_ prefix and
    a pair of double quotes around the value are optional."""
    if not words:
        raise ConfigError('set: nothing to set; write make set ARGS="SYMBOL=value ..." (e.g. ARGS="ATTN_RA_RANK=8 '
                          'SEED=3"): bare SYMBOL=value words after make are make\'s own variables')
    assignments = []
    for number, word in enumerate(words, start=1):
        match = _WORD.fullmatch(word)
        if not match:
            raise ConfigError(f"argument {number} of set: {word!r} is not SYMBOL=value (e.g. ATTN_RA_RANK=8)")
        symbol, value = match.groups()
        quoted = _QUOTED.fullmatch(value)
        if quoted:
            value = re.sub(r"\\(.)", r"\1", quoted.group(1))
        assignments.append(Assignment(symbol, value, f"argument {number} of set", 0))
    return assignments


def set_values(config_path, words) -> list:
    """`make set`: apply SYMBOL=value words to config_path, validated exactly as .config lines are, and write it
    back (keeping its preset header) only when the whole result is valid. Returns the Assignments applied."""
    assignments = parse_set_words(words)
    kconf = load_strict(config_path)
    apply_overrides(kconf, assignments)
    rewrite_keeping_preset(kconf, config_path)
    return assignments


def _changes(kconf, config_path) -> list:
    """One line per value of config_path that kconfiglib did not keep: what was written, what it is now, why."""
    assignments, malformed = scan_assignments(config_path)
    notes = [(number, f"{config_path}:{number}: {text!r} dropped: not an assignment") for number, text in malformed]
    last = {a.symbol: a for a in assignments}  # kconfiglib keeps the last assignment of a symbol
    for a in assignments:
        sym = kconf.syms.get(a.symbol)
        if sym is None or not sym.nodes:
            notes.append((a.line, f"{a.where()}: CONFIG_{a.symbol}={shown(a.value)} dropped: unknown symbol"
                                  f"{symbol_hint(kconf, a.symbol)}"))
            continue
        if last[a.symbol] is not a:
            if last[a.symbol].value != a.value:
                notes.append((a.line, f"{a.where()}: CONFIG_{a.symbol}={shown(a.value)} dropped: set again at "
                                      f"line {last[a.symbol].line}"))
            continue
        problem = value_problem(sym, a)
        if problem or not took(sym, a.value):
            now = sym.str_value if sym.str_value else "(not written)"
            notes.append((a.line, f"{a.where()}: CONFIG_{a.symbol} {shown(a.value)} -> {shown(now)}: "
                                  f"{problem or why_not_taken(kconf, sym)}"))
    return [one_line(text) for _, text in sorted(notes, key=lambda note: note[0])]


def refresh(config_path, ask=None) -> list:
    """olddefconfig (ask=None) and oldconfig: keep what still applies, give new options their default (or ask),
    write the result validated; returns the notes on every value that changed."""
    kconf = load_kconfig()
    load_config_file(kconf, config_path)
    notes = _changes(kconf, config_path)
    if ask is None:
        settings_from_kconfig(kconf, config_path)  # a limit kconfiglib cannot fix, named at its line in config_path
    else:
        ask(kconf)
    rewrite_keeping_preset(kconf, config_path)
    return notes


def alldefconfig(config_path) -> None:
    """Every option at its Kconfig default (no preset), validated."""
    write_config_atomically(load_kconfig(), config_path)


def write_minimal(kconf, out_path, write=None) -> None:
    """kconf's minimal form (only what differs from the defaults), written atomically (`write`: kconf's own
    write_min_config unless given)."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConfigError(f"{out_path}: is a directory; the minimal configuration is written to a file")
    try:
        with atomic_path(out_path) as tmp:
            (write or kconf.write_min_config)(str(tmp))
    except OSError as error:
        raise ConfigError(f"{out_path}: cannot write it ({error.strerror or error})") from None


def savedefconfig(config_path, out_path) -> None:
    """config_path, validated like every load (floats and cross-field limits included), -> its minimal form."""
    kconf = load_strict(config_path)
    settings_from_kconfig(kconf, config_path)
    write_minimal(kconf, out_path)


def save_minimal_validated(kconf, out_path, write_full, write_min) -> None:
    """menuconfig's minimal save (its own writers handed in): the full configuration must validate before its
    minimal form is written."""
    with tempfile.TemporaryDirectory(prefix="gpt2-config-") as scratch:
        full = Path(scratch) / "config"
        try:
            write_config_atomically(kconf, full, write=write_full)
        except ConfigError as error:
            raise ConfigError(str(error).replace(str(full), str(out_path))) from None
    write_minimal(kconf, out_path, write=write_min)


def new_options(config_path) -> list:
    """listnewconfig: `CONFIG_X=default` for every visible option config_path does not set."""
    kconf = load_kconfig()
    load_config_file(kconf, config_path)
    return [f"CONFIG_{sym.name}={sym.str_value}" for sym in kconf.unique_defined_syms
            if sym.visibility and sym.user_value is None and any(n.prompt for n in sym.nodes)
            and (sym.choice is None or sym.choice.user_selection is None)]
