"""``preftune frontier``: the reward-KL frontier (DPO vs PPO vs PPO-GT vs Preferred-FT vs best-of-N)."""

from __future__ import annotations

import argparse


def _run(args) -> int:
    from preftune.cli import _split_config_args
    from preftune.experiments.frontier import run_frontier

    path, overrides = _split_config_args(args.args)
    run_frontier(config=path, overrides=overrides, quick=args.quick, out=args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "frontier", help="the DPO paper's reward-KL frontier on the sentiment task",
        description="Train DPO at several beta, PPO with a learned reward model at several KL coefficients, "
                    "PPO-GT (PPO on the oracle), Preferred-FT, and best-of-N from the reference; evaluate each "
                    "along training on held-out prompts (oracle reward, KL from the policy's own samples); write "
                    "frontier.json and frontier.png.",
        epilog="Keys: frontier.* (FrontierSettings in preftune/experiments/frontier.py: dpo_betas, ppo_kl_coefs, "
               "ppo_gt, preferred_ft, best_of_n, eval_points, dpo_steps, sft_steps, reward_steps, ppo_batch_size, "
               "ppo_minibatch_size, ppo_epochs, ppo_lr, ppo_iterations, and the demo's prompt/sampling keys), plus model, "
               "data.*, train.*.\nRe-running with the same --out reuses every run that finished under the same "
               "settings (RUN/result.json): an interrupted frontier, or one re-tuned for one method, repeats only "
               "what changed.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] key=value")
    p.add_argument("--quick", action="store_true", help="one setting per method, few points (< 10 min here)")
    p.add_argument("--out", help="output directory (default runs/frontier-<time>)")
    p.set_defaults(func=_run)
