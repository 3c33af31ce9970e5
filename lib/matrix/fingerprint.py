"""What a matrix plan was built from, as a fingerprint that changes when behaviour may change, and only then.

    format   FORMAT (a plan fingerprinted another way is reported as such, not as a hundred changes)
    code     {path: sha} of every .py file under gpt2/, lib/ and scripts/ as it is on disk now: the files git
             tracks in a git checkout (`git ls-files`), else every one found; an edited model file, trainer or
             planner changes what a cell does
    kconfig  {symbol or choice: [type, dependencies, prompt conditions, defaults, ranges, selects, implies]},
             read through kconfiglib: what decides the values a configuration takes. Help text and prompt
             wording are left out, so documenting an option does not stop a matrix
    steps    {step id: its overrides} (a step's description is prose)
    sweep    {"axes": "SYMBOL;SYMBOL" in order (it orders the cell names), SYMBOL: "v1,v2,..."}: CONFIG_MATRIX_SWEEP,
             present only when the plan sweeps, so a plan without one keeps its fingerprint
    base     {"config": sha of the base config's assignments, "environment GPT2_X": value, "defconfig NAME": sha}

`make continue` rebuilds the fingerprint from the current tree and refuses when it differs, naming the files,
symbols, steps or base values that changed (lib.matrix.describe.describe_changes); --force goes on anyway.
"""

import hashlib
import subprocess
from pathlib import Path

import kconfiglib

from lib import config as kcfg

FORMAT = 2  # 1: Kconfig files as raw bytes and steps with their descriptions, no code
CODE_DIRS = ("gpt2", "lib", "scripts")


def sha(data) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def _git_files(root: Path):
    """The .py files git tracks under CODE_DIRS, relative to root; None when root is not a git checkout's top."""
    def git(*args):
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top.decode().strip()).resolve() != root.resolve():
        return None
    listed = git("ls-files", "-z", "--", *CODE_DIRS)
    if listed is None:
        return None
    return sorted(name for name in listed.decode().split("\0") if name.endswith(".py"))


def code_fingerprint(root=None) -> dict:
    """{relative path: sha of its bytes} of the source; a tracked file missing from disk is "(deleted)"."""
    root = Path(root or kcfg.REPO_ROOT)
    names = _git_files(root)
    if names is None:  # not a git checkout (an unpacked copy): every source file there is
        names = sorted(str(p.relative_to(root)) for d in CODE_DIRS if (root / d).is_dir()
                       for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts)
    found = {}
    for name in names:
        try:
            found[name] = sha((root / name).read_bytes())
        except FileNotFoundError:
            found[name] = "(deleted)"
    return found


def _expr(expr) -> str:
    return kconfiglib.expr_str(expr)


def _symbol(sym) -> list:
    """What decides a symbol's value, in words; everything but its help and prompt text."""
    parts = [kconfiglib.TYPE_TO_STR[sym.orig_type], f"depends on {_expr(sym.direct_dep)}"]
    parts += [f"prompt if {_expr(node.prompt[1])}" for node in sym.nodes if node.prompt]
    parts += [f"default {_expr(value)} if {_expr(cond)}" for value, cond in sym.defaults]
    parts += [f"range {_expr(low)} {_expr(high)} if {_expr(cond)}" for low, high, cond in sym.ranges]
    parts += [f"select {_expr(target)} if {_expr(cond)}" for target, cond in sym.selects]
    parts += [f"imply {_expr(target)} if {_expr(cond)}" for target, cond in sym.implies]
    if sym.choice is not None:
        parts.append(f"member of {_choice_key(sym.choice)}")
    return parts


def _choice_key(choice) -> str:
    return f"choice {choice.name or '/'.join(sym.name for sym in choice.syms)}"


def _choice(choice) -> list:
    parts = [kconfiglib.TYPE_TO_STR[choice.orig_type], f"depends on {_expr(choice.direct_dep)}",
             "optional" if choice.is_optional else "required", "members " + ",".join(s.name for s in choice.syms)]
    parts += [f"prompt if {_expr(node.prompt[1])}" for node in choice.nodes if node.prompt]
    parts += [f"default {sym.name} if {_expr(cond)}" for sym, cond in choice.defaults]
    return parts


def kconfig_fingerprint(kconfig_path=None) -> dict:
    """{symbol name or "choice ...": [what decides its value]} of the whole Kconfig tree."""
    kconf = kcfg.load_kconfig(kconfig_path)
    found = {sym.name: _symbol(sym) for sym in kconf.unique_defined_syms}
    found.update({_choice_key(choice): _choice(choice) for choice in kconf.unique_choices})
    return found


def steps_fingerprint(steps) -> dict:
    """{step id: its overrides}: what a step sets, not how it is described."""
    return {step.id: {k: str(v) for k, v in step.overrides.items()} for step in steps}


def sweep_fingerprint(axes) -> dict:
    """CONFIG_MATRIX_SWEEP's axes [(symbol, values)] as {"axes": order, symbol: "v1,v2"}: which values each
    symbol takes, and the axes' order, which decides the cells' names and the report's first values."""
    return {"axes": ";".join(name for name, _ in axes), **{name: ",".join(values) for name, values in axes}}


def assignments_sha(values: dict) -> str:
    return sha("\n".join(f"{k}={values[k]}" for k in sorted(values)))
