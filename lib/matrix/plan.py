"""Matrix plan: which cells a study runs and the exact configuration of each.

A matrix preset (CONFIG_MATRIX=y) names its axes:

    MATRIX_STEPS       ablation step ids from lib/config/ablation_steps.yaml (first = baseline)
    MATRIX_SEEDS       seeds, e.g. "1,2,3"
    MATRIX_DEFCONFIGS  optional presets from defconfigs/, each compared as a whole
    MATRIX_SWEEP       optional Kconfig symbols with values, "ATTN_RA_RANK=2,4,8;TRAIN_LR=6e-4,1e-3"
                       (lib/matrix/sweep.py: the syntax and its rules)

A variant is one (defconfig, step, sweep point); a cell is one variant at one seed and runs as one
training run. Its configuration is

    base (.config, or the named defconfig expanded through Kconfig)
      + environment budget overrides (GPT2_MAX_TIME=7200 make ...)
      + the step's overrides
      + the sweep point's values        (they override the step's own)
      + SEED=<seed>, MATRIX=n          (a cell is a single run, never a matrix)
      + extra overrides                 (`check` shrinks the model here)

written by lib.config.write_cell_config, which re-validates the result through
kconfiglib, and read back through the typed settings. Every cell config is written while
planning, so an override or swept value that names an unknown symbol or does not take stops
the plan before any cell runs. Variants whose cells would have the same configuration are
planned once; plan.notes says which, and which steps an axis does not apply to.

The plan also carries a fingerprint of what it was built from (lib/matrix/fingerprint.py:
the source code, the Kconfig symbols, the steps' overrides, the sweep, the base config and
budget environment); resuming a matrix compares fingerprints and says which part changed. It
records the preset and the budget environment it was planned with, so a cell can be trained
again alone: `make defconfig-<preset> && GPT2_MAX_TIME=... make cell CELL=<id>`.
"""

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

from lib import config as kcfg
from lib.config.steps import STEPS_FILE, StepError, select_steps
from lib.matrix import fingerprint as fp
from lib.matrix import sweep as matrix_sweep

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
CELLS_DIR = "cells"
CELL_CONFIG = "cell.config"

# `check`: the smallest run that still goes through every code path of a cell
# (data, model build, optimizer steps, evaluation, checkpoint, metrics).
CHECK_OVERRIDES = {
    "MODEL_SIZE_GPT2_TINY": "y", "MODEL_BLOCK_SIZE": "32", "TRAIN_BATCH_SIZE": "2", "TRAIN_GRAD_ACCUM": "1",
    "TRAIN_MAX_ITERS": "2", "GPT2_MAX_TIME": "0", "TRAIN_EVAL_INTERVAL": "2", "TRAIN_EVAL_BATCHES": "1",
    "TRAIN_LOG_INTERVAL": "1", "TRAIN_CHECKPOINT_INTERVAL": "0", "TORCH_COMPILE": "n", "DATASET_SHAKESPEARE": "y",
}
# Added to CHECK_OVERRIDES when no GPU is visible: one CPU process per cell.
CHECK_CPU_OVERRIDES = {"DEVICE_CPU": "y", "TRAIN_NUM_GPUS": "1"}


class PlanError(Exception):
    """The plan cannot be built; the message names the step, symbol or file at fault."""


@dataclasses.dataclass(frozen=True)
class Cell:
    id: str  # directory name under cells/, e.g. "V1-s2", "V1-ATTN_RA_RANK=8-s2"
    label: str  # console prefix, e.g. "V1/s2", "V1/ATTN_RA_RANK=8/s2"
    variant: str  # what the report compares: Variant.id
    step: str | None
    defconfig: str | None
    seed: int | None
    overrides: dict  # every override applied on the base, in order
    num_gpus: int
    device: str
    max_time_s: int
    max_iters: int
    # torch.compile on: the scheduler starts no second cell of its variant (the same graphs; the seed changes
    # none) until this one's are compiled and cached. False in plans written before this field.
    compiles: bool = False

    def config_path(self, matrix_dir) -> Path:
        return Path(matrix_dir) / CELLS_DIR / self.id / CELL_CONFIG

    def run_dir(self, matrix_dir) -> Path:
        return Path(matrix_dir) / CELLS_DIR / self.id


@dataclasses.dataclass(frozen=True)
class Variant:
    id: str  # "V1", "mini/V1", "V1/ATTN_RA_RANK=8"
    step: str | None
    defconfig: str | None
    description: str
    overrides: dict  # the step's overrides (empty for a bare defconfig)
    sweep: dict = dataclasses.field(default_factory=dict)  # {SYMBOL: value} of the sweep axes that apply

    @property
    def head(self) -> str:
        """The variant without its sweep point: "V1", "mini/V1"."""
        return "/".join(x for x in (self.defconfig, self.step) if x)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    created: str
    base_config: str  # the path the plan was built from (informational)
    variants: list  # [Variant]; the first is the baseline
    seeds: list  # [int] (empty: each cell keeps its config's SEED)
    cells: list  # [Cell], in execution order (seed-major: every step of seed 1 first)
    parallel_cells: int  # MATRIX_PARALLEL (0 = as many as the GPUs allow)
    stop_on_failure: bool
    fingerprint: dict  # lib/matrix/fingerprint.py: {"format", "code", "kconfig", "steps", "base"}
    base_assignments: dict  # {SYMBOL: value} of the base config, to explain changes
    steps_file: str = str(STEPS_FILE)  # where the step definitions were read
    preset: str = ""  # the preset the base config was loaded from ('# preset:' marker; '' when none)
    environment: dict = dataclasses.field(default_factory=dict)  # {GPT2_X: value} baked into every cell
    sweep: list = dataclasses.field(default_factory=list)  # [[SYMBOL, [value, ...]], ...] (MATRIX_SWEEP)
    notes: list = dataclasses.field(default_factory=list)  # what planning decided: unswept steps, merged cells

    @property
    def hash(self) -> str:
        return fp.sha(json.dumps(self.fingerprint, sort_keys=True))

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def cell(self, cell_id) -> Cell:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise PlanError(f"no cell {cell_id!r} in plan {self.name} (cells: {', '.join(c.id for c in self.cells)})")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["format"] = PLAN_FORMAT
        data["hash"] = self.hash
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Plan":
        data = dict(data)
        data.pop("format", None)
        data.pop("hash", None)
        data["variants"] = [Variant(**v) for v in data["variants"]]
        data["cells"] = [Cell(**c) for c in data["cells"]]
        return cls(**data)


def preset_name(config_path, default="matrix") -> str:
    """The preset `make defconfig-NAME` recorded in the .config ('# preset: NAME'), else `default`."""
    try:
        return kcfg.preset_of(config_path) or default
    except OSError:
        return default


def config_values(path) -> dict:
    """{SYMBOL: value} of a .config ("n" for '# CONFIG_X is not set')."""
    return {a.symbol: a.value for a in kcfg.parse_assignments(path)}


def environment_overrides(environ) -> dict:
    """Budget overrides from the environment (GPT2_MAX_TIME=7200 make), baked into every cell.

    GPT2_SEED is left out: the matrix sets each cell's seed.
    """
    overrides = {}
    for variable, symbol in kcfg.ENV_OVERRIDES.items():
        value = (environ.get(variable) or "").strip()
        if value and symbol != "SEED":
            overrides[symbol] = value
    return overrides


def _parse_seeds(raw) -> list:
    seeds = []
    for item in raw:
        if not re.fullmatch(r"\d+", str(item).strip()):
            raise PlanError(f"CONFIG_MATRIX_SEEDS: {item!r} is not a non-negative integer")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise PlanError(f"CONFIG_MATRIX_SEEDS lists a seed twice: {','.join(map(str, seeds))}")
    return seeds


def _cell_names(variant: Variant, seed):
    """(directory name, console label): ("V1-s2", "V1/s2"), ("mini_V1-s2", "mini/V1/s2"),
    ("V1-ATTN_RA_RANK=8-s2", "V1/ATTN_RA_RANK=8/s2")."""
    suffix = "" if seed is None else f"-s{seed}"
    label = variant.id if seed is None else f"{variant.id}/s{seed}"
    head = re.sub(r"[^A-Za-z0-9_.+-]", "-", variant.head.replace("/", "_"))
    return "-".join(x for x in (head, matrix_sweep.cell_part(variant.sweep)) if x) + suffix, label


def build_plan(base_config, out_dir, *, name=None, defconfigs=None, steps_file=STEPS_FILE,
               extra_overrides=None, environ=None, kconfig_path=None, code_root=None) -> Plan:
    """Plan the matrix described by `base_config` and write every cell config under `out_dir`.

    defconfigs: overrides MATRIX_DEFCONFIGS (the CLI's --defconfigs). When the base
    config is not a matrix preset, the defconfigs alone are compared, each with its
    own seed. extra_overrides: applied last to every cell (check mode). code_root: the checkout whose source
    the fingerprint covers (default: the one running).
    Raises PlanError (or ConfigError) before anything runs if a cell config is invalid.
    """
    environ = os.environ if environ is None else environ
    out_dir = Path(out_dir)
    base_config = Path(base_config)
    try:
        base = kcfg.load_settings(base_config, kconfig_path, environ={})
    except kcfg.ConfigError as err:
        raise PlanError(f"base config: {err}") from None
    matrix = base.matrix
    defconfigs = list(matrix.defconfigs if defconfigs is None else defconfigs)
    if not matrix.enabled and not defconfigs:
        raise PlanError(f"{base_config} is not a matrix preset (CONFIG_MATRIX is off) and no defconfigs were "
                        f"named; run `make defconfig-<matrix preset>` or `make matrix DEFCONFIGS=\"a b\"`")
    step_ids = list(matrix.steps) if matrix.enabled else []
    seeds = _parse_seeds(matrix.seeds) if matrix.enabled else []
    if len(set(step_ids)) != len(step_ids):
        raise PlanError(f"CONFIG_MATRIX_STEPS lists a step twice: {','.join(step_ids)}")
    try:
        steps = select_steps(step_ids, steps_file) if step_ids else []
        axes = matrix_sweep.parse_sweep(matrix.sweep) if matrix.enabled else []
        matrix_sweep.check_axes(axes, kconfig_path)
    except (StepError, matrix_sweep.SweepError) as err:
        raise PlanError(str(err)) from None

    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_config, out_dir / "base.config")
    base_values = config_values(base_config)
    env_overrides = environment_overrides(environ)
    environment = {variable: env_overrides[symbol] for variable, symbol in kcfg.ENV_OVERRIDES.items()
                   if symbol in env_overrides}
    fingerprint = {
        "format": fp.FORMAT,
        "code": fp.code_fingerprint(code_root),
        "kconfig": fp.kconfig_fingerprint(kconfig_path),
        "steps": fp.steps_fingerprint(steps),
        "base": {"config": fp.assignments_sha(base_values),
                 **{f"environment {variable}": value for variable, value in environment.items()}},
    }
    if axes:  # only then: a plan without a sweep keeps the fingerprint it had before sweeps existed
        fingerprint["sweep"] = fp.sweep_fingerprint(axes)

    # One base config file per defconfig (or the .config itself).
    bases = {}
    for defconfig in defconfigs or [None]:
        if defconfig is None:
            bases[None] = base_config
            continue
        expanded = out_dir / "bases" / f"{defconfig}.config"
        try:
            kcfg.apply_defconfig(kcfg.preset_path(defconfig), expanded)
        except kcfg.ConfigError as err:
            raise PlanError(f"defconfig {defconfig}: {err}") from None
        bases[defconfig] = expanded
        fingerprint["base"][f"defconfig {defconfig}"] = fp.assignments_sha(config_values(expanded))

    extra = {"MATRIX": "n", **(extra_overrides or {})}
    variants, notes = _variants(defconfigs, steps, axes, bases, env_overrides, extra, kconfig_path)
    cells, variants, merged = _write_cells(out_dir, variants, seeds, bases, env_overrides, extra, kconfig_path)
    return Plan(name=name or preset_name(base_config), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                base_config=str(base_config), variants=variants, seeds=seeds, cells=cells,
                parallel_cells=matrix.parallel_cells, stop_on_failure=matrix.stop_on_failure,
                fingerprint=fingerprint, base_assignments=base_values, steps_file=str(steps_file),
                preset=preset_name(base_config, default=""), environment=environment,
                sweep=[[name, list(values)] for name, values in axes], notes=notes + merged)


def _variants(defconfigs, steps, axes, bases, env_overrides, extra, kconfig_path) -> tuple:
    """([Variant] in plan order, [note]): every (defconfig, step) at each sweep point that applies to it."""
    heads = {}
    for defconfig in defconfigs or [None]:
        for step in steps or [None]:
            own = dict(step.overrides) if step else {}
            heads["/".join(x for x in (defconfig, step.id if step else None) if x)] = (defconfig, step, own)
    try:
        points, notes = matrix_sweep.expand(
            [(head, f"step {step.id}" if step else f"defconfig {defconfig}", bases[defconfig],
              {**env_overrides, **own, **extra}) for head, (defconfig, step, own) in heads.items()], axes, kconfig_path)
    except (kcfg.ConfigError, matrix_sweep.SweepError) as err:
        raise PlanError(str(err)) from None
    variants = []
    for head, point in points:
        defconfig, step, own = heads[head]
        description = step.description if step else kcfg.preset_description(defconfig)
        variant_id = "/".join(x for x in (head, matrix_sweep.point_text(point)) if x)
        variants.append(Variant(variant_id, step.id if step else None, defconfig,
                                matrix_sweep.described(description, own, point), own, point))
    return variants, notes


def _write_cells(out_dir, variants, seeds, bases, env_overrides, extra, kconfig_path) -> tuple:
    """([Cell] seed-major, [Variant] kept, [note]): every cell config written and validated. A variant whose
    cells would have another's configuration (the same assignments) is planned once, as the first of them."""
    cells, kept, merged, first_with, ids = [], list(variants), [], {}, {}
    for index, seed in enumerate(seeds or [None]):
        for variant in list(kept):
            cell_id, label = _cell_names(variant, seed)
            if cell_id in ids:
                raise PlanError(f"cells {ids[cell_id]} and {label} would share the directory {CELLS_DIR}/{cell_id}: "
                                f"their swept values differ only in characters a directory name cannot hold")
            ids[cell_id] = label
            overrides = {**env_overrides, **variant.overrides, **variant.sweep}  # the sweep wins over the step
            if seed is not None:
                overrides["SEED"] = str(seed)
            overrides.update(extra)
            cell_config = out_dir / CELLS_DIR / cell_id / CELL_CONFIG
            culprit = f"step {variant.step}" if variant.step else f"defconfig {variant.defconfig}"
            if variant.sweep:
                culprit += f", {matrix_sweep.WHERE} {matrix_sweep.point_text(variant.sweep, ' ')}"
            try:
                kcfg.write_cell_config(bases[variant.defconfig], overrides, cell_config)
                settings = kcfg.load_settings(cell_config, kconfig_path, environ={})
            except kcfg.ConfigError as err:
                raise PlanError(f"cell {label} ({culprit}): {err}") from None
            if index == 0:  # every seed sets the same SEED on every variant: the first seed decides
                key = tuple(sorted(config_values(cell_config).items()))
                if key in first_with:
                    shutil.rmtree(cell_config.parent)
                    kept.remove(variant)
                    merged.append((variant, first_with[key]))
                    continue
                first_with[key] = variant
            train = settings.train
            cells.append(Cell(cell_id, label, variant.id, variant.step, variant.defconfig, seed, overrides,
                              train.num_gpus, settings.general.device, train.max_time_s, train.max_iters,
                              settings.general.compile))
    return cells, kept, matrix_sweep.merged_notes(merged, variants)


def save_plan(plan: Plan, matrix_dir) -> None:
    from gpt2.io import atomic_write_json

    atomic_write_json(Path(matrix_dir) / PLAN_FILE, plan.to_json())


def load_plan(matrix_dir) -> Plan:
    path = Path(matrix_dir) / PLAN_FILE
    try:
        return Plan.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise PlanError(f"{matrix_dir} is not a matrix directory (no {PLAN_FILE})") from None
