"""A plan in words: what changed between two plans, and the plan as `make check` prints it."""

from lib import config as kcfg
from lib.matrix.plan import Plan, choice_members, config_difference, config_values


def describe_changes(old: Plan, new: Plan) -> list:
    """What differs between two plans' fingerprints, in words a user can act on."""
    changes = []
    for part, what in (("kconfig", "Kconfig file"), ("steps", "ablation step"), ("base", "base")):
        before, after = old.fingerprint.get(part, {}), new.fingerprint.get(part, {})
        for key in sorted(set(before) | set(after)):
            if key not in before:
                changes.append(f"{what} {key}: new")
            elif key not in after:
                changes.append(f"{what} {key}: no longer part of the plan")
            elif before[key] != after[key]:
                if part == "base" and key == "config":
                    diff = config_difference(old.base_assignments, new.base_assignments, choice_members())
                    shown = "; ".join(diff[:8]) + (f"; ... {len(diff) - 8} more" if len(diff) > 8 else "")
                    changes.append(f"base config {new.base_config}: {shown or 'comments only'}")
                elif key.startswith("environment"):
                    changes.append(f"{key}: {before[key]} -> {after[key]}")
                else:
                    changes.append(f"{what} {key}: changed")
    return changes


def _at_default(config_path, symbols) -> set:
    """Those of `symbols` whose value in config_path is what Kconfig would pick by itself."""
    kconf = kcfg.load_kconfig()
    kconf.load_config(str(config_path), replace=True)
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


def describe_plan(plan: Plan, matrix_dir, parallel: int) -> str:
    """The plan as `check` prints it: cells, config differences, time estimate."""
    base_cell = plan.cells[0]
    base_values = config_values(base_cell.config_path(matrix_dir))
    members = choice_members()
    lines = [f"matrix {plan.name}: {len(plan.variants)} variant(s) x {max(len(plan.seeds), 1)} seed(s) "
             f"= {len(plan.cells)} cells; baseline {plan.baseline.id}"]
    for variant in plan.variants:
        lines.append(f"  {variant.id:<14} {variant.description}")
    lines.append(f"cells (config difference from {base_cell.label}; options a change merely reveals, left at "
                 f"their defaults, are counted, not listed):")
    for cell in plan.cells:
        values = config_values(cell.config_path(matrix_dir))
        diff = config_difference(base_values, values, members)
        revealed = [s for s in values if s not in base_values and s not in cell.overrides]
        quiet = _at_default(cell.config_path(matrix_dir), revealed)
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
