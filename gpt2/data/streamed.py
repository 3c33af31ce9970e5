"""Web-text corpora read with Hugging Face `datasets` in streaming mode.

Streaming reads the remote parquet shards row by row, so a token cap of a few
hundred million tokens never needs the full corpus on disk. Only the first rows
of the stream are used; the corpora are shuffled at source, so a prefix is a
fair sample.

open_hub_stream is the one function here that reaches the network. Everything
that consumes a stream takes the opener as an argument, so tests pass one that
reads a local file in the same row format instead.
"""

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator


@dataclass(frozen=True)
class StreamSpec:
    hub_path: str  # dataset repository on the Hugging Face hub
    config_name: str | None  # subset ("sample-10BT"); None for the default
    split: str
    text_column: str

    def identity(self) -> dict:
        return asdict(self)


STREAMED_DATASETS = {
    # 10B-token sample of FineWeb-Edu, the educational-quality filtered FineWeb.
    "fineweb-edu": StreamSpec("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    # Open reproduction of the WebText corpus GPT-2 was trained on.
    "openwebtext": StreamSpec("Skylion007/openwebtext", None, "train", "text"),
}

# Given a spec, return an iterable of rows (dicts holding spec.text_column).
StreamOpener = Callable[[StreamSpec], Iterable[dict]]


def open_hub_stream(spec: StreamSpec) -> Iterable[dict]:
    """Stream rows of spec from the hub (network access)."""
    import datasets  # imported here: it is slow to import and only this path needs it

    return datasets.load_dataset(spec.hub_path, spec.config_name, split=spec.split, streaming=True)


def iter_texts(rows: Iterable[dict], text_column: str) -> Iterator[str]:
    """The non-empty texts of rows, in stream order."""
    for index, row in enumerate(rows):
        if text_column not in row:
            raise KeyError(f"row {index} of the stream has no column {text_column!r} (columns: {sorted(row)})")
        text = row[text_column]
        if text:
            yield text
