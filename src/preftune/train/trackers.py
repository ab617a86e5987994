"""Experiment trackers (``run.report_to=tensorboard,wandb,mlflow,trackio``): every metrics row a run writes to
``metrics.jsonl`` goes to each tracker too, under the same names and step; the resolved config is logged as the
run's hyperparameters and ``training.png`` as an image where the tracker takes one. Process 0 alone reports.

Each tracker is its own client library (an optional extra: ``pip install 'preftune[wandb]'``; a missing one is a
config error before anything loads), configured the way that library is: TensorBoard writes event files into
``RUN/tensorboard``; W&B reads ``WANDB_PROJECT`` (default ``preftune``), ``WANDB_MODE``, ``WANDB_DIR`` (default
the run directory) and its API key from the environment; MLflow ``MLFLOW_TRACKING_URI`` and
``MLFLOW_EXPERIMENT_NAME`` (default ``preftune``); trackio ``TRACKIO_PROJECT`` (default ``preftune``) and
``TRACKIO_DIR``. preftune never reads, logs or writes an API key itself.

Rows reach the trackers through ``MetricsWriter`` (``train/rundir.py``): a run opens its trackers once its
directory exists (:func:`open_trackers`), and closes them after its plots (:func:`close_trackers`).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
NAMES = ("tensorboard", "wandb", "mlflow", "trackio")
_OPEN: dict[Path, "Trackers"] = {}  # run directory -> its trackers (MetricsWriter looks its run up here)


def parse_report_to(value: str | None) -> list[str]:
    """``run.report_to`` as tracker names (``none`` or empty: none), each checked and importable."""
    from preftune.errors import ConfigError

    names = [n.strip() for n in (value or "").split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in NAMES:
            raise ConfigError(f"config key 'run.report_to': unknown tracker {name!r} (choose from {', '.join(NAMES)}, "
                              "comma-separated, or none)")
        if importlib.util.find_spec(name) is None:  # each tracker's package has its name
            raise ConfigError(f"run.report_to={name} needs the {name} package: pip install 'preftune[{name}]'")
    return list(dict.fromkeys(names))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree if isinstance(tree, (int, float, str, bool)) else str(tree)}


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        for summary in hparams({k: v for k, v in config.items() if v is not None and v != ""}, {}):
            self.writer.file_writer.add_summary(summary)  # the config as this run's hyperparameters

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, name: str, path: Path) -> None:
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(str(path))[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "preftune"), name=run_dir.name,
                              dir=os.environ.get("WANDB_DIR", str(run_dir)), config=config, reinit="create_new")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "preftune"))
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def image(self, name: str, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        with contextlib.redirect_stdout(sys.stderr):  # trackio prints its progress: stdout holds the result
            import trackio

            self.trackio = trackio
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "preftune"), name=run_dir.name, config=config,
                         embed=False)

    def log(self, step: int, values: dict[str, float]) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.log(values, step=step)

    def image(self, name: str, path: Path) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.log({name: self.trackio.Image(str(path))})

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()


_KINDS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


class Trackers:
    """The trackers of one run (process 0): ``log(row)`` for each metrics row, ``image`` for a plot, ``close``."""

    def __init__(self, run_dir: Path, names: list[str], config: dict[str, Any]):
        from preftune.errors import ConfigError

        self.run_dir, self.names, self.clients = run_dir, names, []
        for name in names:
            try:
                self.clients.append(_KINDS[name](run_dir, config))
            except Exception as exc:  # a tracker that cannot start (its settings, its server): named, at once
                self.close()
                raise ConfigError(f"run.report_to={name}: the tracker did not start: "
                                  f"{type(exc).__name__}: {str(exc)[:500]}") from None

    def log(self, row: dict[str, Any]) -> None:
        values = _numbers(row)
        if values:
            for client in self.clients:
                client.log(int(row.get("step", 0)), values)

    def image(self, name: str, path: Path) -> None:
        for client in self.clients:
            client.image(name, path)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []


def open_trackers(cfg, run_dir: Path, procs=None) -> None:
    """Start ``cfg.run.report_to``'s trackers for ``run_dir`` on process 0 (nothing elsewhere, or with none)."""
    import dataclasses

    names = parse_report_to(getattr(cfg.run, "report_to", None))
    if not names or (procs is not None and not procs.is_main):
        return
    _OPEN[Path(run_dir)] = Trackers(Path(run_dir), names, _flat(dataclasses.asdict(cfg)))
    log.info("reporting to %s", ", ".join(names))


def trackers_for(run_dir: Path) -> Trackers | None:
    return _OPEN.get(Path(run_dir))


def close_trackers(run_dir: Path, image: Path | None = None) -> None:
    """Log ``image`` (the training plot) where it exists, then finish ``run_dir``'s trackers."""
    trackers = _OPEN.pop(Path(run_dir), None)
    if trackers is None:
        return
    if image is not None and image.is_file():
        trackers.image(image.stem, image)
    trackers.close()


@atexit.register
def _close_all() -> None:  # a run that stopped early (an error, a signal) still finishes its tracker runs
    for run_dir in list(_OPEN):
        with contextlib.suppress(Exception):
            close_trackers(run_dir)
