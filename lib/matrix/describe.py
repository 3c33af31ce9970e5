"""A plan in words: what changed between two plans, and the plan as `make check` prints it."""

from lib import config as kcfg
from lib.matrix.plan import Plan, config_values

SHOWN = 12  # changed files or symbols named one by one; the rest are counted


def config_difference(base: dict, other: dict, choice_members=frozenset()) -> list:
    """["SYMBOL=new" or "SYMBOL: old -> new", ...] for every symbol whose value differs.

    Left out as implied: choice members switched off (the member switched on says it),
    and bools that are off on one side and absent (dependency off) on the other.
    """
    off = ("n", "(unset)")
    changes = []
    for symbol in sorted(set(base) | set(other)):
        old, new = base.get(symbol, "(unset)"), other.get(symbol, "(unset)")
        if old == new or (old in off and new in off) or (symbol in choice_members and new in off):
            continue
        changes.append(f"{symbol}={new}" if old in off else f"{symbol}: {old} -> {new}")
    return changes


def choice_members(kconfig_path=None) -> frozenset:
    kconf = kcfg.load_kconfig(kconfig_path)
    return frozenset(sym.name for choice in kconf.choices for sym in choice.syms)


def describe_changes(old: Plan, new: Plan) -> list:
    """What differs between two plans' fingerprints (lib/matrix/fingerprint.py), in words a user can act on."""
    before_format, after_format = old.fingerprint.get("format", 1), new.fingerprint.get("format", 1)
    if before_format != after_format:
        return [f"the plan was fingerprinted by another version of this code (format {before_format}, now "
                f"{after_format}), so what changed cannot be told"]
    changes = []
    for part, describe in (("code", _code_change), ("kconfig", _symbol_change), ("steps", _step_change),
                           ("sweep", _sweep_change)):
        before, after = old.fingerprint.get(part, {}), new.fingerprint.get(part, {})
        found = [describe(key, before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
                 if before.get(key) != after.get(key)]
        changes += found[:SHOWN] + ([f"... and {len(found) - SHOWN} more"] if len(found) > SHOWN else [])
    before, after = old.fingerprint.get("base", {}), new.fingerprint.get("base", {})
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key):
            continue
        if key not in before or key not in after:
            changes.append(f"base {key}: {'new' if key not in before else 'no longer part of the plan'}")
        elif key == "config":
            diff = config_difference(old.base_assignments, new.base_assignments, choice_members())
            shown = "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else "")
            changes.append(f"base config {new.base_config}: {shown or 'comments only'}")
        elif key.startswith("environment"):
            changes.append(f"{key}: {before[key]} -> {after[key]}")
        else:
            changes.append(f"base {key}: changed")
    return changes


def _code_change(path, before, after) -> str:
    state = "new" if before is None else "removed" if after is None or after == "(deleted)" else "changed"
    return f"source file {path}: {state}"


def _symbol_change(name, before, after) -> str:
    what = name if name.startswith("choice ") else f"Kconfig symbol {name}"
    if before is None or after is None:
        return f"{what}: {'new' if before is None else 'removed'}"
    gone = [p for p in before if p not in after]
    added = [p for p in after if p not in before]
    return f"{what}: " + "; ".join([f"was '{p}'" for p in gone] + [f"now '{p}'" for p in added])


def _step_change(step, before, after) -> str:
    if before is None or after is None:
        return f"ablation step {step}: {'new' if before is None else 'no longer part of the plan'}"
    return f"ablation step {step}: " + ("; ".join(config_difference(before, after)) or "changed")


def _sweep_change(key, before, after) -> str:
    what = "CONFIG_MATRIX_SWEEP " + ("axis order" if key == "axes" else key)
    if before is None or after is None:
        return f"{what}: {'new' if before is None else 'no longer swept'}"
    return f"{what}: {before} -> {after}"


def describe_plan(plan: Plan, matrix_dir, parallel: int) -> str:
    """The plan as `check` prints it: cells, config differences, time estimate."""
    base_cell = plan.cells[0]
    base_values = config_values(base_cell.config_path(matrix_dir))
    members = choice_members()
    lines = [f"matrix {plan.name}: {len(plan.variants)} variant(s) x {max(len(plan.seeds), 1)} seed(s) "
             f"= {len(plan.cells)} cells; baseline {plan.baseline.id}"]
    for variant in plan.variants:
        lines.append(f"  {variant.id:<14} {variant.description}")
    if plan.sweep:
        lines.append("sweep (CONFIG_MATRIX_SWEEP), crossed with the steps and seeds: "
                     + "; ".join(f"{name} = {', '.join(values)}" for name, values in plan.sweep))
    lines += [f"  note: {note}" for note in plan.notes]
    lines.append(f"cells (config difference from {base_cell.label}; options a change merely reveals, left at "
                 f"their defaults, are counted, not listed):")
    for cell in plan.cells:
        values = config_values(cell.config_path(matrix_dir))
        diff = config_difference(base_values, values, members)
        revealed = [s for s in values if s not in base_values and s not in cell.overrides]
        quiet = kcfg.symbols_at_default(cell.config_path(matrix_dir), revealed)
        shown = [d for d in diff if d.split("=")[0] not in quiet]
        if len(shown) < len(diff):
            shown.append(f"+{len(diff) - len(shown)} at defaults")
        gpus = "cpu" if cell.device == "cpu" else f"{cell.num_gpus} GPU"
        lines.append(f"  [{cell.label}] {gpus}: " + ("(baseline)" if cell is base_cell else "; ".join(shown) or
                                                     "(identical)"))
    budgets = [c.max_time_s for c in plan.cells]
    if all(budgets):
        total = sum(budgets) / max(parallel, 1)
        each = f"{budgets[0]} s budget" if len(set(budgets)) == 1 else f"budgets summing to {sum(budgets)} s over"
        lines.append(f"time estimate: {each} x {len(plan.cells)} cells / {parallel} at once = "
                     f"{total / 3600:.1f} h ({total:.0f} s) of training, plus start-up and evaluation")
    else:
        lines.append(f"time estimate: no time budget; each cell stops after "
                     f"{max(c.max_iters for c in plan.cells)} iterations")
    return "\n".join(lines)
