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

PROBE_TIMEOUT_S = 15.0  # one request: enough for a slow link, short enough to fail fast when offline


@dataclass(frozen=True)
class StreamSpec:
    hub_path: str  # dataset repository on the Hugging Face hub
    config_name: str | None  # subset ("sample-10BT"); None for the default
    split: str
    text_column: str
    revision: str | None = None  # a branch or ref of the repository; None for main
    data_files: str | None = None  # glob of the parquet files inside the repository; None: the card's configs

    def identity(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return self.hub_path + (f"@{self.revision}" if self.revision else "")


STREAMED_DATASETS = {
    # 10B-token sample of FineWeb-Edu, the educational-quality filtered FineWeb.
    "fineweb-edu": StreamSpec("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    # Open reproduction of the WebText corpus GPT-2 was trained on. Its main branch holds a loading script,
    # which datasets >= 4 refuses; the hub's own parquet export of it lives on refs/convert/parquet, under
    # plain_text/partial-train/ (the export holds a prefix of the corpus: a cap beyond it stops with
    # "the stream ended after N tokens"). The glob also matches plain_text/train/ should the export be whole.
    "openwebtext": StreamSpec("Skylion007/openwebtext", None, "train", "text", revision="refs/convert/parquet",
                              data_files="plain_text/*train/*.parquet"),
}

# Given a spec, return an iterable of rows (dicts holding spec.text_column).
StreamOpener = Callable[[StreamSpec], Iterable[dict]]


class StreamUnavailable(ConnectionError):
    """The stream cannot be opened or broke off: no network, offline mode, or the hub refused."""


def load_stream(spec: StreamSpec) -> Iterable[dict]:
    """The rows of spec through datasets' streaming loader, no probe (tests point hub_path at a local copy)."""
    import datasets  # imported here: it is slow to import and only this path needs it

    return datasets.load_dataset(spec.hub_path, spec.config_name, split=spec.split, streaming=True,
                                 revision=spec.revision, data_files=spec.data_files)


def open_hub_stream(spec: StreamSpec) -> Iterable[dict]:
    """Stream rows of spec from the hub (network access).

    One short request first asks the hub for the repository: without it, an unreachable hub shows up as
    datasets' five retries over 25 seconds and a page of traceback. Any network failure, then or while
    streaming, is raised as StreamUnavailable with one line saying why.
    """
    import datasets
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx

    endpoint, name = datasets.config.HF_ENDPOINT, spec.describe()
    network_errors = (OSError, httpx.HTTPError)
    if datasets.config.HF_HUB_OFFLINE:
        raise StreamUnavailable(f"cannot stream {name} from {endpoint}: offline mode is on "
                                f"(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)")
    try:
        HfApi(endpoint=endpoint).dataset_info(spec.hub_path, revision=spec.revision, timeout=PROBE_TIMEOUT_S)
        rows = load_stream(spec)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "no answer"
        raise StreamUnavailable(f"the hub at {endpoint} refused {name} (HTTP {status}: {_first_line(error)})") from None
    except network_errors as error:
        raise StreamUnavailable(f"cannot reach {endpoint} to stream {name} "
                                f"({type(error).__name__}: {_first_line(error)})") from None
    return _network_errors_as_unavailable(rows, f"{endpoint} while streaming {name}", network_errors)


def _network_errors_as_unavailable(rows: Iterable[dict], where: str, network_errors: tuple) -> Iterator[dict]:
    """rows, with a connection lost mid-stream (after datasets' own retries) raised as StreamUnavailable."""
    delivered = 0
    try:
        for row in rows:
            yield row
            delivered += 1
    except network_errors as error:
        raise StreamUnavailable(f"lost the connection to {where}, after {delivered:,} documents "
                                f"({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def iter_texts(rows: Iterable[dict], text_column: str) -> Iterator[str]:
    """The non-empty texts of rows, in stream order."""
    for index, row in enumerate(rows):
        if text_column not in row:
            raise KeyError(f"row {index} of the stream has no column {text_column!r} (columns: {sorted(row)})")
        text = row[text_column]
        if text:
            yield text
