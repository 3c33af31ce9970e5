"""Optional experiment trackers (CONFIG_TRACKING). The run directory's own JSON files are always written;
a tracker is a second destination for the same numbers.

Every tracker receives the same things: the run's resolved settings once (as its configuration), then
scalars by optimizer step — train/loss, train/lr, train/grad_norm, perf/tokens_per_s, perf/mfu at each log
line, val/loss and val/ppl at each evaluation, and gates/<w_std|w_rec>/layerNN (the layer's mean gate) for
models that have gates. Each package is an optional extra (extras/<backend>.txt, installed by the Makefile
when .config selects it), imported only when chosen.

Where the data goes:
  tensorboard  <run_dir>/tensorboard/ event files       tensorboard --logdir <run_dir>
  wandb        <run_dir>/wandb/ (offline: sync later with `wandb sync <run_dir>/wandb/offline-run-*`)
  trackio      trackio's local store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio)   trackio show
A resumed run continues the same tracker run (wandb id and trackio name = the run directory's name).
"""

import dataclasses
import json
import math
from pathlib import Path


def _scalars(metrics: dict) -> dict:
    """The finite numbers of `metrics` (a step that has no MFU on a CPU logs None; trackers want floats)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def gate_scalars(gates: list) -> dict:
    """gates/<name>/layerNN: the mean over heads of each gate, from GPT.gate_values()."""
    out = {}
    for entry in gates:
        for name, values in entry.items():
            if name != "layer" and values:
                out[f"gates/{name}/layer{entry['layer']:02d}"] = sum(values) / len(values)
    return out


def _missing(backend: str, package: str) -> RuntimeError:
    return RuntimeError(f"CONFIG_TRACKING_{backend.upper()}=y needs the {package} package: `make` installs "
                        f"extras/{backend}.txt when .config selects it (or pip install -r extras/{backend}.txt), "
                        f"or choose TRACKING_NONE")


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, project: str, offline: bool):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(project=project, name=run_dir.name, id=run_dir.name, resume="allow",
                              dir=str(run_dir), config=config, mode="offline" if offline else "online")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, run_dir: Path, config: dict, project: str):
        try:
            import trackio
        except ImportError:
            raise _missing("trackio", "trackio") from None
        self.trackio = trackio
        self.run = trackio.init(project=project, name=run_dir.name, config=config, resume="allow",
                                auto_log_gpu=False, auto_log_cpu=False)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def build_tracker(settings, run_dir, enabled: bool = True):
    """The tracker CONFIG_TRACKING names, for `settings` (gpt2.settings.Settings); only the main rank tracks
    (enabled=False elsewhere)."""
    tracking = settings.tracking
    if not enabled or tracking.backend == "none":
        return NullTracker()
    run_dir, config = Path(run_dir), dataclasses.asdict(settings)
    if tracking.backend == "tensorboard":
        return TensorBoardTracker(run_dir, config)
    if tracking.backend == "wandb":
        return WandbTracker(run_dir, config, tracking.project, tracking.offline)
    if tracking.backend == "trackio":
        return TrackioTracker(run_dir, config, tracking.project)
    raise ValueError(f"CONFIG_TRACKING={tracking.backend!r}: expected none, tensorboard, wandb or trackio")
