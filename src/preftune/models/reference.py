"""How the reference model is held. One interface, ``ref.logps(batch) -> SequenceLogps`` for a batch of
stacked chosen/rejected rows; the training loop does not know which strategy is behind it.

- ``FrozenReference`` (``reference.mode=model``): a separate copy of the weights the user gave (or of the
  policy's starting point), eval mode, gradients off; asserted to stay in eval mode at every call (a reference
  left in train mode with dropout on silently changes the loss).
- ``AdapterReference`` (``adapter``): the policy is a LoRA adapter on frozen base weights; the reference is
  the same module with the adapter disabled. One copy of the weights in memory.
- ``PrecomputedReference`` (``precomputed``): log-probs computed in one pass before training, cached on disk
  (safetensors) under a key that hashes everything they depend on, and carried in each batch as
  ``batch["ref_logps"]``. The reference model is freed before the policy loads, and evaluation after training
  reads the cached values: it can never silently use the trained policy as its reference.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from preftune.data.collate import batch_to, collate_pairs
from preftune.data.tokenize import TokenizedPair
from preftune.models.logprobs import (LogpsModule, SequenceLogps, autocast_context, batch_logps, completion_counts,
                                      module_logps)
from preftune.paths import cache_dir

log = logging.getLogger(__name__)


class FrozenReference:
    """``precision="bf16"``: the reference always runs under bf16 autocast, which casts every linear layer's
    fp32 weight to bf16 on every call. The decoder's linear weights are therefore stored in bf16 once: the same
    matmuls bit for bit, half their memory, and no per-step casts. The LM head (fp32 log-probs), embeddings and
    norms keep their dtype. Calling such a reference outside bf16 autocast fails loudly (a dtype mismatch)."""

    def __init__(self, model: torch.nn.Module, precision: str = "fp32", shard=None):
        self.model = model.eval().requires_grad_(False)
        self.module = None  # ``shard`` (FSDP2): the reference sharded like the policy, called as one module
        if shard is not None:
            self.module = shard(LogpsModule(self.model))  # FSDP keeps one parameter dtype per unit: no bf16 store
        elif precision == "bf16":
            store_linear_weights_bf16(self.model)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        assert not self.model.training, "the reference model must stay in eval mode"
        if self.module is not None:
            return SequenceLogps(*self.module(batch))
        return batch_logps(self.model, batch)


def store_linear_weights_bf16(model: torch.nn.Module) -> int:
    """Convert the decoder's ``nn.Linear`` weights to bf16 in place, one tensor at a time (so the peak is one
    extra tensor); returns how many. Skips the output embedding and anything tied to it. Biases stay fp32:
    autocast casts them for ``F.linear`` anyway, but some models add the bias outside it (Falcon's
    ``FalconLinear``: ``x @ W.T + bias``), where a bf16 bias changed the sum (2.5e-3 nats)."""
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder = get_decoder() if get_decoder else None
    if decoder is None or decoder is model:
        return 0
    head = get_head() if get_head else None
    keep = {id(head.weight)} if head is not None and getattr(head, "weight", None) is not None else set()
    converted = set()
    for module in decoder.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in keep:
            if module.weight.dtype == torch.float32:
                module.weight.data = module.weight.data.to(torch.bfloat16)
                converted.add(id(module.weight))
    if converted:
        # Weights loaded from safetensors are views of one memory-mapped file: as long as any tensor (the
        # embedding, a norm) still views it, the fp32 pages already read stay mapped and count as resident.
        # Owning copies of the rest release the mapping, so the conversion saves memory instead of adding it.
        for tensor in list(model.parameters()) + list(model.buffers()):
            if id(tensor) not in converted:
                tensor.data = tensor.data.clone()
    return len(converted)


class AdapterReference:
    """The policy's base weights with its LoRA adapter switched off. Under FSDP2 or ZeRO the forward goes through
    the sharded module the training step calls (``through``), which gathers the weights each process holds a
    part of; the adapter is switched off on the model inside it."""

    def __init__(self, peft_model: torch.nn.Module):
        self.model = peft_model
        self.module: torch.nn.Module | None = None

    def through(self, module: torch.nn.Module) -> None:
        self.module = module

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        with self.model.disable_adapter():
            return batch_logps(self.model, batch) if self.module is None else module_logps(self.module, batch)


class PrecomputedReference:
    """Reads the cached reference log-probs that collate put into the batch."""

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> SequenceLogps:
        if "ref_logps" not in batch:
            raise RuntimeError("precomputed reference: the batch carries no ref_logps (items were not annotated)")
        return SequenceLogps(logps=batch["ref_logps"].to(torch.float32), n_tokens=completion_counts(batch))


# ---- precompute + cache ----------------------------------------------------------------------------------

def weights_identity(spec: str, seed: int) -> str:
    """A content hash of the reference weights named by ``spec`` (files on disk, or the tiny model's seed and
    config), computed without loading the model; each file's digest is remembered (``load.file_digest``)."""
    from preftune.models.load import TINY_ALIAS, file_digest, resolve_spec
    from preftune.models.lora import base_of, is_adapter_dir

    if spec == TINY_ALIAS:
        return f"tiny:seed={seed}"
    adapter = is_adapter_dir(spec)
    path = Path(spec) if adapter else Path(resolve_spec(spec))
    if not path.exists():
        path = _hub_snapshot(spec)
        if path is None:
            return f"hub:{spec}"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + file_digest(f).encode())
    if adapter:  # the adapter's log-probs are those of base + adapter: a changed base changes them too
        digest.update(b"base:" + weights_identity(*base_of(spec)).encode())
    return digest.hexdigest()


def _hub_snapshot(spec: str) -> Path | None:
    """The local snapshot directory of a hub id (its files name the revision), or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - not a hub id, or not downloaded yet
        return None


def cache_key(*, weights: str, tokenizer, settings: dict, items: list[TokenizedPair]) -> str:
    """Hash of (reference weights, tokenizer, chat template, truncation settings, precision, dataset content as
    tokenised). Any change to any of them gives a new key, hence a recomputation."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    for part in (weights, hashlib.sha256(vocab.encode()).hexdigest(), str(getattr(tokenizer, "chat_template", "")),
                 json.dumps(settings, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\x00")
    for item in items:
        h.update(json.dumps([item.prompt_ids, item.chosen_ids, item.rejected_ids]).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_logps(model: torch.nn.Module, items: list[TokenizedPair], pad_id: int, batch_size: int,
                  device: torch.device, precision: str) -> torch.Tensor:
    """(N, 2) summed completion log-probs [chosen, rejected] of each pair under ``model``."""
    model.eval()
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = batch_to(collate_pairs(chunk, pad_id), device)
        with autocast_context(device, precision):
            logps = module_logps(model, batch).logps  # a model, or its sharded LogpsModule
        n = len(chunk)
        out.append(torch.stack([logps[:n], logps[n:]], dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def shared_logps(model: torch.nn.Module, items: list[TokenizedPair], procs, pad_id: int, batch_size: int,
                 device: torch.device, precision: str) -> torch.Tensor:
    """:func:`compute_logps` with the pairs shared out over ``procs``: each process computes every world-th pair
    (its share padded to the same length, so that every process runs as many forwards: under FSDP2 each is a
    collective), and the shares are gathered back into the pairs' order on every process."""
    if procs is None or procs.world == 1:
        return compute_logps(model, items, pad_id, batch_size, device, precision)
    world, rank = procs.world, procs.rank
    per = -(-len(items) // world)
    share = items[rank::world]
    mine = compute_logps(model, share + [items[0]] * (per - len(share)), pad_id, batch_size, device, precision)
    everyone = procs.gather(mine)  # (world * per, 2), process by process
    full = torch.empty(len(items), 2)
    for r in range(world):
        positions = list(range(r, len(items), world))
        full[positions] = everyone[r * per:r * per + len(positions)]
    log.info("process %d computed %d of %d reference log-probs", rank, len(share), len(items))
    return full


def annotate(items: list[TokenizedPair], logps: torch.Tensor) -> list[TokenizedPair]:
    assert logps.shape == (len(items), 2), (logps.shape, len(items))
    return [replace(item, ref_logps=(float(c), float(r))) for item, (c, r) in zip(items, logps.tolist())]


def precompute(splits: dict[str, list[TokenizedPair]], *, load_model: Callable[[], torch.nn.Module],
               weights: str, tokenizer, settings: dict, pad_id: int, batch_size: int, device: torch.device,
               precision: str, root: Path | None = None, procs=None,
               prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> dict[str, list[TokenizedPair]]:
    """Annotate each split's items with cached reference log-probs, computing (and caching) what is missing.
    The model is loaded only on a cache miss (``prepare``d: sharded under FSDP2) and freed before returning.

    Several processes (``procs``): process 0 decides whether the cache holds a split and reads it, or every
    process computes its share (:func:`shared_logps`) and process 0 writes the cache; the log-probs reach the
    others through the process group, so the cache directory need not be shared between machines."""
    root = Path(root) if root else cache_dir() / "reference"
    root.mkdir(parents=True, exist_ok=True)
    settings = dict(settings, precision=precision)
    out: dict[str, list[TokenizedPair]] = {}
    model = None
    for name, items in splits.items():
        if not items:
            out[name] = items
            continue
        key = cache_key(weights=weights, tokenizer=tokenizer, settings=settings, items=items)
        path = root / f"{key}.safetensors"
        main = procs is None or procs.is_main
        cached = path.is_file() if main else None
        if procs is not None:
            cached = procs.broadcast(cached)
        if cached:
            if main:
                log.info("reference log-probs for %s: reusing cache %s", name, path)
            logps = load_file(str(path))["logps"] if main else None
            if procs is not None:
                logps = procs.broadcast(logps)
        else:
            if main:
                log.info("reference log-probs for %s: computing %d pairs (cache %s)", name, len(items), path)
            if model is None:  # ``prepare`` (FSDP2) shards it onto the device from host memory
                model = prepare(load_model()) if prepare is not None else load_model().to(device)
            logps = shared_logps(model, items, procs, pad_id, batch_size, device, precision)
            if main:
                tmp = path.with_name(f".{path.name}.tmp")
                save_file({"logps": logps.contiguous()}, str(tmp),
                          metadata={"weights": weights, "pairs": str(len(items))})
                os.replace(tmp, path)
        out[name] = annotate(items, logps)
    if model is not None:
        del model
        gc.collect()
    return out
