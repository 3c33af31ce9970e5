"""Whether the machine was measurably busy while the run trained: other work on its cores or on its GPU.

A busy machine slows a run down and, under a time budget, makes it see fewer tokens, so a comparison
between runs must know. Two cheap measurements, taken at the loop's log and evaluation points only:

    CPU  the 1-minute load average (runnable + waiting tasks, os.getloadavg) against the cores this process
         may use (os.sched_getaffinity). A lone CPU run keeps about that many threads busy itself, so a
         load above the core count means something else wanted the cores too.
    GPU  processes other than this one holding a context on the run's GPU (nvidia-smi, at most once per
         evaluation). nvidia-smi takes tens of milliseconds, 1-2 s over a 45 s cell that evaluates every
         second: it runs beside the loop (started at one evaluation, read at the next), never waited for
         until the run ends.

The record is metrics.json's "machine"; a checkpoint carries the samples (MachineLoad's fields) so a
resumed run reports over all its sessions.
"""

import os
import subprocess
from dataclasses import asdict, dataclass

NVIDIA_SMI = ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"]


def usable_cpus() -> int:
    """Cores this process may run on (its affinity mask: a cgroup or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def other_gpu_processes(listing: str, gpu_uuid: str, own_pid: int) -> int | None:
    """Processes on the GPU `gpu_uuid` other than `own_pid`, from nvidia-smi's "pid, gpu_uuid" lines.

    This process holds a context on that GPU, so it must be among them. When it is not, nvidia-smi sees
    another PID namespace (a container shows the host's PIDs): one of the listed processes is then this
    one. When none is listed at all, the processes are hidden from us: unknown (None), not zero.
    """
    wanted = gpu_uuid.lower().removeprefix("gpu-")
    pids = []
    for line in listing.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].lower().removeprefix("gpu-") == wanted:
            pids.append(int(fields[0]))
    if not pids:
        return None
    return len(pids) - pids.count(own_pid) if own_pid in pids else len(pids) - 1


class GpuNeighbours:
    """One nvidia-smi listing of the processes on the GPU `gpu_uuid`, running in the background from construction."""

    def __init__(self, gpu_uuid: str):
        self.gpu_uuid = gpu_uuid
        self.proc = subprocess.Popen(NVIDIA_SMI, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self, timeout: float = 10.0) -> int | None:
        """Other processes on the GPU, or None: nvidia-smi failed, timed out or sees no processes."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return None
        return other_gpu_processes(out, self.gpu_uuid, os.getpid()) if self.proc.returncode == 0 else None


def start_gpu_probe(device) -> GpuNeighbours | None:
    """nvidia-smi started in the background for the CUDA `device`; None when not CUDA or no nvidia-smi."""
    if device.type != "cuda":
        return None
    import torch

    try:
        return GpuNeighbours(str(torch.cuda.get_device_properties(device).uuid))
    except (AttributeError, OSError, RuntimeError):
        return None


def busy_verdict(device_type: str, cpus: int, load_avg_max: float | None,
                 gpu_other_processes: int | None) -> tuple[bool, str | None]:
    """(busy, why): a CPU run whose 1-minute load rose above its usable cores, or a GPU shared with others."""
    if device_type == "cpu" and load_avg_max is not None and load_avg_max > cpus:
        return True, f"1-minute load average reached {load_avg_max:.2f} on {cpus} usable core(s)"
    if gpu_other_processes:
        return True, f"{gpu_other_processes} other process(es) on the GPU"
    return False, None


@dataclass
class MachineLoad:
    """The samples so far (plain values: they travel in the checkpoint's progress)."""
    load_samples: int = 0
    load_avg_sum: float = 0.0
    load_avg_max: float | None = None
    gpu_other_processes: int | None = None  # the most seen at once

    def __post_init__(self):
        self._probe = None  # the nvidia-smi in flight (not a sample: a checkpoint does not carry it)

    def sample(self, device=None) -> None:
        """One load-average sample; with a device (at evaluations) also the GPU's other processes: the listing
        started at an earlier evaluation is read if it has finished, and a new one starts if none is running."""
        load = load_average()
        if load is not None:
            self.load_samples += 1
            self.load_avg_sum += load
            self.load_avg_max = load if self.load_avg_max is None else max(self.load_avg_max, load)
        if device is None:
            return
        if self._probe is not None and self._probe.done():
            self._take(self._probe.result())
        if self._probe is None:
            self._probe = start_gpu_probe(device)

    def finish(self) -> None:
        """Wait for the listing in flight (the run's end), so a short run has its GPU sample too."""
        if self._probe is not None:
            self._take(self._probe.result())

    def _take(self, others) -> None:
        self._probe = None
        if others is not None:
            self.gpu_other_processes = max(others, self.gpu_other_processes or 0)

    def state(self) -> dict:
        return asdict(self)

    def record(self, device_type: str) -> dict:
        """metrics.json's "machine"."""
        cpus = usable_cpus()
        busy, reason = busy_verdict(device_type, cpus, self.load_avg_max, self.gpu_other_processes)
        return {"cpus": cpus, "load_avg_max": self.load_avg_max,
                "load_avg_mean": self.load_avg_sum / self.load_samples if self.load_samples else None,
                "gpu_other_processes": self.gpu_other_processes, "busy": busy, "busy_reason": reason}
