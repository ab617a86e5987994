"""``preftune judge FILE --judge SPEC --out DIR``: judge every record of a file in both orders.

- ``{prompt, a, b}`` records: is ``a`` better than ``b``? Writes the win rate of a over b (with its interval, ties,
  failures and the length-controlled win rate) to ``winrate.json``.
- human-labelled preference pairs (any format ``preftune dpo`` reads, Anthropic HH dialogues included): the judge's
  card on them (accuracy against the label, kappa, swap consistency, first-slot rate, length bias, the
  always-longer and random baselines) to ``judge_card.json``.

Both write ``comparisons.jsonl`` (every comparison: the texts, P in each order, the combined P and the verdict) and
keep every judgment in ``judgments.jsonl``: re-running into the same ``--out`` asks the judge only for what is not
there yet. The API key (``judge.api_key_env`` names its variable) is never logged or written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from preftune.config import RunConfig, config_help, load_config
from preftune.eval.judges import JudgeSettings, check_judge_settings
from preftune.recipes.common import FORMATTER, add_config_args, print_result, split_config_args

log = logging.getLogger(__name__)


@dataclass
class JudgeRunConfig:
    """``preftune judge``'s config."""

    COMMAND: ClassVar[str] = "judge"

    judge: JudgeSettings = field(default_factory=JudgeSettings)
    seed: int = 0  # the orientation of each labelled pair for kappa, and the random baseline's draws
    limit: int | None = None  # judge at most this many records
    on_invalid: str = "error"  # error | skip: a malformed record stops the run (exit 2) or is skipped and counted
    run: RunConfig = field(default_factory=RunConfig)


def check_config(cfg: JudgeRunConfig) -> None:
    from preftune.errors import ConfigError

    check_judge_settings(cfg.judge)
    if cfg.on_invalid not in ("error", "skip"):
        raise ConfigError(f"config key 'on_invalid': {cfg.on_invalid!r} is not one of error, skip")


def register(sub) -> None:
    p = sub.add_parser("judge", help="judge (prompt, a, b) records, or a judge's accuracy on labelled pairs",
                       description=__doc__.split("\n", 2)[2], epilog=config_help(JudgeRunConfig),
                       formatter_class=FORMATTER)
    p.add_argument("file", help="JSONL/JSON/CSV/Parquet of {prompt, a, b} records, or labelled preference pairs")
    add_config_args(p)
    p.add_argument("--judge", metavar="SPEC", help="rm:PATH or an OpenAI-compatible endpoint (http://HOST:PORT/v1); "
                                                   "the same as judge.spec=SPEC")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/judge-<time>); the same as run.dir")
    p.set_defaults(func=_main)


def _main(args) -> int:
    path, overrides = split_config_args(args.args)
    flags = [f"judge.spec={args.judge}"] * bool(args.judge) + [f"run.dir={args.out}"] * bool(args.out)
    cfg = load_config(path, overrides + flags, base=JudgeRunConfig())
    check_config(cfg)
    return print_result(run(cfg, args.file))


def _read(cfg: JudgeRunConfig, path: str) -> tuple[list[tuple[str, str, str]], bool, list[str], int]:
    """(comparisons (prompt, x, y), whether x is the human-preferred response of a labelled pair, sources, the
    number of records skipped under on_invalid=skip)."""
    from preftune.data.records import holds_comparisons, read_comparisons, read_preference_pairs
    from preftune.data.schema import plain_text
    from preftune.errors import InputError

    unlabelled = holds_comparisons(path)
    if unlabelled:
        records, report = read_comparisons(path, on_invalid=cfg.on_invalid, limit=cfg.limit)
        items = [(r.prompt, r.a, r.b) for r in records]
    else:
        records, report = read_preference_pairs(path, on_invalid=cfg.on_invalid, limit=cfg.limit)
        items = [(plain_text(r.prompt), plain_text(r.chosen), plain_text(r.rejected)) for r in records]
    if report.skipped:
        log.warning("%s: %s", path, report.summary())
    if not items:
        raise InputError(f"{path}: no records to judge")
    return items, not unlabelled, [r.source for r in records], report.skipped


def run(cfg: JudgeRunConfig, path: str) -> dict:
    """Judge the file's records in both orders; returns the judge card (labelled pairs) or the win rate."""
    if cfg.run.report_to != "none":
        from preftune.errors import ConfigError

        raise ConfigError("run.report_to applies to training (dpo, sft, reward, ppo); preftune judge reports to no "
                          "tracker: remove it")
    import time

    from preftune.config import save_config
    from preftune.data.records import write_jsonl
    from preftune.eval.judges import JudgmentCache, build_judge, empty_reply_probe, judge_swapped
    from preftune.eval.judging import judge_card, summarise, verdict, with_empty_probe
    from preftune.train.rundir import atomic_write_text

    items, labelled, sources, skipped = _read(cfg, path)
    out = Path(cfg.run.dir or f"runs/judge-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml", command="judge")
    judge = build_judge(cfg.judge)
    cache = JudgmentCache(out / "judgments.jsonl")
    orders, combined = judge_swapped(judge, cache, items)
    lengths = [(len(x.split()), len(y.split())) for _, x, y in items]
    write_jsonl(out / "comparisons.jsonl", (
        {"source": src, "prompt": p, "a": x, "b": y, "p_a_first": pf, "p_a_second": ps, "p": pc,
         "verdict": verdict(pc, "a", "b")}
        for src, (p, x, y), (pf, ps), pc in zip(sources, items, orders, combined)))
    if labelled:
        card = judge_card([a for a, _ in orders], [b for _, b in orders], [lx for lx, _ in lengths],
                          [ly for _, ly in lengths], judge.mode, cfg.seed)
        card = with_empty_probe(card, empty_reply_probe(judge, cache, [(p, x) for p, x, _ in items]))
        result = {"judge": judge.name, "data": str(path), "skipped": skipped, **card}
        name = "judge_card.json"
    else:
        stats = summarise(combined, [lx for lx, _ in lengths], [ly for _, ly in lengths])
        stats["mean_length_a"], stats["mean_length_b"] = stats.pop("mean_length"), stats.pop("mean_length_opponent")
        result = {"judge": judge.name, "data": str(path), "skipped": skipped, **stats}
        name = "winrate.json"
    atomic_write_text(out / name, json.dumps(result, indent=2))
    log.info("wrote %s, comparisons.jsonl and judgments.jsonl in %s", name, out)
    return {"out": str(out), **result}


CONFIG = JudgeRunConfig  # this command's config (configs/*.yaml that name `command: judge` parse with it)
