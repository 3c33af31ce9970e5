"""The trainer as a child process of a command that waits for it (`make`, `make resume`, `make cell`).

Three things a plain subprocess.call gets wrong here:
  * Ctrl-C. The terminal sends SIGINT to the whole foreground process group, trainer included; the trainer
    finishes its step, writes its checkpoint and exits 130. subprocess.call would answer its own
    KeyboardInterrupt by killing the trainer 0.25 s later, before the checkpoint. Here the parent only
    forwards the signal (a second SIGINT does not escalate in the trainer) and goes on waiting.
  * SIGTERM to the parent (a scheduler, `kill`) is forwarded the same way: the trainer checkpoints and exits 143.
  * kill -9 of the parent: the kernel sends the trainer SIGTERM (PR_SET_PDEATHSIG, Linux), so no trainer is
    left running unattended; it checkpoints and exits.
The parent's run lock is passed down (pass_fds + the environment entry RunLock.handoff names), so the child
adopts it: the directory stays locked from the parent's choice of it to the child's last write.
"""

import os
import signal
import subprocess
import sys
import threading

from gpt2.io import die_with_parent_hook

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def run_child(command, env, keep_fds=()) -> int:
    """Run `command` to its end with the stop signals forwarded to it; returns its exit code (negative: the
    signal that killed it). keep_fds stay open in the child (the run lock)."""
    child, received = [], []

    def forward(signum, _frame):
        received.append(signum)
        if child:
            child[0].send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    # Installed before the child exists, so no signal can hit the default handler in between; the child
    # execs, which resets caught signals to their defaults, so it keeps the trainer's own handling.
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if main_thread else {}
    try:
        child.append(subprocess.Popen(command, env=env, pass_fds=tuple(keep_fds), preexec_fn=die_with_parent_hook()))
        if received:  # arrived while the child was being started
            child[0].send_signal(received[0])
        return child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
