"""A local stand-in for a streamed corpus: many distinct documents generated from a few base texts.

The preparation tests and the data benchmark (bench/data_prep.py) need a long stream without the
network. Repeating one text verbatim would be unrepresentative (every shard identical), so document i
is its base text with deterministic variation: a number prefix, rotated to start at another word, and
a window of it upper-cased, at positions that move with i. The stream is the same on every call,
machine and Python.
"""

from typing import Iterable, Iterator

UPPER_WINDOW = 120  # characters upper-cased per document


def varied_documents(base_texts: list[str], n_documents: int) -> Iterator[str]:
    """n_documents texts, document i derived from base_texts[i % len(base_texts)].

    Only slicing and one upper() per document (C speed): in the benchmark this generator stands in for
    the stream reader of the main process, which must not become the bottleneck it measures.
    """
    if not base_texts:
        raise ValueError("varied_documents needs at least one base text")
    for i in range(n_documents):
        text = base_texts[i % len(base_texts)]
        turn = text.find(" ", (i * 7919) % len(text)) + 1  # rotate at a word start (0: none after the point)
        text = text[turn:] + " " + text[:turn] if turn else text
        loud = (i * 104729) % len(text)  # upper-case a window that moves with i (large primes spread both)
        text = text[:loud] + text[loud : loud + UPPER_WINDOW].upper() + text[loud + UPPER_WINDOW :]
        yield f"Document {i}. {text}"


def rows_of(texts: Iterable[str], column: str = "text") -> Iterator[dict]:
    """texts as stream rows, the shape datasets' streaming loader yields."""
    for text in texts:
        yield {column: text}
