"""The run directory is a reproduction recipe: resolved config.yaml, env.json, metrics.jsonl, checkpoints,
plots, and the final model."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from preftune.config import Config

log = logging.getLogger(__name__)


# a directory holding any of these holds a run (a config.yaml alone: a run that stopped before it trained)
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "policy", "reward_model")
# everything a training command writes into its run directory, removed by run.overwrite=true (nothing else is)
RUN_ARTIFACTS = RUN_MARKERS + ("config.yaml", "env.json", "training.png", "value_head.safetensors", "prompts.jsonl",
                               "policy-merged")


def make_run_dir(cfg: Config, command: str) -> Path:
    """A new run's directory, taken for this process (:func:`lock_run_dir`). One that already holds a run is
    refused (continue it with --resume), or emptied of that run's files with ``run.overwrite=true``."""
    from preftune.errors import ConfigError

    path = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run.dir {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run.dir {path} cannot be created: {exc.strerror or exc}") from None
    lock_run_dir(path)
    held = [name for name in RUN_MARKERS if (path / name).exists()]
    if held and not getattr(cfg.run, "overwrite", False):
        raise ConfigError(f"run.dir {path} already holds a run ({', '.join(held)}): continue it with --resume {path}, "
                          f"choose another run.dir, or replace it with run.overwrite=true")
    for name in RUN_ARTIFACTS if held else ():
        target = path / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    if held:
        log.warning("run.overwrite=true: removed the previous run in %s (%s)", path, ", ".join(held))
    cfg.run.dir = str(path)
    write_run_config(cfg, path, command)
    write_env(path, cfg.train.seed)
    return path


_LOCKS: dict[str, Any] = {}  # resolved run directory -> the open lock file this process holds (until it exits)


def write_run_config(cfg: Config, path: Path, command: str) -> None:
    """``RUN/config.yaml``, atomically: the resolved config, naming ``command`` when the config is that command's
    own (the demo's DPO run saves a DemoConfig)."""
    import yaml

    from preftune.config import to_dict

    own = getattr(type(cfg), "COMMANDS", (getattr(type(cfg), "COMMAND", command),))
    data = ({"command": command} if command in own else {}) | to_dict(cfg)
    atomic_write_text(path / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def lock_run_dir(path: Path) -> None:
    """Take ``RUN/.lock`` for this process (an exclusive ``flock``, released by the kernel when the process ends,
    however it ends). A directory another live process holds is refused, naming its pid and host; a lock file left
    by a run that was killed is unlocked, so it is taken over (and said so)."""
    import fcntl
    import socket

    from preftune.errors import ConfigError

    key = str(path.resolve())
    if key in _LOCKS:
        return
    lock_path = path / ".lock"
    try:
        f = open(lock_path, "a+", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"run.dir {path} cannot be written: {exc.strerror or exc}") from None
    f.seek(0)
    previous = f.read().strip()
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        owner = _describe_owner(previous)
        raise ConfigError(f"run.dir {path} is in use by another run ({owner}); wait for it, or choose another "
                          f"run.dir") from None
    if previous:
        log.warning("run.dir %s: took over the lock left by a run that is no longer running (%s)", path,
                    _describe_owner(previous))
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    f.flush()
    if not _LOCKS:
        atexit.register(release_run_dirs)
    _LOCKS[key] = f


def release_run_dirs() -> None:
    """Give up the run directories this process holds (at the end of a command, and at exit): their lock files are
    emptied and unlocked (a killed process leaves its pid in them, which the next run reports as a stale lock it
    takes over)."""
    for f in _LOCKS.values():
        try:
            f.seek(0)
            f.truncate()
            f.close()
        except OSError:
            pass
    _LOCKS.clear()


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return f"pid {owner['pid']} on host {owner['host']}, started {owner['started']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def loaded_allocator() -> str:
    """This process's memory allocator, recorded in RUN/env.json and the benchmark's rows: ``tcmalloc`` or
    ``jemalloc`` when one is mapped into it (preloaded), else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "system"
    libraries = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    for name in ("tcmalloc", "jemalloc"):
        if any(lib.startswith("lib" + name) for lib in libraries):
            return name
    return "system"


def write_env(path: Path, seed: int) -> None:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": loaded_allocator(), "git_sha": _git_sha(), "seed": seed,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from preftune.version import __version__

    env["preftune"] = __version__
    (path / "env.json").write_text(json.dumps(env, indent=2), encoding="utf-8")


@contextlib.contextmanager
def writing(path, what: str):
    """Turn a failed write inside the block (disk full, quota, read-only, file too large: an OSError, or the
    safetensors writer's I/O error) into an :class:`~preftune.errors.OutputError` naming ``what``, the path and
    the cause."""
    from preftune.errors import OutputError

    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        if type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc):
            cause = re.sub(r" \(os error \d+\)$", "", str(exc).split("I/O error: ")[-1])
            raise OutputError(f"cannot write {what} {path}: {cause}") from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, "file"):
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a run that stops keeps every logged step; each row
    also goes to the run's experiment trackers, if it has any (``run.report_to``, train/trackers.py)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False: a process other than the first of a multi-process run writes nothing
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def write(self, row: dict[str, Any]) -> None:
        """Append one row, whole or not at all: a failed write is cut back to the previous row's end."""
        if not self.enabled:
            return
        with writing(self.path, "metrics"):
            f = self._open()
            end = f.tell()
            try:
                f.write(json.dumps(row) + "\n")
                f.flush()
            except OSError:
                self._file = None
                with contextlib.suppress(OSError):
                    f.close()  # the flush inside close fails again; the bytes that did reach the file are cut
                with contextlib.suppress(OSError):
                    os.truncate(self.path, end)
                raise
        from preftune.train.trackers import trackers_for

        trackers = trackers_for(self.path.parent)
        if trackers is not None:
            trackers.log(row)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
