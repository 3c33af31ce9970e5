"""Optional experiment trackers (CONFIG_TRACKING). The run directory's own JSON files are always written;
a tracker is a second destination for the same numbers."""

from pathlib import Path


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files under <run_dir>/tensorboard (view with `tensorboard --logdir <run_dir>`)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("CONFIG_TRACKING_TENSORBOARD=y needs the tensorboard package "
                               "(pip install tensorboard), or choose TRACKING_NONE") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def build_tracker(tracking, run_dir, enabled: bool = True):
    """The tracker for CONFIG_TRACKING; only the main rank tracks (enabled=False elsewhere)."""
    if not enabled or tracking.backend == "none":
        return NullTracker()
    if tracking.backend == "tensorboard":
        return TensorBoardTracker(Path(run_dir) / "tensorboard")
    raise ValueError(f"CONFIG_TRACKING={tracking.backend!r} is not implemented; choose none or tensorboard")
