"""The DPO paper's reward-KL frontier (Figure 2, left) on the demo's sentiment task (``preftune frontier``).

From one reference model and one prompt set, with the sentiment oracle as ground-truth reward:
- DPO at several beta, on pairs built from reference samples scored by the oracle (as the demo does);
- PPO with a learned Bradley-Terry reward model (trained on the same pairs) at several KL coefficients;
- PPO-GT: PPO on the oracle itself;
- Preferred-FT: SFT on the chosen completions;
- best-of-N from the reference, picked by the learned reward model (analytic KL = log N - (N-1)/N).
Each training run is evaluated at several points along training on held-out prompts (oracle reward and
KL(pi || pi_ref) from the policy's own samples, 95% intervals). Equal tuning budget: DPO and PPO get the same
number of settings; PPO's rollouts default to the same number of samples DPO's pairs were built from. Both are
written into ``frontier.json`` with the points ``{method, setting, step, kl, reward, reward_ci}``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from preftune.config import Config, DataConfig, TrainConfig, load_config
from preftune.eval.sentiment_task import DemoSettings
from preftune.recipes.common import refuse_what_the_arms_do_not_take, register_experiment, reused_or_run

log = logging.getLogger(__name__)



def register(sub) -> None:
    register_experiment(
        sub, "frontier", help="the DPO paper's reward-KL frontier on the sentiment task",
        description="Train DPO at several beta, PPO with a learned reward model at several KL coefficients, "
                    "PPO-GT (PPO on the oracle), Preferred-FT, and best-of-N from the reference; evaluate each "
                    "along training on held-out prompts (oracle reward, KL from the policy's own samples); write "
                    "frontier.json and frontier.png.",
        epilog="Keys: frontier.* (FrontierSettings in preftune/recipes/frontier.py: dpo_betas, ppo_kl_coefs, "
               "ppo_gt, preferred_ft, best_of_n, eval_points, dpo_steps, sft_steps, reward_steps, ppo_batch_size, "
               "ppo_minibatch_size, ppo_epochs, ppo_lr, ppo_iterations, and the demo's prompt/sampling keys), plus model, "
               "data.*, train.*.\nRe-running with the same --out reuses every run that finished under the same "
               "settings (RUN/result.json): an interrupted frontier, or one re-tuned for one method, repeats only "
               "what changed.",
        config=FrontierConfig, quick=quick_defaults, run=run,
        quick_help="one setting per method, few points (< 10 min here)",
        out_help="output directory (default runs/frontier-<time>)")


@dataclass
class FrontierSettings(DemoSettings):
    dpo_betas: str = "0.05,0.1,0.3"  # comma-separated; one DPO run each
    ppo_kl_coefs: str = "0.02,0.05,0.2"  # comma-separated; one PPO (learned RM) run each
    ppo_gt: bool = True  # also PPO on the oracle itself
    preferred_ft: bool = True
    best_of_n: str = "2,4,8,16,32,64"
    eval_points: int = 4  # evaluations along each training run (plus the start)
    dpo_steps: int = 48
    sft_steps: int = 48
    reward_steps: int = 60
    ppo_batch_size: int = 16
    ppo_minibatch_size: int | None = None  # None: half of ppo_batch_size
    ppo_epochs: int = 4
    ppo_lr: float = 1e-5
    ppo_iterations: int | None = None  # None: the same sample budget as DPO's pairs (prompts x samples / batch)


def _train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=8, lr=2e-5, optimizer="rmsprop", log_every=4, keep_checkpoints=100, progress=False)


@dataclass
class FrontierConfig(Config):
    COMMANDS: ClassVar[tuple[str, ...]] = ("frontier",)

    frontier: FrontierSettings = field(default_factory=lambda: FrontierSettings(train_prompts=128,
                                                                                heldout_prompts=48,
                                                                                eval_samples_per_prompt=2))
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=64, max_prompt_tokens=24,
                                                                append_eos=False))
    train: TrainConfig = field(default_factory=_train_defaults)


def quick_defaults(cfg: FrontierConfig) -> FrontierConfig:
    """``--quick``: one setting per method and few points (under 10 minutes on a 2-core CPU)."""
    f = cfg.frontier
    f.train_prompts, f.heldout_prompts, f.eval_samples_per_prompt = 48, 16, 2
    f.dpo_betas, f.ppo_kl_coefs, f.best_of_n = "0.1", "0.05", "2,4,8"
    f.eval_points, f.dpo_steps, f.sft_steps, f.reward_steps, f.ppo_iterations = 2, 12, 12, 16, 4
    return cfg


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _point(method: str, setting: str, step: int, ev: dict) -> dict:
    return {"method": method, "setting": setting, "step": step, "kl": ev["kl"], "kl_ci": ev["kl_ci95"],
            "reward": ev["reward"], "reward_ci": ev["reward_ci95"]}


def _ppo_points(method: str, setting: str, run_dir: Path) -> list[dict]:
    """A PPO arm's points, from the evaluations its hook logged (``eval/*`` rows of RUN/metrics.jsonl, which a
    resumed run continues), so that an arm stopped between evaluations resumes with the points it had."""
    from preftune.train.rundir import read_metrics

    rows = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/oracle_reward" in r}
    return [_point(method, setting, step, {"reward": r["eval/oracle_reward"], "reward_ci95": r["eval/oracle_reward_ci95"],
                                           "kl": r["eval/kl_heldout"], "kl_ci95": r["eval/kl_heldout_ci95"]})
            for step, r in sorted(rows.items())]


# DPO settings of the shared data/train sections that an SFT arm cannot take (sft refuses them): padded rows
SFT_ARM = ("train.layout=padded", "data.max_pairs_per_prompt=null")


def arm_placement(train: TrainConfig) -> dict:
    """Where a PPO arm computes, as the experiment's other arms do: the train section's precision, device and tf32
    where they are set (only those go into its reuse key, so that the keys of earlier arms stay valid)."""
    return {k: v for k, v in _changed(train, TrainConfig()).items() if k in ("precision", "device", "tf32")}


def _sub_config(cfg: FrontierConfig, run_dir: Path, overrides: list[str], base) -> object:
    """A run's config (``base``: the command's own, e.g. ``SFTRunConfig()``): the frontier's model, and its data and
    train sections where the command reads them, plus ``overrides``."""
    sub = base
    sub.model, sub.trust_remote_code = cfg.model, cfg.trust_remote_code
    if hasattr(sub, "data"):
        sub.data = DataConfig(**vars(cfg.data))
    if isinstance(sub.train, TrainConfig):
        sub.train = TrainConfig(**vars(cfg.train))
    sub.run.dir, sub.run.plot = str(run_dir), False
    return load_config(None, overrides, base=sub)


def _checkpoint_points(method: str, setting: str, run_dir: Path, held, spec: str, seed: int) -> list[dict]:
    """Evaluate every checkpoint a supervised run (DPO, Preferred-FT) left along its training."""
    from preftune.eval.heldout import evaluate_policy
    from preftune.train.checkpoint import policies_along_training

    points = []
    for step, policy in policies_along_training(run_dir, spec, seed=seed):
        points.append(_point(method, setting, step, evaluate_policy(policy, held)))
        log.info("%s %s step %s: reward %.3f kl %.2f", method, setting, points[-1]["step"], points[-1]["reward"],
                 points[-1]["kl"])
    return points


def _changed(section, defaults) -> dict:
    """A config section's values that differ from its class defaults: a reuse key from these stays the same when
    a later version adds a key (at a default that keeps the old behaviour), and still differs whenever a value
    that was set differs."""
    return {k: v for k, v in vars(section).items() if v != getattr(defaults, k, object())}


def _train_without(cfg, overrides: list[str]) -> dict:
    """The train section's set values minus the keys a sub-run's overrides replace."""
    replaced = {o.split("=", 1)[0].removeprefix("train.") for o in overrides if o.startswith("train.")}
    return {k: v for k, v in _changed(cfg.train, TrainConfig()).items() if k not in replaced}


def _best_of_n(held, rm, ns: list[int]) -> list[dict]:
    """Best-of-N from the reference scored by the learned RM; disjoint groups of the n_max samples per prompt."""
    from preftune.eval.heldout import full_text, mean_ci

    n_max = max(ns)
    log.info("best-of-N: %d reference samples for each of %d held-out prompts", n_max, len(held.prompts))
    samples = held.sample_n(held.reference, n_max)
    log.info("best-of-N: scoring %d samples with the learned reward model, then the oracle", len(samples))
    rm_scores = rm([full_text(s) for s in samples])
    oracle_scores = held.oracle([full_text(s) for s in samples])
    points = []
    for n in ns:
        picked = []
        for p in range(len(held.prompts)):
            block = range(p * n_max, (p + 1) * n_max)
            for g in range(n_max // n):
                group = list(block)[g * n:(g + 1) * n]
                picked.append(oracle_scores[max(group, key=lambda i: rm_scores[i])])
        reward, ci = mean_ci(picked)
        points.append({"method": "best-of-N", "setting": f"N={n}", "step": 0, "kl": math.log(n) - (n - 1) / n,
                       "kl_ci": 0.0, "reward": reward, "reward_ci": ci})
    return points


class _Frontier:
    """What every arm shares: the config, the output root, the held-out evaluation, the pairs file, the reuse key
    common to all runs, and the points found so far."""

    def __init__(self, cfg: FrontierConfig, root: Path, held, sample_budget: int):
        self.cfg, self.f, self.root, self.held, self.sample_budget = cfg, cfg.frontier, root, held, sample_budget
        self.data = [f"data.train={root / 'pairs.jsonl'}"]
        # what every run's result depends on; each run adds its own settings
        self.common = {"model": cfg.model, "ref_model": cfg.ref_model, "data": _changed(cfg.data, DataConfig()),
                       "train": _changed(cfg.train, TrainConfig()),
                       "prompts": {k: getattr(self.f, k) for k in vars(DemoSettings())},
                       "eval_points": self.f.eval_points}

    def every(self, steps: int) -> int:
        return max(1, steps // self.f.eval_points)

    def supervised(self, method: str, setting: str, name: str, run, base, overrides: list[str], key: dict) -> list:
        """A DPO or Preferred-FT arm: train with checkpoints along the way, evaluate each checkpoint."""
        run_dir = self.root / "runs" / name

        def train(resume: bool):
            run(_sub_config(self.cfg, run_dir, self.data + overrides, base), resume=resume)
            return _checkpoint_points(method, setting, run_dir, self.held, self.cfg.model, self.cfg.train.seed)

        return reused_or_run(run_dir, {**self.common, **key}, train, resumable=True)

    def reward_model(self) -> tuple[dict, dict]:
        """The learned reward model PPO optimises and best-of-N selects with: (its run's result, its reuse key)."""
        from preftune.recipes.reward import RewardRunConfig, run as run_reward

        rm_dir = self.root / "runs" / "reward"
        # the score is read at an EOS that ends every response (read at whatever word a sample ends on, the reward
        # model stayed at chance on these pairs); lr 5e-5 was the best of those tried on SmolLM2
        overrides = self.data + ["data.eval_fraction=0.15", "train.optimizer=adamw",
                                 f"train.max_steps={self.f.reward_steps}", "train.lr=5e-5", "data.append_eos=true",
                                 "train.layout=padded"]
        # keyed on what the reward run reads: its own overrides replace those train.* keys (train.lr, ...)
        key = {**self.common, "train": _train_without(self.cfg, overrides), "steps": self.f.reward_steps}
        result = reused_or_run(rm_dir, key, lambda resume: run_reward(
            _sub_config(self.cfg, rm_dir, overrides, RewardRunConfig()), resume=resume), resumable=True)
        return result, key

    def best_of_n(self, scorer: str, rm_key: dict, ns: list[int]) -> list:
        """Best-of-N's points (~30 min of sampling and scoring on SmolLM2 at 4x), reused when they were computed
        with the same reward model (whose key holds the model, the seed and the held-out settings) and the same N."""
        from preftune.eval.scorers import get_scorer

        return reused_or_run(self.root / "runs" / "best-of-n", {"reward_model": rm_key, "n": ns},
                             lambda: _best_of_n(self.held, get_scorer(scorer), ns))

    def ppo(self, method: str, coef: float, scorer: str, scorer_key, iterations: int, prompts: list[str]) -> list:
        """A PPO arm (learned reward model or the oracle itself), evaluated by a hook along its iterations."""
        from preftune.eval.heldout import evaluate_policy
        from preftune.recipes.ppo import PPORunConfig, run as run_ppo

        f, cfg, setting = self.f, self.cfg, f"kl_coef={coef}"
        where = arm_placement(cfg.train)
        run_dir = self.root / "runs" / f"{method.lower()}-{coef}"
        overrides = [f"train.seed={cfg.train.seed}", "train.progress=false",
                     f"train.num_threads={cfg.train.num_threads if cfg.train.num_threads else 'null'}",
                     f"ppo.scorer={scorer}", f"ppo.kl_coef={coef}", f"ppo.iterations={iterations}",
                     f"ppo.max_new_tokens={f.max_new_tokens}", f"ppo.batch_size={f.ppo_batch_size}",
                     f"ppo.ppo_epochs={f.ppo_epochs}", f"ppo.lr={f.ppo_lr}",
                     f"ppo.minibatch_size={f.ppo_minibatch_size or max(1, f.ppo_batch_size // 2)}",
                     f"ppo.eval_every={self.every(iterations)}", f"ppo.save_every={self.every(iterations)}",
                     "train.keep_checkpoints=1",  # a checkpoint at each evaluation: a stopped arm resumes
                     *(f"train.{k}={v}" for k, v in where.items())]

        def train(resume: bool):
            def hook(policy, step):
                ev = evaluate_policy(policy, self.held)
                log.info("%s %s iteration %d: reward %.3f kl %.2f", method, setting, step, ev["reward"], ev["kl"])
                return {"oracle_reward": ev["reward"], "oracle_reward_ci95": ev["reward_ci95"],
                        "kl_heldout": ev["kl"], "kl_heldout_ci95": ev["kl_ci95"]}

            run_ppo(_sub_config(cfg, run_dir, overrides, PPORunConfig()), eval_hook=hook, prompts=prompts,
                    resume=resume)
            return _ppo_points(method, setting, run_dir)

        # PPO reads the seed, thread count and placement of the train section (its own settings are frontier.ppo_*)
        key = {**{k: v for k, v in self.common.items() if k != "train"}, "seed": cfg.train.seed,
               "num_threads": cfg.train.num_threads, "iterations": iterations,
               **{k: getattr(f, k) for k in ("ppo_batch_size", "ppo_minibatch_size", "ppo_epochs", "ppo_lr")},
               "kl_coef": coef, "scorer": scorer_key, **where}
        return reused_or_run(run_dir, key, train, resumable=True)


def run(cfg: FrontierConfig, *, out: str | None = None) -> dict:
    """Every arm of the frontier, each reused when it finished under the same settings; writes frontier.json and
    frontier.png into ``out`` (or run.dir) and returns the result."""
    from preftune.data.records import write_jsonl
    from preftune.eval.heldout import HeldOut, evaluate_policy, full_text
    from preftune.eval.plots import plot_frontier
    from preftune.eval.scorers import SentimentOracle
    from preftune.eval.sentiment_task import build_pairs, check_pairing, demo_prompts
    from preftune.models.load import load_reference, load_tokenizer
    from preftune.recipes.dpo import run as run_dpo
    from preftune.recipes.sft import SFTRunConfig, run as run_sft
    from preftune.train.runtime import setup_threads

    refuse_what_the_arms_do_not_take(cfg, "frontier", "`model`", {
        "ref_model": "`model` is every arm's start and reference, and samples the pairs and the KL",
        "data.train": "it trains on the pairs it builds", "data.eval": "it evaluates on held-out prompts",
        "frontier.temperature": "samples are drawn at temperature 1, which the KL estimate needs"})
    check_pairing(cfg.frontier, "frontier")
    f = cfg.frontier
    root = Path(out or cfg.run.dir or f"runs/frontier-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    setup_threads(cfg)
    t0 = time.perf_counter()
    oracle = SentimentOracle.load_or_train()
    train_prompts, heldout_prompts = demo_prompts(f, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    reference = load_reference(cfg.model, seed=cfg.train.seed)
    held = HeldOut(tokenizer, reference, heldout_prompts, oracle, f.eval_samples_per_prompt, f.max_new_tokens,
                   batch_size=f.generation_batch_size, seed=cfg.train.seed + 1)

    train_samples = generate_pairs_samples(reference, tokenizer, train_prompts, f, cfg.train.seed)
    write_jsonl(root / "pairs.jsonl", build_pairs(train_samples, oracle([full_text(s) for s in train_samples]),
                                                  tokenizer, f))
    arms = _Frontier(cfg, root, held, sample_budget=len(train_samples))
    points = [_point("reference", "-", 0, evaluate_policy(reference, held, is_reference=True))]
    for beta in _floats(f.dpo_betas):
        points += arms.supervised("DPO", f"beta={beta}", f"dpo-beta{beta}", run_dpo, Config(),
                                  [f"dpo.beta={beta}", f"train.max_steps={f.dpo_steps}",
                                   f"train.save_every={arms.every(f.dpo_steps)}"], {"beta": beta, "steps": f.dpo_steps})
    if f.preferred_ft:
        points += arms.supervised("Preferred-FT", "-", "preferred-ft", run_sft, SFTRunConfig(),
                                  [f"train.max_steps={f.sft_steps}", "train.optimizer=adamw",
                                   f"train.save_every={arms.every(f.sft_steps)}", *SFT_ARM], {"steps": f.sft_steps})
    rm_result, rm_key = arms.reward_model() if _floats(f.ppo_kl_coefs) or _ints(f.best_of_n) else ({"eval": {}}, None)
    rm_path = f"rm:{rm_result.get('reward_model')}"
    iterations = f.ppo_iterations or max(1, math.ceil(arms.sample_budget / f.ppo_batch_size))
    for coef in _floats(f.ppo_kl_coefs):
        points += arms.ppo("PPO", coef, rm_path, rm_key, iterations, train_prompts)
    if f.ppo_gt:
        points += arms.ppo("PPO-GT", 0.05, "sentiment", "sentiment", iterations, train_prompts)
    if _ints(f.best_of_n):
        points += arms.best_of_n(rm_path, rm_key, _ints(f.best_of_n))
    budget = {"dpo_settings": len(_floats(f.dpo_betas)), "ppo_settings": len(_floats(f.ppo_kl_coefs)),
              "dpo_samples": arms.sample_budget, "ppo_samples_per_run": iterations * f.ppo_batch_size,
              "reward_model_heldout_accuracy": rm_result["eval"].get("eval/accuracy"),
              "eval": f"{len(heldout_prompts)} held-out prompts x {f.eval_samples_per_prompt} samples per point"}
    result = {"points": points, "budget": budget, "model": cfg.model, "oracle_heldout_accuracy":
              oracle.heldout_accuracy, "minutes": (time.perf_counter() - t0) / 60}
    (root / "frontier.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_frontier(points, root / "frontier.png", title=f"{cfg.model}: reward vs KL on held-out prompts")
    print(format_points(points))
    print(f"\nbudget: {budget}\nwrote {root / 'frontier.json'} and {root / 'frontier.png'}")
    return result


def generate_pairs_samples(reference, tokenizer, prompts, f: FrontierSettings, seed: int):
    from preftune.eval.sampling import generate

    return generate(reference, tokenizer, prompts, num_samples=f.samples_per_prompt, temperature=1.0,
                    max_new_tokens=f.max_new_tokens, batch_size=f.generation_batch_size, seed=seed)


def format_points(points: list[dict]) -> str:
    lines = [f"{'method':14}{'setting':14}{'step':>6}{'KL (nats)':>12}{'oracle reward':>20}"]
    for p in points:
        lines.append(f"{p['method']:14}{p['setting']:14}{p['step']:>6}{p['kl']:>12.2f}"
                     f"{p['reward']:>13.3f} ± {p['reward_ci']:.3f}")
    return "\n".join(lines)


CONFIG = FrontierConfig  # this command's config (configs/*.yaml that name `command: frontier` parse with it)
