"""Fuzzing the configuration front door (issue 15 item 9): generated .config/defconfig files, environment
overrides and matrix overrides either load or are refused with one ConfigError line that names the file
and line (or the variable, or the whole file), never another exception, and a refusal never changes the
.config it would have replaced, through the defconfig and olddefconfig paths as well as the loader.

The files start from real presets and full .configs (so many of them load) and are then mutated: known and
unknown symbols, values of every type in and out of range, garbage, duplicates, '# is not set' lines,
preset headers, CRLF and lone CR line ends, truncation, NUL and non-UTF-8 bytes. Deterministic (derandomize)
and in-process, about 1000 examples in all.
"""

import tempfile
from pathlib import Path

import kconfiglib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib import config as cfg
from lib.config import edit
from lib.config.environment import OTHER_VARIABLES

KCONF = cfg.load_kconfig()
SYMBOLS = sorted(s.name for s in KCONF.unique_defined_syms)
TYPES = {s.name: s.orig_type for s in KCONF.unique_defined_syms}
RANGES = {s.name: (int(s.ranges[0][0].str_value), int(s.ranges[0][1].str_value))
          for s in KCONF.unique_defined_syms if s.orig_type == kconfiglib.INT and s.ranges}
ENV_NAMES = [*cfg.ENV_OVERRIDES, *OTHER_VARIABLES, "GPT2_MAX_TIEM", "GPT2_LR"]


def fuzz_settings(examples):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _base_texts() -> list:
    """Real starting points: every preset as written, and the full .config two of them expand to."""
    texts = [cfg.preset_path(name).read_text() for name in cfg.preset_names()]
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("cpu-tiny-run", "shakespeare-gpu-ra-matrix"):
            cfg.apply_defconfig(cfg.preset_path(name), Path(scratch) / name)
            texts.append((Path(scratch) / name).read_text())
    return texts


BASES = _base_texts()

garbage = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
names = st.one_of(
    st.sampled_from(SYMBOLS),
    st.sampled_from(SYMBOLS).map(lambda n: n + "K"),           # a misspelling
    st.sampled_from(SYMBOLS).map(str.lower),
    st.from_regex(r"[A-Z_]{1,12}", fullmatch=True),
    garbage,
)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["6e-4", "6e-4x", "1e400", "-0.0", "1_0", " 1 ", "", "0x1p-3"]))


def values_for(name):
    kind = TYPES.get(name)
    if kind in (kconfiglib.BOOL, kconfiglib.TRISTATE):
        typed = st.sampled_from(["y", "n", "m", "yes", "Y", "", '"y"'])
    elif kind == kconfiglib.INT:
        low, high = RANGES.get(name, (0, 100))
        typed = st.one_of(st.integers(low, high).map(str), st.integers(-2**40, 2**40).map(str),
                          st.sampled_from(["010", "+5", "0x10", "1e3", "٣", '"5"']))
    else:
        typed = st.one_of(floats.map(lambda v: f'"{v}"'), garbage.map(lambda v: f'"{v}"'),
                          st.sampled_from(['"', '"abc', 'unquoted', '"a\\"b"', '"x"junk', '"V0,V1"', '"1, 2,3"']))
    return st.one_of(typed, garbage)


assignment = names.flatmap(lambda n: values_for(n).map(lambda v: f"CONFIG_{n}={v}"))
line = st.one_of(
    assignment, assignment, assignment,
    names.map(lambda n: f"# CONFIG_{n} is not set"),
    garbage.map(lambda s: "# " + s),
    st.just(""),
    garbage,
    st.sampled_from([*cfg.preset_names(), "../x", "", "a/b"]).map(lambda n: f"# preset: {n}"),
)


@st.composite
def config_files(draw) -> bytes:
    lines = draw(st.sampled_from(BASES)).splitlines()
    if lines and draw(st.booleans()):
        del lines[draw(st.integers(0, len(lines) - 1))]
    for _ in range(draw(st.integers(0, 4))):
        lines.insert(draw(st.integers(0, len(lines))), draw(line))
    if lines and draw(st.integers(0, 4)) == 0:                   # a duplicate assignment
        lines.append(draw(st.sampled_from(lines)))
    data = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines).encode("utf-8")
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "byte", "latin-1"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif damage == "byte":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\x00", b"\xff", b"\xc3", b"\x80", b"\xe9", b"\r"])) + data[at:]
    elif damage == "latin-1":
        data = "\n".join(lines).encode("latin-1", errors="replace")
    return data


environments = st.dictionaries(
    st.sampled_from(ENV_NAMES),
    st.one_of(st.integers(0, 10**12).map(str), st.sampled_from(["", " 5 ", "-1", "ten", "007", "٣"]), garbage),
    max_size=3)


def assert_refusal(error, *culprits):
    message = str(error)
    assert message and message.splitlines() == [message], f"not one line: {message!r}"
    assert any(c in message for c in culprits), f"names none of {culprits}: {message!r}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A valid .config that refusals must leave as it is, and the file each example writes."""
    root = tmp_path_factory.mktemp("fuzz")
    current = root / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), current)
    return root, current, current.read_bytes()


@fuzz_settings(650)
@given(data=config_files(), environ=environments)
def test_a_config_file_loads_or_is_refused_in_one_line(scratch, data, environ):
    root, _, _ = scratch
    path = root / "fuzzed.config"
    path.write_bytes(data)
    try:
        cfg.load_settings(path, environ=environ)
    except cfg.ConfigError as error:
        assert_refusal(error, str(path), *environ)


@fuzz_settings(200)
@given(data=config_files())
def test_defconfig_and_olddefconfig_never_change_the_config_on_refusal(scratch, data):
    root, current, valid = scratch
    defconfig = root / "fuzzed-defconfig"
    defconfig.write_bytes(data)
    current.write_bytes(valid)
    try:
        cfg.apply_defconfig(defconfig, current)
    except cfg.ConfigError as error:
        assert_refusal(error, str(defconfig), str(current))
        assert current.read_bytes() == valid
    old = root / "fuzzed-old.config"
    old.write_bytes(data)
    try:
        notes = edit.refresh(old)
    except cfg.ConfigError as error:
        assert_refusal(error, str(old))
        assert old.read_bytes() == data
    else:  # what it wrote was validated before it was renamed into place (write_config_atomically)
        assert all(note.splitlines() == [note] for note in notes)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".") and p != current]  # no temporary file left


@fuzz_settings(150)
@given(overrides=st.dictionaries(names, garbage | st.integers(-5, 600).map(str) | st.sampled_from(["y", "n"]),
                                 max_size=4))
def test_matrix_overrides_take_or_are_refused_in_one_line(scratch, overrides):
    root, current, valid = scratch
    current.write_bytes(valid)
    cell = root / "cell.config"
    cell.unlink(missing_ok=True)
    try:
        cfg.write_cell_config(current, overrides, cell)
    except cfg.ConfigError as error:
        assert_refusal(error, str(current), str(cell))
        assert not cell.exists()
    else:
        cfg.load_settings(cell, environ={})
