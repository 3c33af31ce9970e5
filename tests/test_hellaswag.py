"""HellaSwag data: the harness's preprocessing, the file's pin and shape checks, the download and the offline line."""

import functools
import http.server
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from lib.evaluate import hellaswag as hs

FIXTURE = Path(__file__).parent / "fixtures" / "hellaswag" / "hellaswag_val_sample.jsonl"


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


def test_clean_follows_the_harness_rules():
    assert hs.clean("  a [title] b  ") == "a. b"  # strip, " [title]" -> ". ", then the double space collapses
    # An ending that starts with markup keeps the space after it: only " [title]" (with its space) becomes ". "
    assert hs.clean("[title] Do y. [step] Z.") == " Do y. Z."
    assert hs.clean("[header] How to x [title] Do y.") == " How to x. Do y."
    assert hs.clean("[a] b [c]") == " b "  # shortest brackets, each removed
    assert hs.clean("three   spaces") == "three  spaces"  # one pass of "  " -> " ", as str.replace does


def test_an_item_is_posed_like_the_harness():
    item = hs.pose({"activity_label": "Snow shoveling", "ctx_a": "A man walks out.", "label": "1",
                    "ctx_b": "then, the man scoops up snow near the GARAGE and",
                    "endings": ["a.", " b [step] c.", "[title] d", "e  f"], "ind": 7})
    # str.capitalize lowers every character after the first
    assert item.query == "Snow shoveling: A man walks out. Then, the man scoops up snow near the garage and"
    assert item.choices == ("a.", "b c.", " d", "e f") and item.gold == 1 and item.ind == 7


def test_the_fixture_reads_as_eight_items():
    items = hs.read_items(FIXTURE)
    assert [item.gold for item in items] == [2, 0, 3, 1, 2, 1, 0, 3]
    assert all(len(item.choices) == hs.NUM_CHOICES for item in items)
    assert items[1].query == "Playing the piano: A boy sits down at an upright piano in a living room. He"
    assert items[3].query == ("Home and Garden: How to repot a houseplant. Choose a pot one size larger. The new pot "
                              "should be about 5 cm wider than the old one and have a drainage hole.")
    assert items[3].choices[0] == " Paint the pot with nail polish before you buy it."
    assert len(hs.read_items(FIXTURE, limit=3)) == 3


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_pinned_id_is_the_one_git_computes(tmp_path):
    no_newline = tmp_path / "last-line.jsonl"
    no_newline.write_bytes(FIXTURE.read_bytes().rstrip(b"\n"))
    for path in (FIXTURE, no_newline):
        by_git = subprocess.run(["git", "hash-object", "--no-filters", str(path)], capture_output=True, text=True,
                                check=True).stdout.strip()
        assert hs.git_blob_sha1(path) == by_git
    assert hs.count_lines(no_newline) == hs.count_lines(FIXTURE) == 8


def test_a_truncated_or_corrupt_file_is_refused_in_one_line(tmp_path):
    pin = hs.Pin(hs.git_blob_sha1(FIXTURE), 8)
    hs.verify(FIXTURE, pin)
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_bytes(b"".join(FIXTURE.read_bytes().splitlines(keepends=True)[:5]))
    with pytest.raises(hs.HellaSwagError) as err:
        hs.verify(truncated, pin)
    assert "has 5 lines, expected 8" in one_line(err) and "delete it" in one_line(err)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_bytes(FIXTURE.read_bytes().replace(b"soapy", b"soupy"))
    with pytest.raises(hs.HellaSwagError) as err:
        hs.verify(corrupt, pin)
    assert f"expected {pin.git_blob_sha1}" in one_line(err)


def test_the_official_pin_refuses_anything_else(tmp_path):
    with pytest.raises(hs.HellaSwagError) as err:
        hs.official_val_file(environ={hs.FILE_ENV: str(FIXTURE)})
    assert "has 8 lines, expected 10,042" in one_line(err) and hs.FILE_ENV in one_line(err)
    cached = tmp_path / "hellaswag_val.jsonl"
    shutil.copy(FIXTURE, cached)
    with pytest.raises(hs.HellaSwagError) as err:
        hs.official_val_file(cache_path=cached, environ={})
    assert str(cached) in one_line(err) and "delete it to download it again" in one_line(err)
    with pytest.raises(hs.HellaSwagUnavailable) as err:
        hs.official_val_file(environ={hs.FILE_ENV: str(tmp_path / "absent.jsonl")})
    assert "does not exist" in one_line(err)


def test_lines_that_are_not_items_are_named(tmp_path):
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + lines[1].replace('"endings": [', '"endings": ["extra", ') + "\n")
    with pytest.raises(hs.HellaSwagError) as err:
        hs.read_items(bad)
    assert f"{bad}:2:" in one_line(err) and "'endings'" in one_line(err)
    bad.write_text(lines[0][:-5] + "\n")
    with pytest.raises(hs.HellaSwagError, match="not JSON"):
        hs.read_items(bad)
    bad.write_text(lines[0].replace('"label": 2', '"label": 4') + "\n")
    with pytest.raises(hs.HellaSwagError, match="'label' is 4"):
        hs.read_items(bad)


@pytest.fixture
def local_server():
    """An HTTP server on the loopback interface serving the fixture directory: the real download path,
    no outside network."""
    handler = functools.partial(QuietHandler, directory=str(FIXTURE.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_download_is_checked_before_it_lands(local_server, tmp_path):
    pin = hs.Pin(hs.git_blob_sha1(FIXTURE), 8)
    dest = tmp_path / "cache" / "hellaswag_val.jsonl"
    assert hs.download(f"{local_server}/{FIXTURE.name}", dest, pin) == dest
    assert dest.read_bytes() == FIXTURE.read_bytes()
    other = tmp_path / "cache" / "other.jsonl"
    with pytest.raises(hs.HellaSwagError) as err:
        hs.download(f"{local_server}/{FIXTURE.name}", other, hs.OFFICIAL_VAL)
    assert "the download from" in one_line(err)
    assert not other.exists() and sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no leftovers
    with pytest.raises(hs.HellaSwagUnavailable) as err:
        hs.official_val_file(cache_path=other, url=f"{local_server}/absent.jsonl", environ={})
    assert "HTTP 404" in one_line(err)


def test_offline_is_one_line_saying_what_to_do(tmp_path):
    cache = tmp_path / "hellaswag_val.jsonl"
    unreachable = "http://127.0.0.1:9/hellaswag_val.jsonl"  # the discard port: nothing listens there
    with pytest.raises(hs.HellaSwagUnavailable) as err:
        hs.official_val_file(cache_path=cache, environ={hs.URL_ENV: unreachable})
    message = one_line(err)
    assert message.startswith(f"cannot download HellaSwag from {unreachable}")
    assert str(cache) in message and hs.FILE_ENV in message
    assert list(tmp_path.iterdir()) == []
