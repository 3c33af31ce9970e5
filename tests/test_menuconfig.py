"""`make menuconfig` driven in a real pseudo-terminal: change an option, save, and the loader sees it (and the
preset the .config came from); an invalid save is refused; losing the terminal ends it."""

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
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


def spawn_menuconfig(repo, config_name=".config", ignore_hangup=False):
    """`python -m scripts.config menuconfig` in the copied repository, under a pty that is its controlling
    terminal; returns (pid, master fd) once the top menu is drawn."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(repo)
        os.environ.update(TERM="xterm", LINES="40", COLUMNS="120")
        if ignore_hangup:  # as under nohup, or a multiplexer that leaves SIGHUP ignored
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        python = str(repo / ".venv" / "bin" / "python")
        os.execv(python, [python, "-m", "scripts.config", "--config", config_name, "menuconfig"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    read_until(fd, "Training")
    return pid, fd


def wait_for_exit(pid, timeout_s):
    """The exit status of pid, or None if it is still running after timeout_s (then it is killed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_menuconfig_refuses_to_save_an_invalid_configuration(repo_copy):
    """A reciprocal rank that does not fit the head dimension (32 for the tiny model) passes menuconfig's own
    range (1..512) but not the loader's: the save is refused in a dialog, .config keeps its old bytes, and the
    exit names the reason on one line."""
    config = repo_copy / ".config"
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), repo_copy / "base")
    cfg.write_cell_config(repo_copy / "base", {"ATTN_BACKEND_RA_UNIFIED": "y"}, config)
    before = config.read_bytes()
    pid, fd = spawn_menuconfig(repo_copy)
    try:
        os.write(fd, b"/")
        read_until(fd, "Jump to")
        os.write(fd, b"ATTN_RA_RANK")
        time.sleep(0.5)
        os.write(fd, b"\r")
        read_until(fd, "Reciprocal rank R")
        os.write(fd, b"\r")                              # the value dialog
        time.sleep(0.3)
        os.write(fd, b"\x1740\r")                        # Ctrl-W clears the old value; R = 40
        time.sleep(0.3)
        os.write(fd, b"S")
        read_until(fd, "Filename")
        os.write(fd, b"\r")
        read_until(fd, "not saved")                      # the refusal, in a dialog
        os.write(fd, b"\x1b")                            # dismiss it ...
        time.sleep(0.5)
        os.write(fd, b"\x1b")                            # ... and the file name dialog it returns to
        time.sleep(0.5)
        os.write(fd, b"Q")
        read_until(fd, "Save configuration?")
        os.write(fd, b"n")                               # quit without saving
        tail = read_until(fd, "as it was")
    finally:
        status = wait_for_exit(pid, 10)
        os.close(fd)
    assert config.read_bytes() == before
    assert "error: " in tail and "CONFIG_ATTN_RA_RANK=40 is outside 1..16" in tail
    assert status is not None and os.waitstatus_to_exitcode(status) == 2
    assert not [p for p in repo_copy.iterdir() if p.name.startswith(".config.")]  # no temporary file left


def test_menuconfig_exits_when_its_controlling_terminal_hangs_up(repo_copy):
    """The pane is killed: the pty's master side closes. SIGHUP is ignored here (as under nohup), so only
    menuconfig's own watch on the terminal can stop it; before, it spun at 100% CPU on the dead pty."""
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), repo_copy / ".config")
    before = (repo_copy / ".config").read_bytes()
    pid, fd = spawn_menuconfig(repo_copy, ignore_hangup=True)
    os.close(fd)
    assert wait_for_exit(pid, 10) is not None, "menuconfig kept running after its terminal went away"
    assert (repo_copy / ".config").read_bytes() == before


def test_menuconfig_exits_when_reads_from_its_terminal_fail(repo_copy):
    """A terminal that is not the controlling one sends no SIGHUP when it goes: every read fails instead."""
    cfg.apply_defconfig(cfg.preset_path("cpu-tiny-run"), repo_copy / ".config")
    before = (repo_copy / ".config").read_bytes()
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([str(repo_copy / ".venv" / "bin" / "python"), "-m", "scripts.config", "menuconfig"],
                            cwd=repo_copy, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                            env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    try:
        read_until(master, "Training")
    finally:
        os.close(master)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("menuconfig kept running after its terminal went away") from None
    assert proc.returncode != 0
    assert (repo_copy / ".config").read_bytes() == before
