"""``preftune inspect``: what training will see of a data file, before any model loads.

The records go through the very reader and tokeniser a run uses (``data.*`` of the config, the model's tokenizer;
no weights are read). For the first ``--n`` items: the prompt (masked: no loss) and each response (trained) as
tokens decoded with their special tokens, the boundary between them, where BOS and EOS sit and what truncation
did. For the whole file: counts, token-length percentiles, truncation, records skipped (with their reasons;
inspection reads with ``on_invalid=skip`` whatever the config says, and says what a run would do) and pairs
whose chosen and rejected tokens are identical (no training signal; "became" when truncation made them so).
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any

from preftune.recipes.common import FORMATTER, add_config_args, split_config_args

KINDS = ("dpo", "sft", "reward")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show what training will see of a data file (no model weights load)",
                       description=__doc__.split("\n\n", 1)[1].strip(), formatter_class=FORMATTER)
    add_config_args(p)
    p.add_argument("--n", type=int, default=5, help="items shown token by token (default 5)")
    p.add_argument("--as", dest="kind", choices=KINDS,
                   help="read the data as this command does (default: the YAML's `command`, else dpo)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.set_defaults(func=lambda args: main(args.args, args.n, args.kind, args.json))


def main(args: list[str], n: int, kind: str | None, as_json: bool) -> int:
    import importlib

    from preftune.config import load_config
    from preftune.errors import ConfigError

    if n < 0:
        raise ConfigError(f"--n must be >= 0, got {n}")
    path, overrides = split_config_args(args)
    kind = kind or _named_command(path) or "dpo"
    if kind not in KINDS:
        raise ConfigError(f"{path} is a config for `preftune {kind}`; inspect reads the data of {', '.join(KINDS)}")
    cfg = load_config(path, overrides, base=importlib.import_module(f"preftune.recipes.{kind}").CONFIG())
    report = inspect_data(cfg, kind, n)
    print(json.dumps(report, indent=2, ensure_ascii=False) if as_json else render(report))
    return 0


def _named_command(path: str | None) -> str | None:
    if path is None:
        return None
    import yaml

    from preftune.errors import ConfigError

    try:
        loaded = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return loaded.get("command") if isinstance(loaded, dict) else None


def inspect_data(cfg, kind: str, n: int) -> dict[str, Any]:
    """The report (a JSON-able dict) of ``data.train`` and ``data.eval`` as ``kind`` reads them."""
    from preftune.errors import InputError
    from preftune.models.load import load_tokenizer

    if not cfg.data.train:
        raise InputError("no data: set data.train=PATH")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    template = getattr(tokenizer, "chat_template", None)
    return {
        "command": kind, "model": cfg.model,
        "tokenizer": {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                      "adds_bos": _adds_bos(tokenizer),
                      "chat_template": template,
                      "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:12] if template else None},
        "limits": {"max_length": cfg.data.max_length, "max_prompt_tokens": cfg.data.max_prompt_tokens,
                   "prompt_overflow": cfg.data.prompt_overflow, "append_eos": cfg.data.append_eos,
                   "on_invalid": cfg.data.on_invalid},
        "files": [_inspect_file(cfg, kind, split, path, tokenizer, n)
                  for split, path in (("train", cfg.data.train), ("eval", cfg.data.eval)) if path],
    }


def _adds_bos(tokenizer) -> bool:
    from preftune.data.tokenize import _adds_bos as adds

    return adds(tokenizer)


def _read(cfg, kind: str, path: str):
    from preftune.data.records import read_preference_pairs, read_sft_examples

    d = cfg.data
    if kind == "sft":
        return read_sft_examples(path, on_invalid="skip", limit=d.limit)
    return read_preference_pairs(path, on_invalid="skip", limit=d.limit, max_pairs_per_prompt=d.max_pairs_per_prompt)


def _responses(kind: str, record) -> dict[str, Any]:
    return {"completion": record.completion} if kind == "sft" else {"chosen": record.chosen,
                                                                    "rejected": record.rejected}


def _inspect_file(cfg, kind: str, split: str, path: str, tokenizer, n: int) -> dict[str, Any]:
    """One file: every record tokenised as a run would, its lengths and what happened to it; the first ``n``
    shown in full."""
    from preftune.data.tokenize import (TruncationStats, encode_prompt, encode_response, tokenize_example,
                                        tokenize_pair)
    from preftune.errors import DataError

    d = cfg.data
    records, skips = _read(cfg, kind, path)
    tokenize = tokenize_example if kind == "sft" else tokenize_pair
    lengths: dict[str, list[int]] = collections.defaultdict(list)
    refused: collections.Counter[str] = collections.Counter()
    truncated = {"prompts": 0, "responses": 0}
    identical: dict[str, list[str]] = {"in_the_file": [], "became": []}
    shown = []
    for record in records:
        try:
            item = tokenize(tokenizer, record, max_length=d.max_length, max_prompt_tokens=d.max_prompt_tokens,
                            prompt_overflow=d.prompt_overflow, append_eos=d.append_eos, stats=TruncationStats())
        except DataError as err:  # e.g. an over-long prompt under prompt_overflow=error: the run would stop here
            refused[f"{err.field}: {err.message}"] += 1
            continue
        full = {"prompt": encode_prompt(tokenizer, record.prompt),
                **{name: encode_response(tokenizer, record.prompt, text, append_eos=d.append_eos)
                   for name, text in _responses(kind, record).items()}}
        kept = {"prompt": item.prompt_ids, **({"completion": item.completion_ids} if kind == "sft" else
                                              {"chosen": item.chosen_ids, "rejected": item.rejected_ids})}
        for name, ids in kept.items():
            lengths[name].append(len(ids))
        truncated["prompts"] += len(kept["prompt"]) < len(full["prompt"])
        truncated["responses"] += sum(len(kept[k]) < len(full[k]) for k in kept if k != "prompt")
        if kind != "sft" and kept["chosen"] == kept["rejected"]:
            identical["in_the_file" if full["chosen"] == full["rejected"] else "became"].append(record.source)
        if len(shown) < n:
            shown.append(_shown(tokenizer, record, full, kept))
    return {"split": split, "path": str(path), "records_read": skips.total, "items": len(lengths.get("prompt", [])),
            "skipped": {"count": skips.skipped, "reasons": dict(skips.reasons), "first": skips.examples},
            "refused_at_tokenisation": dict(refused),
            "truncated": truncated, "identical_chosen_rejected": identical,
            "lengths": {name: _percentiles(values) for name, values in lengths.items()}, "shown": shown}


def _percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def _shown(tokenizer, record, full: dict[str, list[int]], kept: dict[str, list[int]]) -> dict[str, Any]:
    """One item token by token: each part decoded with its special tokens, its length before and after
    truncation, and where BOS and EOS sit."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    parts = {}
    for name, ids in kept.items():
        parts[name] = {"tokens": len(ids), "before_truncation": len(full[name]),
                       "trained": name != "prompt", "text": tokenizer.decode(ids, skip_special_tokens=False),
                       "ids": ids}
        if name != "prompt":
            parts[name]["ends_with_eos"] = bool(ids) and ids[-1] == eos
    prompt = kept["prompt"]
    return {"source": record.source, "conversation": not isinstance(record.prompt, str),
            "bos_at": [i for i, t in enumerate(prompt) if t == bos] if bos is not None else [], "parts": parts}


def render(report: dict[str, Any]) -> str:
    """The report as text: a summary per file, then the items shown."""
    tok = report["tokenizer"]
    template = (f"chat template {tok['chat_template_sha256']} (conversations are rendered with it; plain strings "
                f"are not)" if tok["chat_template"] else "no chat template (conversations cannot be read)")
    lim = report["limits"]
    lines = [f"preftune {report['command']} data, tokenizer of {report['model']}: BOS {tok['bos']!r} "
             f"({'added to plain prompts' if tok['adds_bos'] else 'not added by this tokenizer'}), EOS {tok['eos']!r}, "
             f"{template}",
             f"limits: max_length {lim['max_length']}, max_prompt_tokens {lim['max_prompt_tokens']} "
             f"(prompt_overflow={lim['prompt_overflow']}), append_eos={lim['append_eos']}"]
    for f in report["files"]:
        lines += ["", *_render_file(f, lim["on_invalid"])]
    return "\n".join(lines)


def _render_file(f: dict[str, Any], on_invalid: str) -> list[str]:
    sk = f["skipped"]
    out = [f"== {f['split']}: {f['path']}: {f['records_read']} records -> {f['items']} items"]
    if sk["count"]:
        reasons = ", ".join(f"{n} x {why}" for why, n in sorted(sk["reasons"].items(), key=lambda kv: -kv[1]))
        out.append(f"skipped {sk['count']}: {reasons}")
        out.append("  a run with data.on_invalid=error stops at the first: " + sk["first"][0].split(" (")[0]
                   if on_invalid == "error" else "  (a run skips them too: data.on_invalid=skip)")
    for why, count in f["refused_at_tokenisation"].items():
        out.append(f"refused at tokenisation: {count} x {why} (a run stops at the first)")
    tr, same = f["truncated"], f["identical_chosen_rejected"]
    out.append(f"truncated: {tr['prompts']} prompts kept their last tokens, {tr['responses']} responses cut")
    for how, sources in same.items():
        if sources:
            out.append(f"chosen == rejected ({how.replace('_', ' ')}): {len(sources)}, first {sources[0]} "
                       "(no training signal: a run stops there, or skips them under data.on_invalid=skip)")
    if f["lengths"]:
        out.append(f"{'tokens':<10}{'min':>6}{'p50':>6}{'p90':>6}{'p99':>6}{'max':>6}")
        for name, p in f["lengths"].items():
            out.append(f"{name:<10}" + "".join(f"{p[k]:>6}" for k in ("min", "p50", "p90", "p99", "max")))
    for item in f["shown"]:
        out += _render_item(item)
    return out


def _render_item(item: dict[str, Any]) -> list[str]:
    bos = f"BOS at {item['bos_at']}" if item["bos_at"] else "no BOS"
    out = [f"-- {item['source']}{' (conversation)' if item['conversation'] else ''}; {bos}"]
    for name, part in item["parts"].items():
        cut = (f", cut from {part['before_truncation']}" if part["tokens"] < part["before_truncation"] else "")
        role = "trained" if part["trained"] else "masked"
        eos = "" if not part["trained"] else ("; ends with EOS" if part["ends_with_eos"] else "; NO EOS (cut)")
        out.append(f"  {name:<9}{part['tokens']:>5} tokens ({role}{cut}{eos}) |{json.dumps(part['text'])[1:-1]}|")
    return out
