"""The run directory is a reproduction recipe: resolved config.yaml, env.json, metrics.jsonl, checkpoints,
plots, and the final model."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from preftune.config import Config, save_config


def make_run_dir(cfg: Config, command: str) -> Path:
    path = Path(cfg.run.dir) if cfg.run.dir else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    cfg.run.dir = str(path)
    # the command is recorded when the config is that command's own (the demo's DPO run saves a DemoConfig)
    own = getattr(type(cfg), "COMMANDS", (getattr(type(cfg), "COMMAND", command),))
    save_config(cfg, path / "config.yaml", command=command if command in own else None)
    write_env(path, cfg.train.seed)
    return path


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_env(path: Path, seed: int) -> None:
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_sha": _git_sha(), "seed": seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    from preftune import __version__

    env["preftune"] = __version__
    (path / "env.json").write_text(json.dumps(env, indent=2), encoding="utf-8")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that a reader (or a crash) sees the old content or the new, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a run that stops keeps every logged step."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled  # False: a process other than the first of a multi-process run writes nothing
        self._file = None

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        return self._file

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        f = self._open()
        f.write(json.dumps(row) + "\n")
        f.flush()

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
