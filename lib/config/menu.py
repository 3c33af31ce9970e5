"""`make menuconfig`: kconfiglib's terminal UI, with two things it does not do by itself.

Saves are validated: kconfiglib's menuconfig saves by calling kconf.write_config(filename) (and
write_min_config for a minimal one); the Kconfig it gets here overrides both with a validated, atomic save, so
an invalid configuration (a reciprocal rank that does not fit the head dimension) is refused in a dialog and
never replaces the .config.

It exits when its terminal goes away: a pane that is killed sends SIGHUP, or, where the terminal was not
the controlling one, leaves every read failing at once, which kconfiglib's key loop would retry forever at
100% CPU. Either way the UI stops, nothing is saved, and the process exits.
"""

import errno
import functools
import os
import signal
import sys
import termios
import textwrap
from pathlib import Path

import kconfiglib

from lib.config.edit import save_minimal_validated
from lib.config.kconfig import ConfigError, load_strict
from lib.config.load import write_config_atomically
from lib.config.presets import kconfig_keeping_preset

# A blocking read that returns no key this many times in a row has no terminal behind it.
MAX_EMPTY_READS = 100


class TerminalLost(Exception):
    """The terminal menuconfig ran in is gone (hangup, or reads fail)."""


def _terminal_alive() -> bool:
    try:
        termios.tcgetattr(sys.stdin.fileno())  # fails with EIO once the terminal is hung up
        return True
    except (termios.error, OSError, ValueError):
        return False


class _MenuKconfig(kconfiglib.Kconfig):
    """A Kconfig whose writes (menuconfig's saves) go through its session's validated saves."""

    session = None

    def write_config(self, filename=None, header=None, save_old=True, verbose=None):
        return self.session.save(filename, header)

    def write_min_config(self, filename, header=None):
        return self.session.save_minimal(filename, header)


class _Session:
    """One menuconfig run: the validated saves, the last refusal, and the watch on the terminal."""

    def __init__(self, kconf, config_path):
        self.kconf, self.config_path = kconf, Path(config_path)
        # kconfiglib's own writers, which the validated saves use for the temporary file
        self.write_full = functools.partial(kconfiglib.Kconfig.write_config, kconf)
        self.write_min = functools.partial(kconfiglib.Kconfig.write_min_config, kconf)
        self.refused = None  # the message of the last refused save, until a later one succeeds
        self.lost = False
        self.empty_reads = 0

    def save(self, filename=None, header=None, save_old=True, verbose=None):
        """kconf.write_config's signature, as menuconfig calls it; raises OSError (which menuconfig shows in a
        dialog) when the configuration does not validate."""
        target = Path(filename) if filename else self.config_path
        try:
            write_config_atomically(self.kconf, target, header=header, write=self.write_full)
        except ConfigError as error:
            return self._refuse(error, target)
        self.refused = None
        return f"Configuration saved to '{target}' (validated)"

    def save_minimal(self, filename=None, header=None):
        target = Path(filename) if filename else Path("defconfig")
        try:
            save_minimal_validated(self.kconf, target, self.write_full, self.write_min)
        except ConfigError as error:
            return self._refuse(error, target)
        return f"Minimal configuration saved to '{target}' (validated)"

    def _refuse(self, error, target):
        self.refused = str(error)
        # menuconfig prints e.strerror in a dialog that does not wrap lines.
        raise OSError(errno.EINVAL, "\n".join(textwrap.wrap(f"not saved: {error}", 60)), str(target))

    def hangup(self, signum, frame):
        self.lost = True
        raise TerminalLost()

    def wrap_getch(self, getch):
        def checked(win):
            key = getch(win)
            if key == -1:  # no key from a blocking read: a signal, or a terminal that is gone
                self.empty_reads += 1
                if not _terminal_alive() or self.empty_reads >= MAX_EMPTY_READS:
                    self.lost = True
                    raise TerminalLost()
            else:
                self.empty_reads = 0
            return key
        return checked


def _detach_from_terminal() -> None:
    """Point stdin/stdout/stderr at /dev/null: the terminal is gone, and Python's flush at exit must not fail."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def run_menuconfig(config_path) -> int:
    """The menu over config_path; returns the exit status (0 saved or nothing to save, 2 the last save was
    refused, 129 the terminal was lost). A .config that does not load is refused before the menu opens."""
    import curses
    import menuconfig  # kconfiglib's terminal UI

    if Path(config_path).exists():
        load_strict(config_path)  # refuse to open (and silently rewrite) a broken .config
    kconf = kconfig_keeping_preset(config_path, _MenuKconfig)  # its saves keep the preset header
    kconf.session = session = _Session(kconf, config_path)
    os.environ["KCONFIG_CONFIG"] = str(config_path)  # the file menuconfig loads and offers to save to
    getch, hangup = menuconfig._getch_compat, signal.getsignal(signal.SIGHUP)
    # kconfiglib reads keys through this module-level helper; wrapping it is the one place to see a dead terminal.
    menuconfig._getch_compat = session.wrap_getch(getch)
    signal.signal(signal.SIGHUP, session.hangup)
    try:
        menuconfig.menuconfig(kconf)
    except (TerminalLost, curses.error, OSError):
        if not session.lost:  # a curses or I/O failure with the terminal still there is a real error
            raise
    finally:
        menuconfig._getch_compat = getch
        signal.signal(signal.SIGHUP, hangup)
    if session.lost:
        _detach_from_terminal()
        return 128 + signal.SIGHUP
    if session.refused:
        print(f"error: {session.refused}; {config_path} is as it was", file=sys.stderr)
        return 2
    return 0
