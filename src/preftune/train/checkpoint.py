"""Atomic checkpoints: weights (safetensors) + trainer state (optimizer, scheduler, step, RNG, data position).

Nothing here is ever unpickled: tensors go to safetensors, everything else to JSON. A checkpoint is
written into a temporary directory and renamed into place, then the ``latest`` pointer is replaced
atomically, so a crash at any moment leaves the previous checkpoint usable.

Layout: ``RUN/checkpoints/step-000010/{model.safetensors, optimizer.safetensors, rng.safetensors,
trainer_state.json, manifest.json}`` and ``RUN/checkpoints/latest`` (a one-line file naming the directory).

``manifest.json`` is written last: every other file's size and SHA-256. ``--resume`` verifies it, and a checkpoint
whose files were truncated or altered after it was written (a failed copy, a bad disk) is named in a warning and
skipped for the newest one that verifies.

Sharded (FSDP2, DeepSpeed ZeRO) runs write one ``{model,optimizer,rng}.rank-R-of-N.safetensors`` per process:
each process's own shards of the weights (ZeRO: its flat fp32 partitions) and optimizer state, nothing gathered. They resume on the same number of processes (another
number is refused: the shards are cut for N).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.faults import maybe_fault
from preftune.train.rundir import atomic_write_text, writing

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded (DTensor) tensor; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            key = f"state.{pid}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = _local(value).detach().contiguous().cpu()
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    meta = {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (all of them in full fine-tuning, only the adapter with LoRA): frozen weights
    are rebuilt from the model spec on resume. Tied weights appear once (named_parameters deduplicates)."""
    return {name: _local(p).detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, *, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically and point ``latest`` at it; prune older ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    with writing(final, "checkpoint"):
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        try:
            save_file(model_state(model), str(tmp / "model.safetensors"))
            maybe_fault("mid_save")  # tests: a SIGKILL here must leave the previous checkpoint usable
            opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, str(tmp / "rng.safetensors"))
            state = dict(trainer_state, step=step, optimizer=opt_meta, rng=rng_meta, scheduler=scheduler.state_dict())
            _publish(tmp, final, state, keep)
        except BaseException:  # a failed write or an abort: the half-written directory goes, the previous stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _publish(tmp: Path, final: Path, state: dict[str, Any], keep: int) -> None:
    """Write the trainer state into the finished temporary directory, rename it into place, point ``latest`` at
    it, and prune older checkpoints and stale temporary directories."""
    root = final.parent
    (tmp / "trainer_state.json").write_text(json.dumps(state), encoding="utf-8")
    write_manifest(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """``manifest.json``: every file's size and SHA-256, written (and synced) after all of them."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    with open(directory / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a missing, truncated or altered file), or None."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        # checkpoints written before manifests existed carry none: trusted if their trainer state is there
        return None if (path / "trainer_state.json").is_file() else "no trainer_state.json and no manifest.json"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if _sha256(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (altered after it was written)"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies against its manifest: the one ``latest`` names, else (saying why, in a
    warning) the newest older one. None when the run has none; an error when it has some and none verifies."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    if named is not None and named in candidates:  # the pointer first; a newer unnamed dir was never published
        candidates = [named] + [p for p in candidates if p.name < named.name]
    problems = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if problems:
                log.warning("resuming from %s instead: %s", path, "; ".join(problems))
            return path
        problems.append(f"checkpoint {path} is corrupt: {problem}")
        log.warning("checkpoint %s is corrupt: %s", path, problem)
    if problems:
        from preftune.errors import InputError

        raise InputError(f"{run_dir}: no checkpoint can be trusted ({'; '.join(problems)})")
    return None


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; returns the trainer state dict."""
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    if state.get("sharded"):
        from preftune.errors import ConfigError

        raise ConfigError(f"{path}: written sharded by {state['sharded']['processes']} processes "
                          f"(train.sharding={state['sharded'].get('kind', 'fsdp2')}); resume it the same way")
    weights = load_file(str(path / "model.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        raise RuntimeError(f"checkpoint {path} does not match the model's trainable parameters: "
                           f"missing={sorted(trainable - set(weights))[:5]} unexpected={sorted(set(weights) - trainable)[:5]}")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def policies_along_training(run_dir: Path, spec: str, *, seed: int = 0):
    """(step, policy) for every checkpoint a run kept along its training, oldest first: the model ``spec`` rebuilt
    and the checkpoint's weights loaded over it (not strict: a LoRA run's checkpoint holds only the adapter). A
    checkpoint written only because the run was stopped (SIGTERM, SIGINT) is not one of them: a stopped and resumed
    run gives the same points as an uninterrupted one."""
    from safetensors.torch import load_file

    from preftune.models.load import load_causal_lm

    for ckpt in sorted((Path(run_dir) / "checkpoints").glob("step-*")):
        if json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("stopped"):
            continue
        policy = load_causal_lm(spec, seed=seed)
        policy.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        yield int(ckpt.name.split("-")[1]), policy


def _shard_file(kind: str, rank: int, world: int) -> str:
    return f"{kind}.rank-{rank}-of-{world}.safetensors"


def save_sharded_checkpoint(run_dir: Path, procs, *, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                            keep: int = 2) -> Path:
    """:func:`save_checkpoint` for FSDP2: every process writes its own shards into one temporary directory,
    then process 0 writes the trainer state, renames it into place and moves ``latest`` (all processes call it)."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    if procs.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    procs.barrier()
    rank, world = procs.rank, procs.world
    save_file(_model_shard(model, procs), str(tmp / _shard_file("model", rank, world)))
    maybe_fault("mid_save")
    with _optimizer_params(procs):
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / _shard_file("optimizer", rank, world)))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / _shard_file("rng", rank, world)))
    (tmp / f"rng.rank-{rank}-of-{world}.json").write_text(json.dumps(rng_meta), encoding="utf-8")
    procs.barrier()
    if procs.is_main:
        _publish(tmp, final, dict(trainer_state, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict(),
                                  sharded={"kind": procs.sharding, "processes": world}), keep)
    procs.barrier()
    return final


def _optimizer_params(procs):
    if not procs.zero:
        return contextlib.nullcontext()
    from preftune.train.zero import optimizer_params

    return optimizer_params(procs.ddp)


def _model_shard(model: torch.nn.Module, procs) -> dict[str, torch.Tensor]:
    """This process's part of the weights: its FSDP2 shards by parameter name, or its ZeRO fp32 partitions."""
    if not procs.zero:
        return model_state(model)
    from preftune.train.zero import fp32_partitions

    return {f"group.{i}": t.detach().contiguous().cpu() for i, t in enumerate(fp32_partitions(procs.ddp))}


def load_sharded_checkpoint(path: Path, procs, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            scheduler: Any) -> dict[str, Any]:
    """Restore this process's shards written by :func:`save_sharded_checkpoint`; returns the trainer state."""
    from torch.distributed.tensor import DTensor

    from preftune.errors import ConfigError

    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    written = (state.get("sharded") or {}).get("processes")
    if written is None:
        raise ConfigError(f"{path}: written unsharded (train.sharding=none); resume it with train.sharding=none")
    kind = state["sharded"].get("kind", "fsdp2")
    if kind != procs.sharding:
        raise ConfigError(f"{path}: written with train.sharding={kind}, resumed with {procs.sharding}; the shards "
                          f"are cut for {kind}: resume it with train.sharding={kind}")
    if written != procs.world:
        raise ConfigError(f"{path}: written by {written} sharded processes, resumed on {procs.world}; the shards are "
                          f"cut for {written}: resume on {written} processes")
    rank, world = procs.rank, procs.world
    weights = load_file(str(path / _shard_file("model", rank, world)))
    if procs.zero:
        from preftune.train.zero import restore_partitions

        restore_partitions(procs.ddp, [weights[f"group.{i}"] for i in range(len(weights))])
    else:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            raise RuntimeError(f"checkpoint {path} does not match the model's trainable parameters")
        with torch.no_grad():
            for name, p in params.items():
                _local(p).copy_(weights[name])
    saved = _unflatten_optimizer(load_file(str(path / _shard_file("optimizer", rank, world))), state["optimizer"])
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, pstate in saved["state"].items() if not procs.zero else ():  # FSDP2: each shard back into a DTensor
        p = ordered[pid]
        for name, value in pstate.items():
            if isinstance(p, DTensor) and isinstance(value, torch.Tensor) and value.shape == p.to_local().shape:
                pstate[name] = DTensor.from_local(value.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                                  stride=p.stride())
    with _optimizer_params(procs):
        optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    rng_meta = json.loads((path / f"rng.rank-{rank}-of-{world}.json").read_text(encoding="utf-8"))
    set_rng_state(load_file(str(path / _shard_file("rng", rank, world))), rng_meta)
    return state
