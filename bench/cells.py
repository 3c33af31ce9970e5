#!/usr/bin/env python
"""Matrix-cell overhead benchmark: what a cell costs around its training budget, and the pool's speed-up.

    python -m scripts.bench_cells [--preset shakespeare-gpu-ra-matrix] [--budget-s 45] [--out-dir results/bench]
    python -m scripts.bench_cells --from DIR1,DIR2      # summarise matrices that already ran (1 GPU, then N)
    python -m scripts.bench_cells --smoke --out-dir /tmp/bench   # CPU: two tiny cells, exercises the code path

Runs the preset's matrix twice through the real runner (`scripts.matrix run --new`), V0 and V1 at seeds 1 and 2,
each cell bounded by --budget-s of training time: first pinned to one GPU, then on every visible GPU. Each run
starts from an empty compiler cache (its own TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR), as on a fresh
machine. From the cells' own records (state.json, metrics.json):

  per cell    wall time (the runner's start to its end) over its budget, compile, start-up, setup, eval,
              checkpoints; the first cell of each variant compiles cold, the later ones find the cache warm
  per run     the matrix command's wall time and the span of its cells; N GPUs over 1 GPU

Goals (issue 17, goal 3): every cell after the first of its variant <= 1.3x its budget in wall time and compiles
in <= 5 s; on N GPUs, a fresh machine's matrix >= 0.9 N times one GPU's speed. Writes
results/bench/cells-<gpu>.md and .json. Without a CUDA GPU (and without --smoke or --from) it says why and exits 0.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.common import name_slug
from gpt2.io import REPO_ROOT, atomic_write_json, atomic_write_text
from lib.matrix.plan import load_plan
from lib.report.markdown import md_table

GOAL_WALL_RATIO = 1.3  # warm cell wall time / its training budget
GOAL_COMPILE_S = 5.0  # warm cell compile
GOAL_SCALING = 0.9  # N GPUs >= 0.9 N x one GPU's speed
MATRIX_SET = "MATRIX_STEPS=V0,V1 MATRIX_SEEDS=1,2 TRAIN_MAX_ITERS=1000000"
SMOKE = {"preset": "cpu-tiny-run", "set": "MATRIX=y MATRIX_STEPS=V0 MATRIX_SEEDS=1,2 TRAIN_MAX_ITERS=1000000",
         "budget_s": 2}


def write_config(path: Path, preset: str, settings: str, results: Path) -> None:
    """The benchmark's .config: the preset, the matrix axes and budget, its own results directory."""
    base = [sys.executable, "-m", "scripts.config", "--config", str(path)]
    for args in (["defconfig", preset], ["set", *settings.split(), f"RESULTS_DIR={results}"]):
        subprocess.run(base + args, cwd=REPO_ROOT, check=True, capture_output=True, text=True)


def run_matrix(config: Path, gpus: str | None, cache: Path) -> tuple[Path, float]:
    """(matrix directory, the command's wall seconds) of one `scripts.matrix run --new` from a cold cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONUNBUFFERED": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scripts.matrix", "run", "--config", str(config), "--new"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"bench-cells: the matrix run failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("matrix ") and "cells done" in line)
    return Path(line.split()[1].rstrip(":")), wall


def cell_rows(matrix_dir: Path) -> list:
    """One row per cell, in start order, from its state.json and metrics.json."""
    rows = []
    for planned in load_plan(matrix_dir).cells:
        cell = planned.run_dir(matrix_dir)
        state = json.loads((cell / "state.json").read_text())
        m = json.loads((cell / "metrics.json").read_text())
        rows.append({"cell": cell.name, "variant": planned.variant, "gpus": state["gpus"],
                     "start": state["started_at"], "end": state["finished_at"],
                     "wall_s": state["finished_at"] - state["started_at"], "budget_s": m["budget"]["max_time_s"],
                     "train_s": m["train_time_s"], "compile_s": m["compile_time_s"], "eval_s": m["eval_time_s"],
                     "checkpoint_s": m["checkpoint_time_s"], "startup_s": m["overhead"]["startup_s"],
                     "setup_s": m["overhead"]["setup_s"], "setup_parts_s": m["overhead"].get("setup_parts_s") or {},
                     "other_s": m["overhead"]["other_s"]})
    rows.sort(key=lambda r: r["start"])
    seen = set()
    for r in rows:
        r["first_of_variant"] = r["variant"] not in seen
        seen.add(r["variant"])
        r["wall_over_budget"] = r["wall_s"] / r["budget_s"] if r["budget_s"] else None
    return rows


def summarize(matrix_dir: Path, command_wall_s: float | None) -> dict:
    rows = cell_rows(matrix_dir)
    gpus = sorted({g for r in rows for g in r["gpus"].split(",") if g})
    started = datetime.fromtimestamp(min(r["start"] for r in rows), timezone.utc).isoformat(timespec="seconds")
    return {"dir": str(matrix_dir), "gpus": len(gpus), "cells": rows, "command_wall_s": command_wall_s, "started": started,
            "span_s": max(r["end"] for r in rows) - min(r["start"] for r in rows)}


def evaluate(runs: list) -> dict:
    """Goal verdicts over the runs (the first on one GPU, the last on N)."""
    warm = [r for run in runs for r in run["cells"] if not r["first_of_variant"]]
    goals = {}
    if warm:
        worst = max(r["wall_over_budget"] for r in warm)
        goals[f"cells after the first of their variant <= {GOAL_WALL_RATIO}x their budget"] = {
            "value": worst, "met": worst <= GOAL_WALL_RATIO, "median": statistics.median(r["wall_over_budget"] for r in warm)}
        slowest = max(r["compile_s"] for r in warm)
        goals[f"their compile <= {GOAL_COMPILE_S:.0f} s"] = {"value": slowest, "met": slowest <= GOAL_COMPILE_S}
    if len(runs) > 1 and runs[-1]["gpus"] > runs[0]["gpus"]:
        n = runs[-1]["gpus"] / runs[0]["gpus"]
        for key, what in (("span_s", "cells' span"), ("command_wall_s", "matrix command")):
            if runs[0][key] and runs[-1][key]:
                speedup = runs[0][key] / runs[-1][key]
                goals[f"{runs[-1]['gpus']} GPUs >= {GOAL_SCALING} x {n:.0f} x one GPU's speed ({what})"] = {
                    "value": speedup, "met": speedup >= GOAL_SCALING * n}
    return goals


def render(report: dict) -> str:
    lines = [f"# Matrix-cell overhead: {report['device']}", "",
             f"{report['date']}. {report['what']}", ""]
    for run in report["runs"]:
        walls = f"matrix command {run['command_wall_s']:.0f} s, " if run["command_wall_s"] else ""
        lines += [f"## {run['gpus'] or 'no'} GPU(s)", "",
                  f"`{Path(run['dir']).name}`, started {run['started']}: {walls}cells' span {run['span_s']:.0f} s.", ""]
        lines.append(md_table(
            ["cell", "GPUs", "first of its variant", "wall s", "budget s", "wall / budget", "start-up s", "setup s",
             "compile s", "eval s", "checkpoints s", "logs/records s", "setup by phase s"],
            [[r["cell"], r["gpus"], "yes" if r["first_of_variant"] else "no", f"{r['wall_s']:.1f}",
              f"{r['budget_s']}", f"{r['wall_over_budget']:.3f}x", f"{r['startup_s']:.1f}", f"{r['setup_s']:.1f}",
              f"{r['compile_s']:.1f}", f"{r['eval_s']:.1f}", f"{r['checkpoint_s']:.1f}", f"{r['other_s']:.1f}",
              ", ".join(f"{k} {v:.1f}" for k, v in r.get("setup_parts_s", {}).items() if v >= 0.05) or "-"]
             for r in run["cells"]]))
        lines.append("")
    lines += ["## Goals", "", md_table(["goal", "measured", "verdict"],
                                       [[name, f"{g['value']:.3f}", "met" if g["met"] else "missed"]
                                        for name, g in report["goals"].items()]), ""]
    lines += ["Wall time is the runner's: from starting the cell's process to its end. The training time inside it "
              "is the budget. The cells' span runs from the first cell's start to the last one's end; the matrix "
              "command adds planning and the report.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shakespeare-gpu-ra-matrix")
    parser.add_argument("--budget-s", type=int, default=45, help="training time per cell (GPT2_MAX_TIME)")
    parser.add_argument("--out-dir", default="results/bench")
    parser.add_argument("--from", dest="from_dirs", default=None, metavar="DIRS",
                        help="comma-separated matrix directories that already ran (one GPU first): summarise them")
    parser.add_argument("--command-walls", default=None, metavar="SECONDS",
                        help="with --from: each matrix command's wall seconds, comma-separated, as timed where it ran")
    parser.add_argument("--smoke", action="store_true", help="CPU: two tiny cells of cpu-tiny-run, 2 s each")
    args = parser.parse_args(argv)

    if args.from_dirs:
        dirs = [Path(d) for d in args.from_dirs.split(",")]
        walls = [float(w) for w in args.command_walls.split(",")] if args.command_walls else [None] * len(dirs)
        if len(walls) != len(dirs):
            parser.error(f"--command-walls has {len(walls)} value(s) for {len(dirs)} director(ies)")
        runs = [summarize(d, w) for d, w in zip(dirs, walls)]
        device = json.loads((next((dirs[0] / "cells").iterdir()) / "metrics.json").read_text())["device"]
        what = (f"Summarised from matrices that already ran ({', '.join(d.name for d in dirs)})"
                + ("; their command wall times as timed where they ran." if args.command_walls else
                   "; their command wall times were not recorded."))
    else:
        import torch

        if not torch.cuda.is_available() and not args.smoke:
            print("bench-cells: no CUDA GPU visible, skipping (the cells train on GPUs; --smoke runs two tiny CPU "
                  "cells)")
            return 0
        preset, settings, budget = ((SMOKE["preset"], SMOKE["set"], SMOKE["budget_s"]) if args.smoke
                                    else (args.preset, MATRIX_SET, args.budget_s))
        n = 0 if args.smoke else torch.cuda.device_count()
        device = "cpu" if args.smoke else torch.cuda.get_device_name(0)
        runs = []
        with tempfile.TemporaryDirectory(prefix="bench-cells-") as tmp:
            tmp = Path(tmp)
            config = tmp / "bench.config"
            write_config(config, preset, f"{settings} GPT2_MAX_TIME={budget}", tmp / "results")
            # One GPU, then all of them; CUDA_VISIBLE_DEVICES left alone on the CPU (smoke).
            pinnings = ["0"] + ([",".join(map(str, range(n)))] if n > 1 else []) if n else [None]
            for gpus in pinnings:
                matrix_dir, wall = run_matrix(config, gpus, tmp / f"cache-{len(runs)}")
                runs.append(summarize(matrix_dir, wall))
                print(f"{runs[-1]['gpus']} GPU(s): matrix {wall:.0f} s, cells' span {runs[-1]['span_s']:.0f} s",
                      flush=True)
        what = (f"Preset {preset} with {settings}, {budget} s of training per cell, run by `scripts.matrix run` "
                f"from an empty compiler cache, on one GPU and then on all {n}." if not args.smoke else
                f"Smoke run: preset {preset}, {settings}, {budget} s per cell, on the CPU: numbers mean nothing.")
    report = {"device": device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "what": what,
              "runs": runs, "goals": evaluate(runs)}
    slug = "cpu-smoke" if args.smoke else name_slug(device) + (
        f"-x{runs[-1]['gpus']}" if runs[-1]["gpus"] > 1 else "")
    stem = Path(args.out_dir) / f"cells-{slug}"
    atomic_write_json(stem.with_suffix(".json"), report)
    atomic_write_text(stem.with_suffix(".md"), render(report))
    for name, g in report["goals"].items():
        print(f"{name}: {g['value']:.3f} ({'met' if g['met'] else 'missed'})")
    print(f"-> {stem}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
