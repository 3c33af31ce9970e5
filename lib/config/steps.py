"""Ablation steps: lib/config/ablation_steps.yaml -> Step records (the only reader of that file)."""

from dataclasses import dataclass
from pathlib import Path

import yaml

STEPS_FILE = Path(__file__).resolve().parent / "ablation_steps.yaml"


class StepError(ValueError):
    pass


@dataclass(frozen=True)
class Step:
    id: str
    description: str
    overrides: dict  # {SYMBOL: value as written in a .config, without quotes}; extends resolved
    extends: str = ""  # the step this one builds on
    own: dict = None  # only the symbols this step itself sets


def _as_config_value(value) -> str:
    # YAML turns y/n into strings but true/false into bools and 4 into an int.
    if isinstance(value, bool):
        return "y" if value else "n"
    return str(value)


def load_steps(path: Path = STEPS_FILE) -> dict:
    """All steps in file order, with `extends` chains resolved."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise StepError(f"{path}: expected a mapping of step ids")

    def resolve(step_id, seen):
        if step_id in seen:
            raise StepError(f"{path}: step {step_id} extends itself through {' -> '.join(seen)}")
        entry = raw[step_id]
        unknown = set(entry) - {"description", "extends", "set"}
        if unknown or "description" not in entry:
            raise StepError(f"{path}: step {step_id} needs 'description' and may have 'extends', 'set'"
                            f" (unexpected: {sorted(unknown)})")
        overrides = {}
        parent = entry.get("extends")
        if parent is not None:
            if parent not in raw:
                raise StepError(f"{path}: step {step_id} extends unknown step {parent}")
            overrides.update(resolve(parent, seen + [step_id]))
        for symbol, value in (entry.get("set") or {}).items():
            overrides[symbol.removeprefix("CONFIG_")] = _as_config_value(value)
        return overrides

    def own(step_id):
        return {k.removeprefix("CONFIG_"): _as_config_value(v) for k, v in (raw[step_id].get("set") or {}).items()}

    return {sid: Step(sid, raw[sid]["description"], resolve(sid, []), raw[sid].get("extends") or "", own(sid))
            for sid in raw}


def select_steps(ids, path: Path = STEPS_FILE) -> list:
    """The named steps, in the order given; unknown ids are an error listing the known ones."""
    steps = load_steps(path)
    missing = [i for i in ids if i not in steps]
    if missing:
        raise StepError(f"unknown ablation step(s) {', '.join(missing)}; known: {', '.join(steps)}")
    return [steps[i] for i in ids]
