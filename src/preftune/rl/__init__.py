"""Reinforcement learning pieces for the RLHF baseline (PPO, Schulman et al. 2017, as used for RLHF by
Ziegler et al. 2019 and Ouyang et al. 2022). ``ppo_math`` holds the pure tensor functions; the explicit
rollout -> advantages -> update loop lives in ``preftune.recipes.ppo``."""
