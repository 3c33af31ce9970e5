"""Where train and val fall in a tokenised stream, and the two files cut from its shards.

The stream's tokens, concatenated in order, are t_0 t_1 ... (every document followed by end-of-text).
With cap C and val cap V:
  train = t[0 : C]          the document holding t_{C-1} is truncated there, the rest of it dropped
  val   = t[E : E + V]      E = the end of that document, so val starts with a whole document
                            and the document holding t_{E+V-1} is truncated there
A split that the stream is too short to fill takes what there is (val may then be empty). Documents
never span shards, so every document end is the position after an end-of-text token.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2.data.shards import ShardRecord, ShardStore


@dataclass(frozen=True)
class StreamCut:
    train: tuple[int, int]  # [begin, end) in stream token positions
    val: tuple[int, int]
    documents: dict  # {"train": documents begun in train, "val": documents begun in val}
    shards_used: int  # leading shards the two ranges read
    texts_sha256: str  # sha256 over the used shards' text digests: what the stream delivered

    @property
    def tokens(self) -> dict:
        return {"train": self.train[1] - self.train[0], "val": self.val[1] - self.val[0]}


class _Stream:
    """Stream positions over the shards: offsets, and document ends found from end-of-text tokens."""

    def __init__(self, records: list[ShardRecord], store: ShardStore, eot_token: int):
        self.records, self.store, self.eot = records, store, eot_token
        self.starts = np.concatenate([[0], np.cumsum([r.tokens for r in records])]).astype(np.int64)
        self.docs_before = np.concatenate([[0], np.cumsum([r.documents for r in records])]).astype(np.int64)
        self.total = int(self.starts[-1])

    def shard_of(self, position: int) -> int:
        """Index in records of the shard holding token position (0 <= position < total)."""
        return int(np.searchsorted(self.starts, position, side="right")) - 1

    def ends_in(self, shard: int) -> np.ndarray:
        """Stream positions just after each end-of-text of shard: where its documents end."""
        tokens = self.store.tokens(self.records[shard])
        return np.flatnonzero(tokens == self.eot).astype(np.int64) + 1 + self.starts[shard]

    def ends_before(self, position: int, inclusive: bool = False) -> int:
        """How many documents end before (or at) position, for 0 < position <= total."""
        shard = self.shard_of(position - 1)
        ends = self.ends_in(shard)
        return int(self.docs_before[shard] + np.searchsorted(ends, position, side="right" if inclusive else "left"))


def cut_stream(records: list[ShardRecord], store: ShardStore, eot_token: int, cap: int, val_cap: int,
               final: bool) -> StreamCut | None:
    """The cut for records (the leading shards, in order). Not final: None until they hold both splits
    whole. Final (the stream ended): the cut of what there is."""
    stream = _Stream(records, store, eot_token)
    if stream.total < cap:
        if not final:
            return None
        train_end = val_begin = val_end = stream.total
    else:
        train_end = cap
        crossing = stream.shard_of(cap - 1)
        ends = stream.ends_in(crossing)
        val_begin = int(ends[np.searchsorted(ends, cap, side="left")])  # first document end >= cap
        val_end = val_begin + val_cap
        if val_end > stream.total:
            if not final:
                return None
            val_end = stream.total
    train_docs = stream.ends_before(train_end) + 1 if train_end > 0 else 0
    val_docs = 0
    if val_end > val_begin:  # documents starting in [E, E+V): the one at E, and one after each end inside
        val_docs = 1 + stream.ends_before(val_end) - stream.ends_before(val_begin, inclusive=True)
    last = max(train_end, val_end)
    shards_used = stream.shard_of(last - 1) + 1 if last > 0 else 0
    digest = hashlib.sha256("".join(r.texts_sha256 for r in records[:shards_used]).encode()).hexdigest()
    return StreamCut((0, train_end), (val_begin, val_end), {"train": train_docs, "val": val_docs},
                     shards_used, digest)


def write_range(records: list[ShardRecord], store: ShardStore, span: tuple[int, int], path: Path) -> None:
    """Write stream tokens [begin, end) to path, reading only the shards that hold them."""
    begin, end = span
    with open(path, "wb") as out:
        offset = 0
        for record in records:
            lo, hi = max(begin, offset), min(end, offset + record.tokens)
            if lo < hi:
                store.tokens(record)[lo - offset : hi - offset].tofile(out)
            offset += record.tokens
            if offset >= end:
                break
