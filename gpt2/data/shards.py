"""A streamed corpus tokenised by parallel processes into shards that survive an interruption.

Layout of a shard directory (<prepared dir>/shards/, removed once train.bin/val.bin are in place):
  plan.json     what the shards are made of (source, tokenizer, shard size, format); a different plan
                wipes the directory
  000123.bin    shard 123: the token ids of its documents, each followed by end-of-text, in stream order
  000123.json   its record (documents, tokens, characters, sha256 of its texts), written after the .bin

Shard k holds the documents after shard k-1's, until it has shard_chars characters (at least one
document). The boundaries depend on the stream and shard_chars alone, never on the process count, so
N processes write the bytes one process writes, and a rerun after a kill finds every shard that was
finished. A finished shard is reused only when the stream gives it the same texts again (sha256).
"""

import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from gpt2.data.tokenizer import get_tokenizer
from gpt2.io import atomic_path, atomic_write_text

PLAN_FILE = "plan.json"
CHARS_PER_TOKEN_GUESS = 4.0  # GPT-2 BPE on English web text: about 4.3; guessing low submits less ahead
PROGRESS_INTERVAL_S = 30.0  # between progress lines when stderr is not a terminal


@dataclass(frozen=True)
class ShardRecord:
    index: int
    documents: int
    tokens: int
    chars: int
    texts_sha256: str


@dataclass
class ShardStats:
    workers: int
    shards_reused: int = 0
    documents_reused: int = 0
    shards_tokenized: int = 0
    documents_tokenized: int = 0
    seconds: float = 0.0


def usable_cores() -> int:
    """The cores this process may run on (a Slurm or taskset allocation, not the whole machine)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int) -> int:
    """CONFIG_DATA_PREP_WORKERS: 0 means every usable core."""
    if requested < 0:
        raise ValueError(f"CONFIG_DATA_PREP_WORKERS={requested} must be 0 (all usable cores) or a positive count")
    return requested or usable_cores()


def default_shard_chars(token_cap: int) -> int:
    """About 256 shards per preparation (a fine grain for a pool of workers, few files), 1-16 MiB of text
    each: two shards per worker wait in memory, and 16 MiB bounds that at about 32 MiB a worker."""
    return int(min(max(token_cap * CHARS_PER_TOKEN_GUESS / 256, 1 << 20), 1 << 24))


def texts_sha256(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")  # NUL-terminated: ["ab", "c"] and ["a", "bc"] differ
    return digest.hexdigest()


def shard_groups(texts: Iterable[str], shard_chars: int) -> Iterator[list[str]]:
    """The stream cut into consecutive groups of documents of at least shard_chars characters (the last: any)."""
    group, chars = [], 0
    for text in texts:
        group.append(text)
        chars += len(text)
        if chars >= shard_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


class ShardStore:
    """The shard files of one preparation: finished records, and the token ids they vouch for."""

    def __init__(self, directory: Path, plan: dict, dtype: np.dtype):
        self.directory, self.plan, self.dtype = Path(directory), plan, np.dtype(dtype)

    def open(self) -> None:
        """Create the directory for plan, wiping shards of another plan and temporaries of a killed writer."""
        plan_path = self.directory / PLAN_FILE
        if self.directory.exists():
            try:
                current = json.loads(plan_path.read_text()) == self.plan
            except (OSError, json.JSONDecodeError):
                current = False
            if not current:
                self.remove()
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink()
        if not plan_path.exists():
            atomic_write_text(plan_path, json.dumps(self.plan, indent=2, sort_keys=True) + "\n")

    def remove(self) -> None:
        if self.directory.exists():
            for path in self.directory.iterdir():
                path.unlink()
            self.directory.rmdir()

    def paths(self, index: int) -> tuple[Path, Path]:
        stem = self.directory / f"{index:06d}"
        return stem.with_suffix(".bin"), stem.with_suffix(".json")

    def finished(self, index: int, texts: list[str]) -> ShardRecord | None:
        """The record of shard index if it was finished from these same texts, else None."""
        bin_path, record_path = self.paths(index)
        if not record_path.exists():
            return None  # the common case, decided without hashing the texts
        try:
            record = ShardRecord(**json.loads(record_path.read_text()))
            size = bin_path.stat().st_size
        except (OSError, json.JSONDecodeError, TypeError):
            return None
        if size != record.tokens * self.dtype.itemsize or record.texts_sha256 != texts_sha256(texts):
            return None
        return record

    def tokens(self, record: ShardRecord) -> np.ndarray:
        return np.fromfile(self.paths(record.index)[0], dtype=self.dtype)


# ----------------------------------------------------------------------------- worker side

_tokenizers = {}  # name -> tokenizer, built once per process


def _tokenizer(name: str):
    if name not in _tokenizers:
        _tokenizers[name] = get_tokenizer(name)
    return _tokenizers[name]


def _init_worker(parent_pid: int, tokenizer_name: str) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (and lets running shards finish).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # A worker whose parent was killed (kill -9, OOM) would wait on its task queue forever: leave instead.
    def exit_when_orphaned():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    _tokenizer(tokenizer_name)  # as the worker starts, not when its first shard is already waiting


def tokenize_shard(store: ShardStore, index: int, texts: list[str], tokenizer_name: str) -> ShardRecord:
    """Tokenise one shard's texts (each + end-of-text) and write its .bin, then its record; both atomic.
    The texts are hashed here too, in the worker, so the process reading the stream only reads."""
    tokenizer = _tokenizer(tokenizer_name)
    parts = []  # one array per document: a shard-long list of Python ints would take 36 bytes a token
    for text in texts:
        ids = tokenizer.encode(text)
        ids.append(tokenizer.eot_token)
        parts.append(np.asarray(ids, dtype=store.dtype))
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=store.dtype)
    bin_path, record_path = store.paths(index)
    with atomic_path(bin_path) as tmp:
        tokens.tofile(tmp)
    record = ShardRecord(index, len(texts), len(tokens), sum(map(len, texts)), texts_sha256(texts))
    atomic_write_text(record_path, json.dumps(asdict(record)) + "\n")
    return record


class TokenizerPool:
    """Where shards are tokenised: workers spawned processes (a fork would copy the streaming client's
    threads and locks), or this process when workers == 1, the reference the parallel path must equal
    byte for byte.

    The processes start when the pool is entered, and each loads the tokenizer as it starts: their
    start-up (Python, numpy and the BPE, about 0.5 s) runs while this process loads its own (.tokenizer)
    and reads the first shards' texts from the stream.
    """

    def __init__(self, tokenizer_name: str, workers: int):
        self.tokenizer_name, self.workers = tokenizer_name, workers
        self.executor = None
        self.tokenizer = None

    def __enter__(self) -> "TokenizerPool":
        if self.workers > 1:
            self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn"),
                                                initializer=_init_worker,
                                                initargs=(os.getpid(), self.tokenizer_name))
            # A spawn pool starts a process at each submit that finds none idle, so one empty task per
            # worker starts them all now instead of one by one as the first shards arrive.
            for _ in range(self.workers):
                self.executor.submit(os.getpid)
        self.tokenizer = _tokenizer(self.tokenizer_name)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.executor is not None:
            # Without waiting: the processes take about 0.1 s to exit (a spawned child tears its interpreter
            # down), which overlaps the caller's next step; build_shards waited for the shards it started.
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def submit(self, store: ShardStore, index: int, texts: list[str]) -> Future | ShardRecord:
        """Shard index tokenised: a Future of its record in the pool, the record itself in this process."""
        args = (store, index, texts, self.tokenizer_name)
        return self.executor.submit(tokenize_shard, *args) if self.executor else tokenize_shard(*args)


# ----------------------------------------------------------------------------- the driver


def build_shards(texts: Iterable[str], store: ShardStore, pool: TokenizerPool, *, shard_chars: int,
                 need_tokens: int, enough: Callable[[list[ShardRecord]], bool],
                 label: str = "tokenize") -> tuple[list[ShardRecord], ShardStats]:
    """Tokenise the stream shard by shard in pool until enough(finished records, in stream order) holds
    or the stream ends; returns those records and what was reused and tokenised.

    With worker processes, this process reads the stream while they tokenise. It submits only while
    the tokens finished and in flight (estimated from their characters) fall short of need_tokens, and
    keeps at most two shards per worker in flight, so little is tokenised past the end.
    """
    stats = ShardStats(workers=pool.workers)
    started = time.perf_counter()
    in_flight = 1 if pool.workers == 1 else 2 * pool.workers
    groups = enumerate(shard_groups(texts, shard_chars))
    pending: deque = deque()  # (chars, Future or ShardRecord, reused), in stream order
    finished: list[ShardRecord] = []
    done_tokens = done_chars = 0
    progress = Progress(need_tokens, label)
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < in_flight:
                chars_per_token = done_chars / done_tokens if done_tokens else CHARS_PER_TOKEN_GUESS
                if pending and done_tokens + sum(entry[0] for entry in pending) / chars_per_token >= need_tokens:
                    break
                group = next(groups, None)
                if group is None:
                    exhausted = True
                    break
                index, shard_texts = group
                chars = sum(map(len, shard_texts))
                kept = store.finished(index, shard_texts)
                if kept is not None:
                    pending.append((chars, kept, True))
                    continue
                pending.append((chars, pool.submit(store, index, shard_texts), False))
            if not pending:
                break  # the stream ended
            _, head, reused = pending.popleft()
            record = head.result() if isinstance(head, Future) else head
            # Counted here, in stream order: shards past the end that were cancelled or thrown away are not.
            if reused:
                stats.shards_reused += 1
                stats.documents_reused += record.documents
            else:
                stats.shards_tokenized += 1
                stats.documents_tokenized += record.documents
            finished.append(record)
            done_tokens, done_chars = done_tokens + record.tokens, done_chars + record.chars
            progress.update(record.tokens)
            if enough(finished):
                break
    finally:
        progress.close()
        # Shards past the end (or all, when interrupted): those not started never run; running ones finish,
        # so that no worker writes into the store once this returns, and are kept for a rerun.
        futures = [entry[1] for entry in pending if isinstance(entry[1], Future)]
        wait([future for future in futures if not future.cancel()])
    stats.seconds = time.perf_counter() - started
    return finished, stats


class Progress:
    """Tokens done of need, the rate and the ETA: tqdm's bar on a terminal; elsewhere (make > log, a batch
    job) a plain line every PROGRESS_INTERVAL_S, which a log file keeps readable."""

    def __init__(self, need_tokens: int, label: str):
        self.need, self.label, self.done = need_tokens, label, 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=need_tokens, unit="tok", unit_scale=True, desc=label, dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        tokens = max(0, min(tokens, self.need - self.done))  # the last shard overshoots the need
        self.done += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        elif time.monotonic() - self.last_line >= PROGRESS_INTERVAL_S:
            self.last_line = time.monotonic()
            say(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = tqdm.format_interval((self.need - self.done) / rate) if rate > 0 else "?"
        return (f"{self.label}: {self.done:,}/{self.need:,} tokens ({self.done / self.need:.0%}), "
                f"{rate:,.0f} tokens/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_stats(stats: ShardStats, tokens: int) -> str:
    rate = tokens / stats.seconds if stats.seconds > 0 else float("inf")
    reused = (f"; reused {stats.shards_reused} finished shards ({stats.documents_reused:,} documents) "
              f"of an interrupted run" if stats.shards_reused else "")
    return (f"tokenized {stats.documents_tokenized:,} documents in {stats.shards_tokenized} shards with "
            f"{stats.workers} process(es) in {stats.seconds:.1f} s ({rate:,.0f} tokens/s over {tokens:,} tokens)"
            f"{reused}")


def say(line: str) -> None:
    """A progress note for the person running the preparation (stderr, beside tqdm's bar)."""
    print(line, file=sys.stderr, flush=True)
