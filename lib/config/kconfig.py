"""Kconfig tree + a .config or defconfig file -> a kconfiglib.Kconfig, refusing anything that did not take.

kconfiglib silently drops assignments to unknown symbols and falls back to the default for an out-of-range
int; this module catches both, names the file and line, and says what is allowed. It is also the one place
that opens those files as text (read_config_lines), so a file that is not UTF-8, holds NUL bytes or is a
directory is refused here, once, for every command. Every error is a one-line ConfigError meant for the user.
"""

import dataclasses
import difflib
import os
import re
from pathlib import Path

import kconfiglib

from lib.config.paths import KCONFIG_PATH, preset_names

# The two line forms exactly as kconfiglib matches them (at the start of the right-stripped line), so this
# pass and kconfiglib always agree on which line assigns what.
_SET = re.compile(r"CONFIG_([^=]+)=(.*)")
_UNSET = re.compile(r"# CONFIG_([^ ]+) is not set")
# kconfiglib's own string literal syntax (its _conf_string_match and unescape), applied to the whole value.
_STRING_LITERAL = re.compile(r'"((?:[^\\"]|\\.)*)"', re.DOTALL)
_INTEGER = re.compile(r"-?[0-9]+")


def one_line(text: str) -> str:
    """`text` with every character that could break a line or the terminal written as an escape: a
    message names a user's value, and that value may hold a vertical tab or an escape sequence."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(value: str) -> str:
    """A user's value as an error message quotes it: bare when printable, repr'd when not."""
    return value if value.isprintable() else repr(value)


class ConfigError(Exception):
    """A configuration problem, with a message meant for the user: always exactly one line."""

    def __init__(self, message):
        super().__init__(one_line(str(message)))


@dataclasses.dataclass(frozen=True)
class Assignment:
    symbol: str
    value: str  # unquoted
    path: str  # the file, or a description of where the value came from ("argument 2 of set")
    line: int  # 0: no line applies
    raw: str = None  # the text after '=' as written in a file (None: an override, never quoted)
    not_set: bool = False  # written as '# CONFIG_X is not set'

    def where(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


def read_config_lines(path) -> list:
    """The lines of a .config or defconfig, split as kconfiglib splits them (universal newlines), so line
    numbers agree with its warnings. Refuses, naming the file (and line), what is not a readable text file."""
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO or device would block or never end
        raise ConfigError(f"{path}: is not a regular file; a configuration is a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file; run `make defconfig-<preset>` "
                          f"(presets: {', '.join(preset_names())}) or `make menuconfig`") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a configuration file; point KCONFIG_CONFIG (or --config) "
                          f"at a file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = len(_split(data[:error.start].decode("utf-8")))
        raise ConfigError(f"{path}:{line}: byte 0x{data[error.start]:02x} is not UTF-8 text; a configuration "
                          f"file is UTF-8 (re-save it, or regenerate it with make defconfig-<preset>)") from None
    lines = _split(text)
    for number, line in enumerate(lines, start=1):
        if "\0" in line:
            raise ConfigError(f"{path}:{number}: NUL byte in the line; a configuration file is text")
    return lines


def _split(text: str) -> list:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def scan_assignments(path) -> tuple:
    """(assignments, malformed): the CONFIG_ lines of a .config/defconfig with their line numbers, and the
    (line, text) of lines that are neither an assignment nor a comment."""
    assignments, malformed = [], []
    for number, text in enumerate(read_config_lines(path), start=1):
        line = text.rstrip()
        assigned, unset = _SET.match(line), _UNSET.match(line)
        if assigned:
            raw = assigned.group(2)
            literal = _STRING_LITERAL.fullmatch(raw)
            value = re.sub(r"\\(.)", r"\1", literal.group(1)) if literal else raw
            assignments.append(Assignment(assigned.group(1), value, str(path), number, raw))
        elif unset:
            assignments.append(Assignment(unset.group(1), "n", str(path), number, None, not_set=True))
        elif line and not line.lstrip().startswith("#"):
            malformed.append((number, line))
    return assignments, malformed


def parse_assignments(path) -> list:
    """CONFIG_ lines of a .config/defconfig with their line numbers; a line that is not one is an error.

    kconfiglib does the real loading; this pass keeps line numbers for error messages and catches what
    kconfiglib accepts silently (duplicate choice members, lines that are not assignments at all).
    """
    assignments, malformed = scan_assignments(path)
    if malformed:
        number, text = malformed[0]
        raise ConfigError(f"{path}:{number}: cannot parse {text!r}; expected CONFIG_NAME=value "
                          f"or '# CONFIG_NAME is not set'")
    return assignments


def load_kconfig(kconfig_path=None, kconfig_class=kconfiglib.Kconfig) -> kconfiglib.Kconfig:
    """Parse the Kconfig tree (sources resolve relative to its directory); a missing or broken tree is one
    ConfigError naming the file. kconfig_class: a subclass of kconfiglib.Kconfig (menuconfig's saves)."""
    kconfig_path = Path(kconfig_path or KCONFIG_PATH).resolve()
    if not kconfig_path.is_file():
        raise ConfigError(f"{kconfig_path}: the Kconfig tree's top file is missing (or not a file); "
                          f"restore it from git")
    saved = os.environ.get("srctree")
    os.environ["srctree"] = str(kconfig_path.parent)
    try:
        kconf = kconfig_class(str(kconfig_path), warn_to_stderr=False)
    except (OSError, kconfiglib.KconfigError, UnicodeError) as error:
        raise ConfigError(f"Kconfig tree {kconfig_path}: {' '.join(str(error).split())}") from None
    finally:
        if saved is None:
            del os.environ["srctree"]
        else:
            os.environ["srctree"] = saved
    kconf.warn_assign_undef = True
    kconf.warn_assign_override = True
    kconf.warn_assign_redun = False
    return kconf


def load_config_file(kconf, config_path) -> None:
    """kconf.load_config(config_path, replace=True), with the file checked by read_config_lines first (kconfiglib
    would raise a traceback's worth of UnicodeDecodeError or IsADirectoryError)."""
    read_config_lines(config_path)
    kconf.warnings.clear()
    try:
        kconf.load_config(str(config_path), replace=True)
    except (OSError, UnicodeError) as error:  # the file changed between the two reads
        raise ConfigError(f"{config_path}: cannot read it ({error})") from None


def symbols_at_default(config_path, symbols) -> set:
    """Those of `symbols` whose value in the .config at config_path is what Kconfig would pick by itself (the
    matrix plan leaves them out of a cell's listed difference). The file is one this code wrote and checked."""
    kconf = load_kconfig()
    load_config_file(kconf, config_path)
    same = set()
    for name in symbols:
        sym = kconf.syms.get(name)
        if sym is None:
            continue
        target = sym.choice if sym.choice is not None else sym
        before = target.selection if sym.choice is not None else sym.str_value
        user = target.user_selection if sym.choice is not None else sym.user_value
        target.unset_value()
        after = target.selection if sym.choice is not None else sym.str_value
        if before is after or before == after:
            same.add(name)
        if user is not None:  # put the loaded value back for the next symbol's comparison
            (user.set_value(2) if sym.choice is not None else sym.set_value(user))
    return same


def did_you_mean(name: str, candidates, prefix: str = "") -> str:
    """' (did you mean X or Y?)' for the candidates closest to a misspelled name (compared without the common
    `prefix`, which would make every name look alike), else those that contain it, else ''."""
    bare = {c.removeprefix(prefix): c for c in candidates}
    key = name.upper().removeprefix(prefix)
    close = difflib.get_close_matches(key, list(bare), n=3, cutoff=0.75)
    close = close or [b for b in bare if len(key) >= 2 and key in b][:3]
    if not close:
        return ""
    named = [bare[c] for c in close]
    return f" (did you mean {', '.join(named[:-1]) + ' or ' if len(named) > 1 else ''}{named[-1]}?)"


def symbol_hint(kconf, symbol) -> str:
    """The closest symbol names to an unknown one, or where to look them up."""
    names = [f"CONFIG_{s.name}" for s in kconf.unique_defined_syms]
    return did_you_mean(f"CONFIG_{symbol}", names, "CONFIG_") or "; search the names with / in make menuconfig"


def unknown_symbol(kconf, symbol) -> str:
    return f"unknown symbol CONFIG_{symbol}{symbol_hint(kconf, symbol)}"


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
    if sym.choice is not None and sym.choice.selection is not None and sym.choice.selection is not sym:
        return f"CONFIG_{sym.choice.selection.name} is the member of its choice that is selected"
    return f"allowed: {describe_allowed(sym)}"


def value_problem(sym, a: Assignment) -> str:
    """Why `a` cannot be what the file says, before looking at what kconfiglib made of it ('' when it can)."""
    written = a.value if a.raw is None else a.raw
    if sym.orig_type in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        if not a.not_set and written not in ("y", "n"):  # kconfiglib reads any word starting with y as y
            return f"CONFIG_{a.symbol}={written!r} is not y or n; allowed: {describe_allowed(sym)}"
    elif a.not_set:
        return (f"'# CONFIG_{a.symbol} is not set' applies to y/n options only; CONFIG_{a.symbol} takes "
                f"{describe_allowed(sym)}")
    elif sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and not _INTEGER.fullmatch(written):
        return f"CONFIG_{a.symbol}={written!r} is not an integer; allowed: {describe_allowed(sym)}"
    elif sym.orig_type == kconfiglib.STRING and a.raw is not None and not _STRING_LITERAL.fullmatch(a.raw):
        return f"CONFIG_{a.symbol}={shown(a.raw)} is not a double-quoted string; write CONFIG_{a.symbol}=\"...\""
    return ""


def took(sym, value: str) -> bool:
    """Whether the symbol ended up with `value` (integers compared as numbers, n and '' alike for bools)."""
    actual = sym.str_value
    if sym.orig_type in (kconfiglib.INT, kconfiglib.HEX) and actual and _INTEGER.fullmatch(value):
        base = 16 if sym.orig_type == kconfiglib.HEX else 10
        try:
            return int(actual, base) == int(value, base)
        except ValueError:
            return False
    return actual == value or (value == "n" and actual in ("", "n"))


def check_assignments_took(kconf, assignments) -> None:
    """Every assignment must name a known symbol, be set once and end up with its value."""
    by_choice, first = {}, {}
    for a in assignments:
        sym = kconf.syms.get(a.symbol)
        if sym is None or not sym.nodes:
            raise ConfigError(f"{a.where()}: {unknown_symbol(kconf, a.symbol)}")
        earlier = first.setdefault(a.symbol, a)
        if earlier.value != a.value:
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol} is set twice, to {shown(earlier.value)} "
                              f"({earlier.where()}) and to {shown(a.value)}; keep one")
        if sym.choice is not None and a.value == "y" and earlier is a:
            by_choice.setdefault(id(sym.choice), []).append(a)
    for members in by_choice.values():
        if len(members) > 1:
            listed = ", ".join(f"CONFIG_{m.symbol} ({m.where()})" for m in members)
            raise ConfigError(f"two members of one choice are set: {listed}; keep exactly one")
    for a in assignments:
        sym = kconf.syms[a.symbol]
        problem = value_problem(sym, a)
        if problem:
            raise ConfigError(f"{a.where()}: {problem}")
        if not took(sym, a.value):
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={shown(a.value)} does not take "
                              f"(it resolves to {sym.str_value or 'nothing'}); {why_not_taken(kconf, sym)}")


def _raise_on_warnings(kconf, path) -> None:
    if kconf.warnings:
        raise ConfigError(f"{path}: " + "; ".join(w.replace("warning: ", "") for w in kconf.warnings))


def load_strict(config_path, kconfig_path=None):
    """Kconfig with `config_path` loaded, refusing anything that did not take."""
    assignments = parse_assignments(config_path)
    kconf = load_kconfig(kconfig_path)
    load_config_file(kconf, config_path)
    check_assignments_took(kconf, assignments)
    _raise_on_warnings(kconf, config_path)
    return kconf
