"""The matrix runner's console: prefixed cell output and one progress line with an ETA.

Cell output is echoed as "[V1/s2] <line>"; the progress line says how many cells
are done, running, failed and left. On a terminal it is redrawn in place under
the cell output; elsewhere (a log file, Slurm) it is printed when a cell starts
or ends, and otherwise at most once a minute.
"""

import shutil
import sys
import threading
import time

from lib.matrix.state import counts, read_states


def hms(seconds) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Console:
    """Prefixed cell output plus one progress line (redrawn in place on a terminal)."""

    def __init__(self, stream=None, live=None, echo=True):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.echo = echo
        self.status_text = ""
        self._last_status_print = 0.0
        self._lock = threading.Lock()

    def _clear(self):
        if self.live and self.status_text:
            self.stream.write("\r\033[K")

    def _redraw(self):
        if self.live and self.status_text:
            self.stream.write(self.status_text[: shutil.get_terminal_size().columns - 1])
        self.stream.flush()

    def cell_line(self, label, text):
        if not self.echo:
            return
        with self._lock:
            self._clear()
            self.stream.write(f"[{label}] {text}\n")
            self._redraw()

    def message(self, text):
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self._redraw()

    def status(self, text, force=False):
        """Live: redraw. Otherwise print when forced (a cell started or ended) or once a minute."""
        with self._lock:
            changed = text != self.status_text
            self._clear()
            self.status_text = text
            if self.live:
                self._redraw()
            elif changed and (force or time.monotonic() - self._last_status_print > 60):
                self.stream.write(text + "\n")
                self.stream.flush()
                self._last_status_print = time.monotonic()

    def close(self):
        with self._lock:
            if self.live and self.status_text:
                self.stream.write("\n")
                self.stream.flush()
            self.status_text = ""


class Progress:
    """The progress line's text: counts from the state files, ETA from this session's cell durations.

    ETA = (remaining time of the running cells + cells left x time per cell) / cells at once,
    where time per cell is the mean of the cells finished in this session, or the budget before any.
    """

    def __init__(self, plan, parallel):
        self.plan = plan
        self.parallel = parallel
        self.t0 = time.monotonic()
        self.durations = []  # wall seconds of cells finished in this session

    def text(self, matrix_dir, running: list) -> str:
        """running: the CellProcess of every cell running now."""
        c = counts(read_states(matrix_dir, self.plan))
        left = c["pending"] + c["running"] - len(running)
        per_cell = (sum(self.durations) / len(self.durations) if self.durations
                    else max(cell.max_time_s for cell in self.plan.cells) or None)
        eta = "?"
        if per_cell:
            work = sum(max(per_cell - p.elapsed_s(), 0) for p in running) + left * per_cell
            eta = hms(work / self.parallel)
        return (f"[{self.plan.name}] {c['done']} done, {len(running)} running, {c['failed']} failed, "
                f"{left} left | elapsed {hms(time.monotonic() - self.t0)} | ETA {eta}")
