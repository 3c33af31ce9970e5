"""A matrix cell's configuration: a base .config plus one step's overrides, re-validated."""

from lib.config.kconfig import Assignment, ConfigError, check_assignments_took, load_strict
from lib.config.load import write_config_atomically


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
    where = f"override of {base_config_path}"
    check_assignments_took(kconf, [Assignment(s, v, where, 0) for s, v in effective.items()])
    write_config_atomically(kconf, out_path)
