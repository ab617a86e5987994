"""``preftune winrate``: the DPO paper's second experiment (Fig. 3) on single-turn Anthropic HH dialogue: every
method's replies to held-out test prompts, judged against the dataset's chosen reply, across sampling temperatures.

1. A seeded split by prompt (``eval/hh_task.py``): training pairs, judge-validation pairs (human labelled, never
   trained on: the judge's card), single-turn test prompts. Sizes are printed and recorded.
2. Preferred-FT (SFT on the chosen replies) is the reference every other method starts from; DPO at each
   ``winrate.dpo_betas`` from it, with checkpoints along training (win rate over training at
   ``winrate.curve_temperatures``); best-of-N from Preferred-FT ranked by a reward model (the *policy* RM);
   the base model prompted with 2 training dialogues (the paper's 2-shot baseline).
3. One seeded reply per test prompt per temperature (0 is greedy), cut at the next turn marker.
4. A judge (``judge.spec``; by default a reward model trained here on the half of the training pairs the policy RM
   never saw, so the judge is not the model best-of-N optimises) compares each reply with the chosen one, in both
   orders; its card on the judge-validation pairs is written beside the win rates, and a judge that does not beat
   always-longer marks every curve *uninformative*.

PPO runs against the policy reward model from Preferred-FT, judged along its iterations like DPO.
Writes ``winrate.json``, ``judge_card.json``, ``comparisons.jsonl``, ``judgments.jsonl`` (the judgment cache),
``winrate.png`` and ``splits.json``; re-running into the same ``--out`` reuses every finished run and judgment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from preftune.config import Config, DataConfig, TrainConfig, config_help
from preftune.eval.judges import JudgeSettings, check_judge_settings
from preftune.recipes.common import refuse_what_the_arms_do_not_take, register_experiment

log = logging.getLogger(__name__)


@dataclass
class WinrateSettings:
    data: str | None = None  # HH pairs (default: <shared data>/hh/harmless-base-test.jsonl.gz)
    test_prompts: int = 96  # single-turn prompts never trained on
    judge_val_pairs: int = 200  # human-labelled pairs never trained on, for the judge card
    dpo_betas: str = "0.1,0.5"  # comma-separated; one DPO run each
    temperatures: str = "0,0.25,0.5,0.75,1.0"  # 0: greedy
    curve_temperatures: str = "0.25,1.0"  # win rate over DPO's training at these
    eval_points: int = 2  # DPO checkpoints judged along training (plus the end)
    best_of_n: int = 4  # samples per test prompt that the policy reward model ranks
    two_shot: bool = True  # the base model prompted with 2 training dialogues
    ppo_iterations: int = 6  # PPO against the policy reward model, from Preferred-FT (0: no PPO arm)
    ppo_batch_size: int = 16  # prompts per PPO iteration (single-turn training prompts)
    ppo_kl_coef: float = 0.05
    sft_steps: int = 100
    dpo_steps: int = 64
    reward_steps: int = 48
    max_new_tokens: int = 64
    generation_batch_size: int = 32


def _train_defaults() -> TrainConfig:
    return TrainConfig(batch_size=8, lr=1e-5, optimizer="rmsprop", log_every=10, keep_checkpoints=100,
                       progress=False)


@dataclass
class WinrateConfig(Config):
    """``preftune winrate``'s config: the preference-training config its runs share, ``winrate:`` and ``judge:``."""

    COMMANDS: ClassVar[tuple[str, ...]] = ("winrate",)

    winrate: WinrateSettings = field(default_factory=WinrateSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_length=192, max_prompt_tokens=128))
    train: TrainConfig = field(default_factory=_train_defaults)


def quick_defaults(cfg: WinrateConfig) -> WinrateConfig:
    """``--quick``: a smoke run of every stage (the suite runs it on ``tiny``)."""
    w = cfg.winrate
    w.test_prompts, w.judge_val_pairs, w.dpo_betas, w.temperatures, w.curve_temperatures = 8, 8, "0.1", "0,1.0", "1.0"
    w.eval_points, w.best_of_n, w.sft_steps, w.dpo_steps, w.reward_steps, w.max_new_tokens = 1, 2, 4, 4, 4, 12
    w.ppo_iterations, w.ppo_batch_size = 2, 4
    return cfg


def register(sub) -> None:
    register_experiment(
        sub, "winrate", help="win rates against HH's chosen replies across temperatures, judged (the paper's Fig. 3)",
        description=__doc__.split("\n", 2)[2], epilog=config_help(WinrateConfig), config=WinrateConfig,
        quick=quick_defaults, run=run, quick_help="a smoke run of every stage (tiny budgets)",
        out_help="output directory (default runs/winrate-<time>)")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


class _Experiment:
    """The output root, the config, the split and the sampling every method shares."""

    def __init__(self, cfg: WinrateConfig, root: Path, split, tokenizer):
        self.cfg, self.w, self.root, self.split, self.tokenizer = cfg, cfg.winrate, root, split, tokenizer
        self.prompts = [p for p, _ in split.test]
        self.common = {"model": cfg.model, "data": str(self.w.data), "splits": split.sizes(), "seed": cfg.train.seed,
                       "max_new_tokens": self.w.max_new_tokens, "temperatures": self.w.temperatures}

    def replies(self, model, temperature: float, prompts: list[str] | None = None, n: int = 1) -> list[str]:
        """``n`` seeded replies per test prompt (prompt-major), cut at the next turn."""
        from preftune.eval.hh_task import clean_reply
        from preftune.eval.sampling import generate

        samples = generate(model, self.tokenizer, prompts or self.prompts, num_samples=n, temperature=temperature,
                           max_new_tokens=self.w.max_new_tokens, batch_size=self.w.generation_batch_size,
                           seed=self.cfg.train.seed + 7)
        return [clean_reply(s.completion) for s in samples]

    def all_temperatures(self, model, prompts: list[str] | None = None) -> dict[str, list[str]]:
        return {str(t): self.replies(model, t, prompts) for t in _floats(self.w.temperatures)}

    def sampled(self, name: str, key: dict, sample) -> dict[str, list[str]]:
        """Replies that no training run holds (best-of-N, the 2-shot base), kept in RUN/runs/NAME/result.json
        under their settings, so that re-running into the same ``--out`` reuses them."""
        from preftune.recipes.common import reused_or_run

        run_dir = self.root / "runs" / name

        def compute():
            run_dir.mkdir(parents=True, exist_ok=True)
            return sample()

        return reused_or_run(run_dir, {**self.common, **key}, compute)

    def train_run(self, name: str, run, base, overrides: list[str], key: dict, after=None) -> dict:
        """A training run (reused when finished under the same settings); ``after(run_dir)`` samples from it
        before its checkpoints are dropped."""
        from preftune.recipes.common import reused_or_run
        from preftune.recipes.frontier import _sub_config

        run_dir = self.root / "runs" / name

        def train(resume: bool):
            result = run(_sub_config(self.cfg, run_dir, overrides, base), resume=resume)
            return {"result": result, **(after(run_dir) if after else {})}

        return reused_or_run(run_dir, {**self.common, **key}, train, resumable=True)


def _dpo_samples(exp: _Experiment, sft_policy: str):
    """The DPO arm's replies: at every temperature from the final policy, and at ``curve_temperatures`` from each
    checkpoint along training."""
    def after(run_dir: Path) -> dict:
        from preftune.models.load import load_causal_lm
        from preftune.train.checkpoint import policies_along_training

        final = load_causal_lm(str(run_dir / "policy"))
        curve = {str(step): {str(t): exp.replies(model, t) for t in _floats(exp.w.curve_temperatures)}
                 for step, model in policies_along_training(run_dir, sft_policy)}
        return {"samples": exp.all_temperatures(final), "curve": curve}

    return after


def _best_of_n(exp: _Experiment, sft_policy: str, rm_path: str) -> dict[str, list[str]]:
    """Best-of-N from Preferred-FT: N replies per prompt at each temperature (greedy: one), the policy RM's pick."""
    from preftune.models.load import load_causal_lm
    from preftune.models.reward_model import RewardModel

    model, rm = load_causal_lm(sft_policy), RewardModel.load(rm_path)
    out = {}
    for t in _floats(exp.w.temperatures):
        n = 1 if t == 0 else exp.w.best_of_n
        replies = exp.replies(model, t, n=n)
        scores = rm.score_replies([p for p in exp.prompts for _ in range(n)], replies, normalized=False)
        out[str(t)] = [replies[k * n + max(range(n), key=lambda j, k=k: scores[k * n + j])]
                       for k in range(len(exp.prompts))]
    return out


def _ppo(exp: _Experiment, sft_policy: str, rm_path: str) -> dict:
    """The PPO arm: Preferred-FT optimised against the policy reward model on the single-turn training prompts
    (the reference is Preferred-FT too), replies sampled along its iterations and from the final policy."""
    from preftune.eval.hh_task import is_single_turn
    from preftune.models.load import load_causal_lm
    from preftune.recipes.common import reused_or_run
    from preftune.recipes.frontier import _sub_config, arm_placement
    from preftune.recipes.ppo import PPORunConfig, run as run_ppo

    w, run_dir = exp.w, exp.root / "runs" / "ppo"
    prompts = list(dict.fromkeys(p.prompt for p in exp.split.train if is_single_turn(p.prompt)))
    settings = {"iterations": w.ppo_iterations, "batch_size": w.ppo_batch_size, "kl_coef": w.ppo_kl_coef}
    placement = arm_placement(exp.cfg.train)
    where, settings = [f"train.{k}={v}" for k, v in placement.items()], {**settings, **placement}
    overrides = [f"model={sft_policy}", f"ref_model={sft_policy}", f"ppo.scorer=rm:{rm_path}",
                 f"ppo.iterations={w.ppo_iterations}", f"ppo.batch_size={w.ppo_batch_size}",
                 f"ppo.minibatch_size={max(1, w.ppo_batch_size // 2)}", f"ppo.kl_coef={w.ppo_kl_coef}",
                 f"ppo.max_new_tokens={w.max_new_tokens}", f"ppo.generation_batch_size={w.generation_batch_size}",
                 f"ppo.eval_every={max(1, w.ppo_iterations // max(1, w.eval_points))}",
                 f"train.seed={exp.cfg.train.seed}", "train.progress=false", *where]

    def train():
        curve: dict[str, dict[str, list[str]]] = {}

        def hook(policy, step):
            curve[str(step)] = {str(t): exp.replies(policy, t) for t in _floats(w.curve_temperatures)}

        result = run_ppo(_sub_config(exp.cfg, run_dir, overrides, PPORunConfig()), eval_hook=hook, prompts=prompts)
        return {"result": result, "samples": exp.all_temperatures(load_causal_lm(str(run_dir / "policy"))),
                "curve": curve}

    return reused_or_run(run_dir, {**exp.common, "ppo": settings, "sft": w.sft_steps, "rm": w.reward_steps}, train)


def _two_shot(exp: _Experiment) -> dict[str, list[str]]:
    """The base model, prompted with two training dialogues before each test prompt."""
    from preftune.eval.hh_task import two_shot_prompt
    from preftune.models.load import load_causal_lm

    examples = [p for p in exp.split.train if p.prompt.count("\n\nHuman:") == 1][:2] or exp.split.train[:2]
    model = load_causal_lm(exp.cfg.model, seed=exp.cfg.train.seed)
    return exp.all_temperatures(model, [two_shot_prompt(examples, p) for p in exp.prompts])


def _points(exp: _Experiment, judge, cache, methods: dict[str, dict[str, list[str]]], step: int | None = None
            ) -> tuple[list[dict], list[dict]]:
    """Win rates against the chosen replies: one point per (method, temperature), and every comparison's row."""
    from preftune.eval.judges import judge_swapped
    from preftune.eval.judging import summarise, verdict

    points, rows = [], []
    chosen = [c for _, c in exp.split.test]
    for method, by_temperature in methods.items():
        for temperature, replies in by_temperature.items():
            items = [(p, r or " ", c) for p, r, c in zip(exp.prompts, replies, chosen)]
            orders, combined = judge_swapped(judge, cache, items)
            stats = summarise(combined, [len(r.split()) for _, r, _ in items], [len(c.split()) for c in chosen])
            points.append({"method": method, "temperature": float(temperature), "step": step, **stats})
            rows += [{"method": method, "temperature": float(temperature), "step": step, "prompt": p, "reply": r,
                      "chosen": c, "p_reply_first": a, "p_reply_second": b, "p": pc,
                      "verdict": verdict(pc, "reply", "chosen")}
                     for (p, r, c), (a, b), pc in zip(items, orders, combined)]
    return points, rows


def _splits(cfg: WinrateConfig, root: Path):
    from preftune.data.records import read_preference_pairs, write_jsonl
    from preftune.errors import InputError
    from preftune.eval.hh_task import split_by_prompt
    from preftune.paths import shared_data_dir

    w = cfg.winrate
    w.data = w.data or str(shared_data_dir() / "hh" / "harmless-base-test.jsonl.gz")
    if not Path(w.data).exists():
        raise InputError(f"winrate.data: {w.data} not found (the Anthropic HH pairs; set winrate.data=PATH)")
    pairs, report = read_preference_pairs(w.data, on_invalid="skip")
    if report.skipped:
        log.warning("%s: %s", w.data, report.summary())
    split = split_by_prompt(pairs, test_prompts=w.test_prompts, judge_val_pairs=w.judge_val_pairs,
                            seed=cfg.train.seed)
    half = len(split.train) // 2
    for name, rows in (("train", split.train), ("train-judge-rm", split.train[:half]),
                       ("train-policy-rm", split.train[half:]), ("judge_val", split.judge_val)):
        write_jsonl(root / f"{name}.jsonl", ({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                                             for p in rows))
    write_jsonl(root / "test_prompts.jsonl", ({"prompt": p, "chosen": c} for p, c in split.test))
    sizes = {**split.sizes(), "skipped": report.skipped, "judge_rm_pairs": half,
             "policy_rm_pairs": len(split.train) - half}
    (root / "splits.json").write_text(json.dumps(sizes, indent=2), encoding="utf-8")
    log.info("HH splits: %s", sizes)
    return split, sizes


def run(cfg: WinrateConfig, *, out: str | None = None) -> dict:
    """Every stage of the module docstring; returns winrate.json's content."""
    from preftune.data.records import write_jsonl
    from preftune.eval.judges import JudgmentCache, build_judge
    from preftune.eval.plots import plot_winrate
    from preftune.models.load import load_causal_lm, load_tokenizer
    from preftune.recipes.dpo import run as run_dpo
    from preftune.recipes.frontier import SFT_ARM
    from preftune.recipes.reward import RewardRunConfig, run as run_reward
    from preftune.recipes.sft import SFTRunConfig, run as run_sft
    from preftune.train.runtime import setup_threads

    refuse_what_the_arms_do_not_take(cfg, "winrate", "the Preferred-FT policy", {
        "data.train": "it reads winrate.data", "data.eval": "it holds out its own test prompts"})
    # the judge is checked now, not after every arm has trained (unset: the judge reward model it trains)
    check_judge_settings(dataclasses.replace(cfg.judge, spec=cfg.judge.spec or "rm:(the judge reward model)"))
    w = cfg.winrate
    root = Path(out or cfg.run.dir or f"runs/winrate-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    setup_threads(cfg)
    t0 = time.perf_counter()
    split, sizes = _splits(cfg, root)
    exp = _Experiment(cfg, root, split, load_tokenizer(cfg.model))
    train = [f"data.train={root / 'train.jsonl'}"]
    sft = exp.train_run("preferred-ft", run_sft, SFTRunConfig(), train + [f"train.max_steps={w.sft_steps}", *SFT_ARM],
                        {"steps": w.sft_steps}, after=lambda d: {"samples": exp.all_temperatures(
                            load_causal_lm(str(d / "policy")))})
    sft_policy = sft["result"]["run_dir"] + "/policy"
    methods = {"Preferred-FT": sft["samples"]}
    curves = {}
    for beta in _floats(w.dpo_betas):
        every = max(1, w.dpo_steps // max(1, w.eval_points))
        dpo = exp.train_run(f"dpo-beta{beta}", run_dpo, Config(),
                            train + [f"model={sft_policy}", f"ref_model={sft_policy}", f"dpo.beta={beta}",
                                     f"train.max_steps={w.dpo_steps}", f"train.save_every={every}"],
                            {"beta": beta, "steps": w.dpo_steps, "sft": w.sft_steps, "every": every},
                            after=_dpo_samples(exp, sft_policy))
        methods[f"DPO beta={beta}"] = dpo["samples"]
        curves[f"DPO beta={beta}"] = dpo["curve"]
    # raw scores are all a judge or a best-of-N pick reads: no normalisation pass over every training response
    # (10 minutes per reward model on SmolLM2 here)
    rm_overrides = ["train.optimizer=adamw", f"train.max_steps={w.reward_steps}", "train.lr=5e-5",
                    "train.layout=padded", "data.eval_fraction=0.1", "reward.normalize=false"]
    policy_rm = exp.train_run("policy-rm", run_reward, RewardRunConfig(),
                              [f"data.train={root / 'train-policy-rm.jsonl'}", *rm_overrides],
                              {"rm": "policy", "steps": w.reward_steps})
    methods[f"best-of-{w.best_of_n}"] = exp.sampled(  # kept like a run: a re-run does not sample them again
        "best-of-n", {"n": w.best_of_n, "sft": w.sft_steps, "rm": w.reward_steps},
        lambda: _best_of_n(exp, sft_policy, policy_rm["result"]["reward_model"]))
    if w.ppo_iterations:
        ppo = _ppo(exp, sft_policy, policy_rm["result"]["reward_model"])
        methods["PPO"], curves["PPO"] = ppo["samples"], ppo["curve"]
    if w.two_shot:
        methods["2-shot base"] = exp.sampled("two-shot", {"two_shot": True}, lambda: _two_shot(exp))
    if not cfg.judge.spec:  # the judge: a reward model on the other half of the training pairs
        judge_rm = exp.train_run("judge-rm", run_reward, RewardRunConfig(),
                                 [f"data.train={root / 'train-judge-rm.jsonl'}", *rm_overrides],
                                 {"rm": "judge", "steps": w.reward_steps})
        cfg.judge.spec = f"rm:{judge_rm['result']['reward_model']}"
    judge, cache = build_judge(cfg.judge), JudgmentCache(root / "judgments.jsonl")
    card = _judge_card(judge, cache, split.judge_val, cfg.train.seed)
    points, rows = _points(exp, judge, cache, methods)
    for method, curve in curves.items():
        for step, by_temperature in curve.items():
            more, more_rows = _points(exp, judge, cache, {method: by_temperature}, step=int(step))
            points, rows = points + more, rows + more_rows
    write_jsonl(root / "comparisons.jsonl", rows)
    result = {"points": points, "judge": judge.name, "judge_card": card, "informative": card["informative"],
              "judge_disjoint_from_policy_rm": True, "splits": sizes,
              "budget": {"sft_steps": w.sft_steps, "dpo_steps": w.dpo_steps, "reward_steps": w.reward_steps,
                         "best_of_n": w.best_of_n, "test_prompts": len(exp.prompts),
                         "ppo_samples": w.ppo_iterations * w.ppo_batch_size},
              "model": cfg.model, "minutes": (time.perf_counter() - t0) / 60}
    (root / "judge_card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    (root / "winrate.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    plot_winrate(points, root / "winrate.png", informative=card["informative"], why=card["uninformative_because"],
                 title=f"{cfg.model}: win rate vs HH chosen, judge {_short_name(judge.name)}")
    print(format_points(points, card))
    return result


def _short_name(name: str) -> str:
    """A judge's name for a figure title: ``rm:`` and the reward model's run, or the endpoint's model name."""
    name = name.split("#")[0]
    if name.startswith("rm:"):
        path = Path(name[3:])
        return f"rm:{path.parent.name if path.name == 'reward_model' else path.name}"
    return name if len(name) <= 48 else "..." + name[-45:]


def _judge_card(judge, cache, pairs: list, seed: int) -> dict:
    from preftune.eval.judges import empty_reply_probe, judge_both_orders
    from preftune.eval.judging import judge_card, with_empty_probe

    orders = judge_both_orders(judge, cache, [(p.prompt, p.chosen, p.rejected) for p in pairs])
    card = judge_card([a for a, _ in orders], [b for _, b in orders], [len(p.chosen.split()) for p in pairs],
                      [len(p.rejected.split()) for p in pairs], judge.mode, seed)
    return with_empty_probe(card, empty_reply_probe(judge, cache, [(p.prompt, p.chosen) for p in pairs]))


def format_points(points: list[dict], card: dict) -> str:
    lines = [f"{'method':18}{'T':>6}{'step':>6}{'win rate':>10}{'95% interval':>18}{'LC':>7}{'ties':>6}{'fails':>6}"
             f"{'words':>7}{'empty':>6}"]
    for p in points:
        lines.append(f"{p['method']:18}{p['temperature']:>6.2f}{p['step'] if p['step'] is not None else '-':>6}"
                     f"{p['win_rate']:>10.3f}   [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"
                     f"{p['length_controlled_win_rate']:>7.3f}{p['ties']:>6}{p['fails']:>6}"
                     f"{p['mean_length']:>7.1f}{p.get('empty', 0):>6}")
    verdict = "informative" if card["informative"] else f"UNINFORMATIVE (it {card.get('uninformative_because')})"
    lines.append(f"judge accuracy on held-out human labels {card['accuracy']:.3f} (always-longer "
                 f"{card['baseline_always_longer']:.3f}, kappa {card['kappa']:.2f}, swap consistency "
                 f"{card['swap_consistency']:.2f}): {verdict}")
    if card.get("prefers_empty_reply", 0) > 0.5:
        lines.append("a method with empty replies (column 'empty') wins against this judge for that alone")
    return "\n".join(lines)


CONFIG = WinrateConfig  # this command's config (configs/*.yaml that name `command: winrate` parse with it)
