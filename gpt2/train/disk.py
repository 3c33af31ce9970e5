"""Writes into the run directory that the disk refuses: a full disk, a quota, a read-only or failing device.

Every file a run writes (config, settings.json, env.json, train.log, eval.jsonl, metrics.json, ckpt.pt,
ckpt-best.pt) is written inside `writing(path)`, which turns the OSError of such a refusal into a
RunWriteError whose message names the cause and the file, "no space left on device writing <path>". The
trainer treats it as a known failure: it ends the run "failed" with that reason, in whatever can still be
written (metrics.json, else the console), and the previous checkpoint stays intact (writes are atomic).

torch.save reports a failed write of a file *object* as a RuntimeError of its own, with the OSError the
file raised as its context; a path given to torch.save would be written by C++ and lose the errno
altogether, which is why checkpoints are written through a Python file (gpt2/train/checkpoint.py).
"""

import errno
import os
from contextlib import contextmanager

# The errors that mean "the disk will not take this file", as opposed to a missing input or a permission
# the user must fix (those keep their own exception and traceback).
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


class RunWriteError(RuntimeError):
    """A file of the run directory could not be written; the message is metrics.json's failure_reason."""


def refusal(exc: BaseException) -> OSError | None:
    """The disk's OSError behind `exc` (itself, or its cause/context, e.g. inside torch.save), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def failure_reason(error: OSError, path) -> str:
    """'no space left on device writing /run/ckpt.pt': the cause in words, then the file."""
    cause = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}.get(error.errno)
    if cause is None:
        cause = os.strerror(error.errno).lower() if error.errno else str(error) or type(error).__name__
    return f"{cause} writing {path}"


@contextmanager
def writing(path):
    """Run a write of `path`; a refusal by the disk leaves as RunWriteError naming cause and file."""
    try:
        yield
    except RunWriteError:
        raise
    except Exception as exc:
        error = refusal(exc)
        if error is None:
            raise
        raise RunWriteError(failure_reason(error, path)) from exc
