"""SIGTERM / SIGINT while training: stop cleanly after the current optimizer step.

Before the training loop there is nothing to save, so a signal interrupts at once (raises `Interrupted`,
as Ctrl-C would). After `StopSignals.defer()` (the training loop on) a signal only records itself; the
loop stops at its next sync point, checkpoints, and the run ends with status "interrupted" and exit code
128 + signal number (130 for SIGINT, 143 for SIGTERM), the shell's convention for "killed by a signal".
A second signal does not escalate: torchrun forwards the signal its workers may already have received
from their process group, and that must not cut the checkpoint short. SIGKILL is the hard stop.
"""

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal arrived where the run could not finish a step and checkpoint (e.g. during setup).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    return 128 + signum


class StopSignals:
    """Installs handlers for SIGINT and SIGTERM (main thread only) and remembers the first signal."""

    def __init__(self):
        self.signum = None  # the first stop signal received, or None
        self._deferred = False
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> None:
        # signal.signal works only in the main thread; a run started from another thread keeps the defaults.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def defer(self) -> None:
        """From now on a signal only sets `signum`; the caller stops at a point of its choosing."""
        self._deferred = True

    def _handle(self, signum, _frame):
        if self.signum is None:
            self.signum = signum
        if not self._deferred:
            raise Interrupted(signum)
