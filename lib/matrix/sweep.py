"""CONFIG_MATRIX_SWEEP: any Kconfig symbol as a further axis of the matrix, crossed with the steps and seeds.

    CONFIG_MATRIX_SWEEP="ATTN_RA_RANK=2,4,8;TRAIN_LR=6e-4,1e-3"

Axes are separated by ';', each is SYMBOL=value,value,... (the CONFIG_ prefix is optional; spaces around names
and values are ignored). Values are written as a .config writes them, never quoted: y/n, integers, strings
(TRAIN_LR=6e-4). The syntax needs no double quote or backslash, so the string stands as it is between a
Kconfig string's quotes (and in `make set ARGS='MATRIX_SWEEP="..."'`); a value cannot hold , ; " or \\.

The rules, applied while planning (lib/matrix/plan.py):
  product    each step runs at every point of the axes' product (the first axis varies slowest)
  override   swept values are applied after the step's overrides and the environment's budget, so a swept
             value overrides a step's own one (V1 sets ATTN_RA_RANK=4; swept 2,4,8, V1 runs at 2, 4 and 8)
  applies    an axis applies to a step when its symbol is visible in that step's configuration (Kconfig: its
             dependencies are on). Where it is not (ATTN_RA_RANK under V0's SDPA: no rank to set), the step
             runs once, unswept by that axis, and the plan says so. An axis that applies to no step is an
             error: a sweep that changes nothing would look like a result
  once       variants whose cells would have the same configuration are planned once (plan.py says which)
  valid      every value is validated through Kconfig and the typed settings when its cells are written, so a
             bad value stops the plan in one line naming the symbol and the value

A swept variant's id is "<step>/SYMBOL=value/...", its cells' directories "<step>-SYMBOL=value-...-s<seed>"
(`make cell CELL=V1-ATTN_RA_RANK=8-s2`: make splits a command-line assignment at its first '=').
"""

import itertools
import re

from lib import config as kcfg
from lib.config.cells import apply_overrides
from lib.config.kconfig import Assignment, ConfigError, unknown_symbol, why_not_taken

SWEEP_SYMBOL = "MATRIX_SWEEP"
WHERE = f"CONFIG_{SWEEP_SYMBOL}"
EXAMPLE = '"ATTN_RA_RANK=2,4,8;TRAIN_LR=6e-4,1e-3"'
# Characters a cell directory name keeps: '=' makes "ATTN_RA_RANK=8" readable and is safe in a file name.
UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]")


class SweepError(ValueError):
    """A sweep that cannot be planned; the message is one line naming the symbol and value at fault."""


def parse_sweep(text) -> list:
    """'A=1,2;B=x' -> [("A", ("1", "2")), ("B", ("x",))]. Syntax only; symbols are checked by check_axes."""
    axes = []
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue  # "A=1,2;" or an empty sweep
        name, equals, listed = part.partition("=")
        name = name.strip().removeprefix("CONFIG_")
        if not equals or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise SweepError(f'{WHERE}: "{part}" is not SYMBOL=value,value,...; write e.g. {EXAMPLE}')
        values = tuple(v.strip() for v in listed.split(","))
        if not all(values):
            raise SweepError(f'{WHERE}: {name}={listed.strip()} has an empty value; separate values with one ","')
        odd = [v for v in values if not v.isprintable() or '"' in v or "\\" in v]
        if odd:
            raise SweepError(f"{WHERE}: {name}={odd[0]!r}: a swept value cannot hold quotes, backslashes or "
                             f"control characters")
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise SweepError(f"{WHERE}: {name} lists {twice[0]} twice")
        if any(other == name for other, _ in axes):
            raise SweepError(f"{WHERE}: {name} is swept twice; give all its values in one SYMBOL=v1,v2,...")
        axes.append((name, values))
    return axes


def check_axes(axes, kconfig_path=None) -> None:
    """Every axis names a known symbol (else the closest names) that is not one of the matrix's own."""
    kconf = kcfg.load_kconfig(kconfig_path)
    for name, _ in axes:
        sym = kconf.syms.get(name)
        if sym is None or not sym.nodes:
            raise SweepError(f"{WHERE}: {unknown_symbol(kconf, name)}")
        if name == "SEED":
            raise SweepError(f"{WHERE}: SEED is an axis already; list seeds in CONFIG_MATRIX_SEEDS")
        if name == "MATRIX" or name.startswith("MATRIX_"):
            raise SweepError(f"{WHERE}: CONFIG_{name} configures the matrix itself; it cannot be swept")


def step_points(axes, base_config, overrides: dict, kconfig_path=None) -> tuple:
    """([point], {SYMBOL: why it does not apply}) for one step: each point {SYMBOL: value} holds the axes that
    apply to the step, distinct points in product order ([{}] without axes). overrides: everything the step's
    cells get besides the sweep (budget, step, MATRIX=n, check's); a bad one raises ConfigError."""
    if not axes:
        return [{}], {}
    names = [name for name, _ in axes]
    points, skipped = [], {}
    for values in itertools.product(*(values for _, values in axes)):
        kconf = kcfg.load_strict(base_config, kconfig_path)
        apply_overrides(kconf, [Assignment(s, str(v), f"override of {base_config}", 0) for s, v in overrides.items()])
        for _ in range(2):  # a second pass: one swept value may turn on another's dependency
            for name, value in zip(names, values):
                kconf.syms[name].set_value(value)
        point = {}
        for name, value in zip(names, values):
            sym = kconf.syms[name]
            if sym.visibility:
                point[name] = value
            else:
                skipped.setdefault(name, why_not_taken(kconf, sym))
        if point not in points:  # an axis that does not apply collapses its values into one point
            points.append(point)
    return points, skipped


def expand(heads, axes, kconfig_path=None) -> tuple:
    """([(head, point)] in plan order, [note]) for heads [(head, culprit, base config, overrides)]: each head at
    every point of the axes that apply to it. A bad override raises ConfigError naming head and culprit; an axis
    that applies to no head raises SweepError (nothing would be swept by it)."""
    found, notes, applied, reasons = [], [], set(), {}
    for head, culprit, base_config, overrides in heads:
        try:
            points, skipped = step_points(axes, base_config, overrides, kconfig_path)
        except ConfigError as err:
            raise ConfigError(f"{head} ({culprit}): {err}") from None
        for name, why in skipped.items():
            reasons.setdefault(name, why)
            if not any(name in point for point in points):
                notes.append(f"{head}: CONFIG_{name} does not apply ({why}), so {head} is not swept over it (it "
                             f"runs once for all its values)")
        found += [(head, point) for point in points]
        applied.update(name for point in points for name in point)
    for name, _ in axes:
        if name not in applied:
            why = f" ({reasons[name]})" if name in reasons else ""
            raise SweepError(f"{WHERE}: CONFIG_{name} applies to none of the steps{why}")
    return found, notes


def described(description: str, own: dict, point: dict) -> str:
    """A step's description with the point it runs at; a value that replaces the step's own says so."""
    if not point:
        return description
    return f"{description}; swept " + ", ".join(
        f"{name}={value}" + (f" (not the step's {own[name]})" if own.get(name, value) != value else "")
        for name, value in point.items())


def point_text(point: dict, sep="/") -> str:
    return sep.join(f"{name}={value}" for name, value in point.items())


def cell_part(point: dict) -> str:
    """The point as part of a cell directory name: "ATTN_RA_RANK=8-TRAIN_LR=1e-3"."""
    return "-".join(UNSAFE.sub("-", f"{name}={value}") for name, value in point.items())


def merged_notes(merged, variants) -> list:
    """One note per step merged into another: merged [(variant, the variant planned in its place)]."""
    groups = {}
    for variant, into in merged:
        groups.setdefault((variant.head, into.head), []).append((variant, into))
    notes = []
    for (head, into_head), pairs in groups.items():
        if any(variant.sweep != into.sweep for variant, into in pairs):
            notes += [f"{v.id} has the configuration of {i.id}: planned once, as {i.id}" for v, i in pairs]
            continue
        points = [variant.sweep for variant, _ in pairs]
        every = len(pairs) == sum(v.head == head for v in variants)
        where = "" if not points[0] else " at every swept value" if every else \
            " at " + ", ".join(point_text(point) for point in points)
        notes.append(f"{head} has the configuration of {into_head}{where}: planned once, as {into_head}")
    return notes
