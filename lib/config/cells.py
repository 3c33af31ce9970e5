"""Overrides on a loaded configuration: a matrix cell's config (base + one step's overrides) and `make set`,
both validated exactly as a .config line would be."""

from lib.config.kconfig import Assignment, ConfigError, check_assignments_took, load_strict, shown, symbol_hint
from lib.config.load import write_config_atomically


def apply_overrides(kconf, assignments) -> None:
    """Set each Assignment's symbol on kconf, in order, and check that every one took.

    Setting a choice member to y replaces any earlier member of the same choice. An unknown symbol (with the
    closest names), a value with control characters, or a value that does not take (out of range, dependency
    off) raises ConfigError naming where the value came from.
    """
    effective = {}
    for a in assignments:
        sym = kconf.syms.get(a.symbol)
        if sym is None or not sym.nodes:
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={shown(a.value)}: unknown symbol"
                              f"{symbol_hint(kconf, a.symbol)}")
        if not a.value.isprintable():  # a newline would split the written .config line in two
            raise ConfigError(f"{a.where()}: CONFIG_{a.symbol}={a.value!r} holds control characters")
        if sym.choice is not None and a.value == "y":
            for other in sym.choice.syms:
                effective.pop(other.name, None)
        effective.pop(a.symbol, None)  # a later value wins, and is checked where it was given
        effective[a.symbol] = a
    for _ in range(2):  # a second pass lets an override enable the dependency of an earlier one
        for a in effective.values():
            kconf.syms[a.symbol].set_value(a.value)
    check_assignments_took(kconf, list(effective.values()))


def write_cell_config(base_config_path, overrides: dict, out_path) -> None:
    """Base config + {SYMBOL: value} overrides, re-validated, written atomically."""
    kconf = load_strict(base_config_path)
    where = f"override of {base_config_path}"
    apply_overrides(kconf, [Assignment(symbol.removeprefix("CONFIG_"), str(value), where, 0)
                            for symbol, value in overrides.items()])
    write_config_atomically(kconf, out_path)
