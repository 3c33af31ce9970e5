"""The operating-system side of a matrix cell: starting its process, probing and stopping process groups.

A cell's process starts in a new session, so its pid is also its process group id
and one killpg reaches train.py, torchrun and torchrun's workers together. It gets
SIGTERM when the runner dies (PR_SET_PDEATHSIG, Linux), so no cell trains orphaned;
what outlives it anyway (torchrun workers) the next runner stops with stop_group().

Two ways to start one:
  * exec `python -m lib.runs.train ...` (subprocess.Popen): one cell run in the foreground (a Slurm task), test
    stand-in trainers, and GPU cells when this process has touched CUDA itself;
  * fork this process and call lib.runs.train.main (ForkedTrainer): the cells of a matrix run, where each exec'd
    cell would spend ~4-6 s importing torch, dynamo and the model code first.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from gpt2.io import die_with_parent_hook


def start_cell_process(argv, env, cwd, keep_fd, fork=False):
    """Start a cell in a new session with stdout+stderr on `.stdout`; keep_fd stays open in the child.

    fork: ForkedTrainer instead of exec (needs ForkedTrainer.preload() first to gain anything).
    """
    if fork:
        return ForkedTrainer(argv, env, cwd, keep_fd)
    return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, pass_fds=(keep_fd,), start_new_session=True,
                            preexec_fn=die_with_parent_hook())


def _exists(kill, ident) -> bool:
    """Signal 0 probes without delivering anything; EPERM means it exists but belongs to someone else."""
    try:
        kill(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_alive(host, pid) -> bool:
    """Whether process `pid` on `host` still runs; True when that cannot be told from this machine."""
    if host != socket.gethostname() or not pid:
        return True
    return _exists(os.kill, pid)


def group_alive(pgid) -> bool:
    return _exists(os.killpg, pgid)


def stop_group(pgid, wait_s) -> None:
    """SIGTERM the process group, SIGKILL it if anything is left after wait_s."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ForkedTrainer:
    """A Popen look-alike: a forked child of this process that calls lib.runs.train.main.

    Each training process pays about 4-6 s importing torch and torch._dynamo (which torch.optim imports on
    first use) before its first step: for `check`'s 2-iteration cells nearly all of their time, for a 45 s GPU
    cell a tenth of its budget. preload() imports them once here, and every cell still gets its own process
    (own output, exit code, process group, no file descriptor of the runner's but its own lock), forked instead
    of exec'd. A GPU cell's child pins its GPUs itself (CUDA_VISIBLE_DEVICES is read when CUDA starts, in the
    child); this only works while this process has not started CUDA, which cuda_fork_safe() asks.
    """

    @staticmethod
    def preload(compiles: bool = False) -> None:
        """compiles: some cell will torch.compile its model, so also import the compiler (inductor and the
        graph partitioner, which pulls in networkx): every compiling cell imported them in its setup, 3.2 s
        of a 4.4 s setup on a CPU, and 1.8 s here once."""
        # torch.cuda.is_available() asks the CUDA runtime, after which no forked child may use CUDA; with this
        # set torch asks NVML instead (as torch.cuda.device_count() does anyway), which leaves forks usable.
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
        import gpt2.data.batches  # noqa: F401  (the data code a run imports when it starts, and tiktoken)
        import gpt2.data.prepare  # noqa: F401
        import gpt2.train.trainer  # noqa: F401  (torch, the model and the training code)
        import lib.runs.train  # noqa: F401
        import torch._dynamo  # noqa: F401
        if compiles:
            import torch._functorch.partitioners  # noqa: F401
            import torch._inductor.compile_fx  # noqa: F401

    @staticmethod
    def cuda_fork_safe() -> bool:
        """Whether a child forked now may use CUDA. torch marks a fork of a process that started CUDA as bad and
        refuses CUDA there; a forked probe reads that mark (torch's private flag: no public query exists)."""
        import torch

        if torch.cuda.is_initialized():
            return False
        pid = os.fork()
        if pid == 0:
            os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    def __init__(self, argv, env, cwd, keep_fd=None):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            self._child(argv, env, cwd, read_end, write_end, keep_fd)  # never returns
        os.close(write_end)
        self.pid, self.returncode = pid, None
        self.stdout = open(read_end, "rb")

    @staticmethod
    def _child(argv, env, cwd, read_end, write_end, keep_fd):
        code = 1
        try:
            os.setsid()
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            os.close(write_end)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            # As exec'd cells (close_fds): none of the runner's files, so no lock of the runner's (the matrix's,
            # another cell's) outlives it in this child; only the cell's own lock stays.
            keep = sorted({0, 1, 2} | ({keep_fd} if keep_fd is not None else set()))
            for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
                os.closerange(low + 1, high)
            hook = die_with_parent_hook(parent=os.getppid())
            if hook:
                hook()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # fresh objects: no lock inherited from a thread
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.argv = list(argv[1:])
            import torch

            torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or torch.get_num_threads()))
            from lib.runs import train as train_entry

            code = train_entry.main(argv[argv.index(train_entry.MODULE) + 1:])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) else 1)

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode
