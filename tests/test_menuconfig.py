"""`make menuconfig` driven in a real pseudo-terminal: change an option, save, and the loader sees it (and the
preset the .config came from)."""

import os
import pty
import select
import signal
import struct
import termios
import fcntl
import time

from lib import config as cfg


def read_until(fd, needle, timeout_s=20.0):
    """Read terminal output until `needle` appears; returns everything read."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while needle.encode() not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {needle!r}; screen so far: {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def test_menuconfig_toggles_an_option_and_saves(repo_copy):
    config = repo_copy / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), config)
    assert cfg.load_settings(config, environ={}).general.compile is False

    pid, fd = pty.fork()
    if pid == 0:  # child: the real make target in the copied repository
        os.chdir(repo_copy)
        os.environ.update(TERM="xterm", LINES="40", COLUMNS="120")
        os.execvp("make", ["make", "-s", "menuconfig"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        read_until(fd, "Training")                      # the top menu is drawn
        os.write(fd, b"/")                               # jump to symbol
        read_until(fd, "Jump to")
        os.write(fd, b"TORCH_COMPILE")
        time.sleep(0.5)
        os.write(fd, b"\r")                              # go to the option
        read_until(fd, "Compile the model")
        os.write(fd, b" ")                               # toggle it on
        time.sleep(0.3)
        os.write(fd, b"S")                               # save ...
        read_until(fd, "Filename")
        os.write(fd, b"\r")                              # ... to .config
        read_until(fd, "saved")
        time.sleep(0.3)
        os.write(fd, b"\x1b")                            # dismiss the "saved" message
        time.sleep(1.0)
        os.write(fd, b"Q")                               # quit
        tail = read_until(fd, "valid")
        assert "error" not in tail.lower()
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert cfg.load_settings(config, environ={}).general.compile is True
    assert cfg.preset_of(config) == "cpu-tiny-run"  # the save kept the preset header (the run directory's name)
