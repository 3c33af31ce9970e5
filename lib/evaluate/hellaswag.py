"""The HellaSwag validation set (Zellers et al., 2019), read and posed as lm-evaluation-harness poses it.

Source: the authors' file, 10,042 lines of one JSON object each (ind, activity_label, ctx_a, ctx_b, ctx, split,
split_type, label, endings, source_id), downloaded once into .cache/ and checked before every use:
    https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl

The pin. No copy of the file could be downloaded where this code was written, so no sha256 of it is pinned.
What is pinned is the id git itself records for the file in the authors' repository at its newest commit
(a29ff8e9, 2020-05-28; the repository has not changed since), read from that commit's tree:
    git blob id = sha1(b"blob <size in bytes>\\0" + content) = 0f5ee25d72216f12317d5d8a7b92deafa423d81e
It fixes the content byte for byte, as `git hash-object FILE` shows for any copy. The line count (10,042) is
checked first, so a truncated download is named as such; each line's JSON shape is checked as it is read.
eval.json records the file's sha256 too, so a sha256 pin can be added from a verified copy.

Posing an item (the harness's hellaswag task, version 1.0, lm_eval/tasks/hellaswag/utils.py), as rules:
    clean(s)  = s stripped of surrounding whitespace; each " [title]" -> ". "; each bracketed "[...]" removed
                (shortest match: "[step]", "[substeps]", "[header]"; WikiHow markup); then each "  " -> " " in one
                left-to-right pass (three spaces become two, as Python's str.replace does)
    query     = clean(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
                (str.capitalize: first character upper case, every other character LOWER case)
    choices   = [clean(e) for e in endings]; gold = int(label)
The scorer (lib/evaluate/scoring.py) poses choice i as the continuation " " + choices[i] of the query.
"""

import hashlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gpt2.io import REPO_ROOT, atomic_path

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FILE_ENV = "GPT2_HELLASWAG_FILE"  # an existing copy of the official file (checked against the pin)
URL_ENV = "GPT2_HELLASWAG_URL"  # a mirror to download from instead (the download is checked against the pin)
DEFAULT_CACHE = REPO_ROOT / ".cache" / "hellaswag_val.jsonl"
DOWNLOAD_TIMEOUT_S = 60
NUM_CHOICES = 4


class HellaSwagError(ValueError):
    """A HellaSwag file that is not what it must be (one line: the file, what is wrong, what to do)."""


class HellaSwagUnavailable(RuntimeError):
    """The official file is not here and cannot be downloaded (one line: why, and what to do)."""


@dataclass(frozen=True)
class Pin:
    git_blob_sha1: str
    lines: int


OFFICIAL_VAL = Pin("0f5ee25d72216f12317d5d8a7b92deafa423d81e", 10042)


@dataclass(frozen=True)
class Item:
    query: str
    choices: tuple  # NUM_CHOICES cleaned endings, without the leading space
    gold: int  # index of the right ending
    ind: int  # the item's "ind" in the file, for tracing a result back to it


# ---- posing an item (the harness's rules; module doc) ---------------------------------------------------

BRACKETED = re.compile(r"\[.*?\]")  # non-greedy: "[step] a [b]" loses "[step]" and "[b]", keeps " a "


def clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = BRACKETED.sub("", text)
    return text.replace("  ", " ")


def pose(record: dict) -> Item:
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return Item(query=clean(record["activity_label"] + ": " + context),
                choices=tuple(clean(ending) for ending in record["endings"]),
                gold=int(record["label"]), ind=int(record.get("ind", -1)))


# ---- reading a file -------------------------------------------------------------------------------------

def _shape_error(record) -> str | None:
    """What keeps a parsed line from being a HellaSwag item, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    for key in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(record.get(key), str):
            return f"field {key!r} is missing or not a string"
    endings = record.get("endings")
    if not (isinstance(endings, list) and len(endings) == NUM_CHOICES and all(isinstance(e, str) for e in endings)):
        return f"field 'endings' is not a list of {NUM_CHOICES} strings"
    label = record.get("label")
    if isinstance(label, bool) or str(label) not in {str(i) for i in range(NUM_CHOICES)}:
        return f"field 'label' is {label!r}, not 0..{NUM_CHOICES - 1}"
    return None


def read_items(path, limit: int | None = None) -> list:
    """The items of a HellaSwag-format JSONL file, in file order (the first `limit` when given)."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HellaSwagError(f"{path}:{number}: not JSON ({exc.msg}); delete the file to download it "
                                     f"again") from None
            problem = _shape_error(record)
            if problem:
                raise HellaSwagError(f"{path}:{number}: not a HellaSwag item ({problem}); delete the file to "
                                     f"download it again")
            items.append(pose(record))
    if not items:
        raise HellaSwagError(f"{path} holds no items; delete it to download it again")
    return items


# ---- the official file: pin, cache, download ------------------------------------------------------------

def git_blob_sha1(path) -> str:
    """The id `git hash-object` gives the file: sha1 over the header b"blob <size>\\0" and the content."""
    path = Path(path)
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def count_lines(path) -> int:
    """Lines of text, a last line without a newline included."""
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def verify(path, pin: Pin, shown_as=None, remedy: str = "delete it to download it again") -> None:
    """Raise HellaSwagError (one line) unless the file has the pinned line count and git blob id."""
    shown_as = shown_as or path
    lines = count_lines(path)
    if lines != pin.lines:
        raise HellaSwagError(f"{shown_as} has {lines:,} lines, expected {pin.lines:,} (truncated or not the "
                             f"HellaSwag validation file); {remedy}")
    actual = git_blob_sha1(path)
    if actual != pin.git_blob_sha1:
        raise HellaSwagError(f"{shown_as} has git blob id {actual}, expected {pin.git_blob_sha1} (corrupt or "
                             f"changed upstream); {remedy}")


def download(url: str, dest, pin: Pin, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """url -> dest, checked against the pin before it is renamed into place (a bad download leaves nothing)."""
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, atomic_path(dest) as tmp:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
            verify(tmp, pin, shown_as=f"the download from {url}", remedy="try again, or use another mirror "
                                                                         f"through {URL_ENV}")
    except urllib.error.HTTPError as exc:  # the server answered, but not with the file
        raise HellaSwagUnavailable(f"cannot download HellaSwag from {url} (HTTP {exc.code} {exc.reason}); check "
                                   f"{URL_ENV}, or copy hellaswag_val.jsonl to {dest}") from None
    except (urllib.error.URLError, OSError) as exc:  # no answer: no network, refused connections, timeouts
        raise HellaSwagUnavailable(
            f"cannot download HellaSwag from {url} ({getattr(exc, 'reason', None) or exc}); offline? Copy "
            f"hellaswag_val.jsonl to {dest} or set {FILE_ENV}=<a copy> ({URL_ENV}=<mirror> to download "
            f"from elsewhere)") from None
    return dest


def official_val_file(cache_path=None, url: str | None = None, environ=None) -> Path:
    """A verified copy of the official validation file: $GPT2_HELLASWAG_FILE, else the cache (downloaded from
    url, $GPT2_HELLASWAG_URL or OFFICIAL_URL when missing)."""
    environ = os.environ if environ is None else environ
    override = environ.get(FILE_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise HellaSwagUnavailable(f"{FILE_ENV}={override} does not exist; unset it to download the file")
        verify(path, OFFICIAL_VAL, remedy=f"fix {FILE_ENV}")
        return path
    path = Path(cache_path or DEFAULT_CACHE)
    if not path.is_file():
        download(url or environ.get(URL_ENV) or OFFICIAL_URL, path, OFFICIAL_VAL)
    verify(path, OFFICIAL_VAL)
    return path
