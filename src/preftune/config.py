"""Strict, typed configuration.

Every option has its default here and nowhere else. A YAML file and ``dotted.key=value`` overrides are
merged onto the defaults; an unknown key or a value of the wrong type fails *before* any model loads,
naming the key. The resolved config is saved into every run directory (``config.yaml``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from preftune.errors import ConfigError


@dataclass
class DataConfig:
    train: str | None = None  # preference pairs (or SFT examples): .jsonl[.gz] .json .csv .parquet or a datasets dir
    eval: str | None = None  # held-out pairs; when unset, `eval_fraction` of train is held out
    eval_fraction: float = 0.0
    max_length: int = 512  # bound on prompt + response tokens, per sequence
    # longer prompts keep their END (the part next to the response); null: min(256, max_length // 2), resolved when
    # the config loads (so data.max_length alone may be set)
    max_prompt_tokens: int | None = None
    prompt_overflow: str = "truncate"  # truncate | error: a prompt over max_prompt_tokens is cut or is an error
    append_eos: bool = True  # false: responses carry their own end marker (sampled text that kept its EOS)
    on_invalid: str = "error"  # error | skip: a malformed record stops the run (exit 2) or is skipped and counted
    limit: int | None = None  # read at most this many pairs (quick experiments)
    # records with several ranked/scored responses expand into all ordered pairs; keep at most this many per
    # record (largest score gaps first)
    max_pairs_per_prompt: int | None = None


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    # passes over the training data instead (as num_train_epochs): when set, max_steps becomes
    # ceil(epochs x train items / (batch_size x grad_accum_steps x processes)), recorded in RUN/config.yaml
    epochs: float | None = None
    batch_size: int = 8  # pairs (DPO) or examples (SFT) per micro-batch, per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step; effective batch = batch_size * grad_accum_steps
    lr: float = 5e-6
    optimizer: str = "rmsprop"  # rmsprop (the DPO paper's choice) | adamw | sgd (plain, no momentum)
    weight_decay: float = 0.0
    warmup_steps: int | None = None  # None: the paper's 150 steps, scaled to the run (at most 10% of max_steps)
    schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    max_grad_norm: float = 10.0  # the paper's value; 0 disables clipping
    # a step whose loss or gradient is not finite is skipped (counted as train/skipped_steps); more than this many
    # in a row stop the run with an error (exit status 3)
    max_skipped_steps: int = 5
    seed: int = 0  # fixes initialisation (tiny model), data order and sampling
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    eval_batch_size: int = 16
    precision: str = "auto"  # auto | fp32 | bf16 (autocast for the transformer body; log-probs are always fp32)
    # auto | padded | prefix_shared (one [prompt][chosen][rejected] row per pair) | packed (several such triples
    # per row, block-diagonal mask, rows no longer than the longest triple)
    layout: str = "auto"
    compile: bool = False  # torch.compile the trained model's decoder in place (GPU; costs compile time up front)
    gradient_checkpointing: bool = False  # recompute activations in the backward: less memory, ~30% more compute
    device: str = "auto"  # auto (a CUDA GPU when there is one, else the CPU) | cpu | cuda | cuda:N | mps
    save_final: bool = True  # the final checkpoint and RUN/policy; false: metrics only (throughput benchmarks)
    num_threads: int | None = None  # torch intra-op threads on CPU (None: torch's default)
    # several processes: none (data parallel, every process holds whole models) | fsdp2 (policy, gradients,
    # optimizer state and the reference sharded across the processes; see train/sharding.py) | zero1 | zero2 |
    # zero3 (DeepSpeed ZeRO: optimizer state / + gradients / + weights partitioned; the reference always
    # partitioned; see train/zero.py; pip install 'preftune[deepspeed]')
    sharding: str = "none"
    # CUDA: TF32 tensor cores for fp32 matmuls (under bf16 autocast that is the LM head's log-prob matmuls, which
    # in true fp32 run at a fraction of the bf16 rate); 10-bit mantissa inputs, fp32 accumulation. Off: IEEE fp32
    tf32: bool = False
    progress: bool = True  # live progress bar


@dataclass
class DPOConfig:
    loss: str = "sigmoid"  # sigmoid | robust | ipo | hinge | simpo | orpo (see preftune/losses)
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO / rDPO: assumed probability that a label is flipped
    gamma: float | None = None  # SimPO's target margin (None: the loss's default)
    average_log_probs: bool | None = None  # IPO: per-token averaged (default) or summed log-ratios
    sft_weight: float = 0.0  # adds sft_weight * (length-averaged NLL of the chosen response), RPO-style


@dataclass
class ReferenceConfig:
    # model: a frozen copy of `ref_model` (or of `model`) | adapter: train a LoRA adapter, the reference is the
    # same weights with the adapter disabled | precomputed: reference log-probs computed once and cached on disk,
    # the reference model is never held during training | none: reference-free losses (simpo, orpo)
    mode: str = "model"
    cache_dir: str | None = None  # precomputed log-probs (default: <preftune cache>/reference)


@dataclass
class LoRAConfig:
    enabled: bool = False  # train a LoRA adapter instead of all weights (implied by reference.mode=adapter)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = "all-linear"  # comma-separated module names, or all-linear
    export_merged: bool = True  # also write the merged full model to RUN/policy-merged


@dataclass
class RunConfig:
    dir: str | None = None  # default: runs/<command>-<timestamp>
    plot: bool = True
    overwrite: bool = False  # a run.dir that already holds a run: false refuses it (use --resume), true replaces it
    # experiment trackers for dpo, sft, reward and ppo: none | tensorboard | wandb | mlflow | trackio, several
    # comma-separated (each an optional extra; see preftune/train/trackers.py)
    report_to: str = "none"


@dataclass
class Config:
    """The preference-training config (``preftune dpo`` and ``preftune eval``) and the shared vocabulary: another
    command's config holds only the sections it reads, under the same names."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("dpo", "eval")

    model: str = "smollm2-135m"  # alias (smollm2-135m, tiny), local HF dir, .gguf file, or hub id
    ref_model: str | None = None  # the reference; defaults to `model` (loaded separately, frozen)
    trust_remote_code: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.prompt_overflow": ("truncate", "error"),
    "data.on_invalid": ("error", "skip"),
    "train.optimizer": ("rmsprop", "adamw", "sgd"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.layout": ("auto", "padded", "prefix_shared", "packed"),
    "train.sharding": ("none", "fsdp2", "zero1", "zero2", "zero3"),
    "reference.mode": ("model", "adapter", "precomputed", "none"),
    "judge.mode": ("logprobs", "text"),  # the judge section of preftune judge / winrate (eval/judges.py)
}


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` coerced to `annotation` (int -> float only), or raise ConfigError naming `key`."""
    hint = annotation
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        hint = non_none[0] if len(non_none) == 1 else hint
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and math.isnan(value):  # NaN would pass every range check
        raise ConfigError(f"config key '{key}': expected a number, got nan")
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"config key '{key}': expected {hint.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "", command: str | None = None,
           skip_defaults: bool = False) -> None:
    """Apply a nested dict onto a dataclass instance in place, strictly. ``command``: the command whose own config
    ``obj`` is (a key of the shared vocabulary that it lacks is "not used by <command>"); ``skip_defaults``: such a
    key is passed over when it holds the vocabulary's default (a run's config.yaml saved when the command's
    config still carried that section)."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            if command is not None and _in_vocabulary(key):
                if skip_defaults and _is_vocabulary_default(key, value):
                    continue
                raise ConfigError(_not_used(obj, command, key, value))
            known = ", ".join(prefix + f for f in fields)
            raise ConfigError(f"unknown config key '{key}' (known: {known})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{key}.", command=command, skip_defaults=skip_defaults)
        else:
            setattr(obj, name, _check_value(key, value, hints[name]))


def _vocabulary_node(key: str) -> Any:
    """The default at ``key`` in the shared vocabulary (``Config``, the preference-training config); a KeyError
    when no command knows the key."""
    node: Any = Config()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            raise KeyError(key)
        node = getattr(node, part)
    return node


def _in_vocabulary(key: str) -> bool:
    try:
        _vocabulary_node(key)
    except KeyError:
        return False
    return True


def _is_vocabulary_default(key: str, value: Any) -> bool:
    node = _vocabulary_node(key)
    return (dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node) == value


def _not_used(obj: Any, command: str, key: str, value: Any) -> str:
    """The error for a key of the shared vocabulary that ``command``'s config lacks: the leaf key it names, and
    where the setting lives instead when the section says so (its ``INSTEAD`` mapping)."""
    leaf = key
    while isinstance(value, dict) and value:  # name the first key set away from its default (else the first)
        known = [n for n in value if _in_vocabulary(f"{leaf}.{n}")]
        if not known:
            break
        name = next((n for n in known if not _is_vocabulary_default(f"{leaf}.{n}", value[n])), known[0])
        leaf, value = f"{leaf}.{name}", value[name]
    instead = getattr(obj, "INSTEAD", {}).get(key.rsplit(".", 1)[-1])
    if instead is not None:
        return f"config key '{leaf}' is not used by {command} (set {instead})"
    section = key.split(".")[0]
    where = f" (it has no '{section}' section)" if "." not in key and "." in leaf else ""
    return f"config key '{leaf}' is not used by {command}{where}"


def _check_data(d: DataConfig) -> None:
    if d.max_length < 2:
        raise ConfigError(f"config key 'data.max_length' must be >= 2 (a prompt token and a response token), got "
                          f"{d.max_length}")
    if d.max_prompt_tokens is None:  # resolved here, once: RUN/config.yaml records the number
        d.max_prompt_tokens = min(256, d.max_length // 2)
    if d.max_prompt_tokens < 1:
        raise ConfigError("config key 'data.max_prompt_tokens' must be >= 1: the last prompt token predicts the "
                          "first response token")
    if d.max_prompt_tokens >= d.max_length:
        raise ConfigError("config key 'data.max_prompt_tokens' must be below 'data.max_length' (responses need room)")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError("config key 'data.eval_fraction' must be in [0, 1)")
    if d.limit is not None and d.limit < 1:
        raise ConfigError(f"config key 'data.limit' must be >= 1 (or null for all), got {d.limit}")
    if d.max_pairs_per_prompt is not None and d.max_pairs_per_prompt < 1:
        raise ConfigError("config key 'data.max_pairs_per_prompt' must be >= 1 (or null for all pairs)")


def _check_train(t: TrainConfig) -> None:
    for key, value in (("train.max_steps", t.max_steps), ("train.batch_size", t.batch_size),
                       ("train.grad_accum_steps", t.grad_accum_steps), ("train.log_every", t.log_every),
                       ("train.eval_batch_size", t.eval_batch_size), ("train.keep_checkpoints", t.keep_checkpoints)):
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    for key, value in (("train.lr", t.lr), ("train.weight_decay", t.weight_decay),
                       ("train.max_grad_norm", t.max_grad_norm), ("train.max_skipped_steps", t.max_skipped_steps),
                       ("train.eval_every", t.eval_every), ("train.save_every", t.save_every)):
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise ConfigError(f"config key 'train.warmup_steps' must be >= 0 (or null for the paper's 150, scaled), got "
                          f"{t.warmup_steps}")
    if t.epochs is not None and not t.epochs > 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0 (or null to train for train.max_steps), got {t.epochs}")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"config key 'train.num_threads' must be >= 1 (or null for torch's default), got "
                          f"{t.num_threads}")


def _check_dpo(p: DPOConfig) -> None:
    if not 0.0 <= p.label_smoothing < 0.5:
        raise ConfigError("config key 'dpo.label_smoothing' must be in [0, 0.5)")
    from preftune.losses import loss_names

    if p.loss not in loss_names():
        raise ConfigError(f"config key 'dpo.loss': {p.loss!r} is not one of {', '.join(loss_names())}")
    if p.beta <= 0:
        raise ConfigError("config key 'dpo.beta' must be > 0")
    if p.sft_weight < 0:
        raise ConfigError("config key 'dpo.sft_weight' must be >= 0")


def _check_lora(lora: LoRAConfig) -> None:
    if lora.r < 1:
        raise ConfigError("config key 'lora.r' must be >= 1")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"config key 'lora.dropout' must be in [0, 1), got {lora.dropout}")


def _check_run(r: RunConfig) -> None:
    from preftune.train.trackers import parse_report_to

    parse_report_to(r.report_to)


_SECTION_CHECKS = {DataConfig: _check_data, TrainConfig: _check_train, DPOConfig: _check_dpo, LoRAConfig: _check_lora,
                   RunConfig: _check_run}


def _validate(cfg: Any) -> None:
    """The checks of every section the config holds (a command's config holds only the sections it reads)."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section, None), name, None)
        if hasattr(cfg, section) and hasattr(getattr(cfg, section), name) and value not in choices:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        check = _SECTION_CHECKS.get(type(section))
        if check is not None:
            check(section)


def _field_hint(cfg: Config, key: str) -> Any:
    """The declared type of a dotted key, or None when the key does not exist (reported later)."""
    obj: Any = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return typing.get_type_hints(type(obj)).get(parts[-1]) if dataclasses.is_dataclass(obj) else None


def parse_override(text: str, cfg: Config | None = None) -> tuple[str, Any]:
    """``"dpo.beta=0.05"`` -> ``("dpo.beta", 0.05)``. Values parse as YAML scalars, except that a
    string-typed key keeps the raw text (``data.train=123.jsonl`` stays a string); ``null`` means None, and so
    does ``none`` for keys that may be None (``reference.mode=none`` stays the string "none")."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    hint = _field_hint(cfg or Config(), key)
    allows_none = hint is not None and type(None) in typing.get_args(hint)
    if raw.lower() in ("null", "~") or (raw.lower() == "none" and allows_none):
        return key, None
    if hint is not None and str in (typing.get_args(hint) or (hint,)):
        return key, raw
    try:
        return key, yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: a date like 2001-13-45; RecursionError: [[[[..
        return key, raw


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: Any = None, *, skip_defaults: bool = False) -> Any:
    """Defaults <- YAML file <- overrides, strictly checked, onto ``base`` (a command's config; default the
    preference-training ``Config``). A YAML file may name its command (``command: dpo``, first key by convention):
    given to another command's config it is refused. ``skip_defaults``: see ``_merge`` (resuming a saved run)."""
    cfg = base if base is not None else Config()
    command = getattr(type(cfg), "COMMAND", None)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, a date like 2001-13-45
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise ConfigError(f"{path}: invalid YAML: {why}") from None
        if isinstance(loaded, dict) and "command" in loaded:
            named = loaded.pop("command")
            if not isinstance(named, str) or not named:
                raise ConfigError(f"{path}: 'command' must name a command (e.g. command: dpo), got {named!r}")
            commands = getattr(type(cfg), "COMMANDS", (command,) if command else ())
            if named not in commands:
                raise ConfigError(f"{path} is a config for `preftune {named}`, not for "
                                  f"`preftune {' / '.join(commands) or 'dpo'}`")
        _merge(cfg, loaded, command=command, skip_defaults=skip_defaults)
    for text in overrides:
        key, value = parse_override(text, cfg)
        _merge(cfg, _nest(key, value), command=command)
    _validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path, command: str | None = None) -> None:
    """The resolved config as YAML; ``command`` (the command it was run by) is written first when given."""
    data = ({"command": command} if command else {}) | to_dict(cfg)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _field_notes(source: str) -> dict[str, dict[str, str]]:
    """Per config class of the module in file ``source``, each field's comment: the comment at the end of its line,
    else the comment lines right above it. One pass over the file (``inspect.getsourcelines`` per class cost
    ~20 ms, and the help text is built at every CLI start)."""
    import re

    notes: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    above: list[str] = []
    for line in Path(source).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        if line and not line[0].isspace():  # a top-level line: a class header opens a class, anything else ends it
            header = re.match(r"class (\w+)", line)
            current = notes.setdefault(header.group(1), {}) if header else None
        else:
            match = re.match(r"\s+(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
            if match and current is not None:
                current[match.group(1)] = (match.group(2) or " ".join(above)).strip()
        above = []
    return notes


def _notes_of(cls: type) -> dict[str, str]:
    import sys

    source = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return _field_notes(source).get(cls.__name__, {}) if source else {}


def config_keys(cls: type = None, prefix: str = "", instance: Any = None) -> list[tuple[str, Any, str]]:
    """(dotted key, default, note) for every leaf key of a config class (default ``Config``), in declaration
    order. Defaults are the class's own (a command's config may set other defaults for a section than the
    section class has); notes are the fields' comments in the source of the class or of a base class."""
    cls = cls or Config
    instance = instance if instance is not None else cls()
    notes: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        notes.update(_notes_of(base))
    out = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(type(value), f"{prefix}{f.name}.", value)
        else:
            out.append((f"{prefix}{f.name}", value, notes.get(f.name, "")))
    return out


def config_help(cls: type = None, sections: tuple[str, ...] | None = None) -> str:
    """Every config key of a command's config class (default ``Config``) with its default and note, generated from
    the dataclasses (so it cannot drift); ``sections``: only the keys under these."""
    def shown(value: Any) -> str:
        return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    cls = cls or Config
    lines = [f"config keys (default in parentheses; from {cls.__module__.replace('.', '/')}.py and its sections):"]
    for key, default, note in config_keys(cls):
        if sections is not None and key.split(".")[0] not in sections:
            continue
        choices = _CHOICES.get(key)
        if choices and not note.startswith(choices[0]):
            note = " | ".join(choices) + (f": {note}" if note else "")
        lines.append(f"  {key} ({shown(default)})" + (f"  {note}" if note else ""))
    return "\n".join(lines) + "\n"
