"""Plots written into run directories (matplotlib, Agg backend: no display needed).

The DPO panel shows BOTH log-prob curves: under DPO the chosen and the rejected log-probs often both fall
while their margin grows. That is expected (the loss only sees the difference of log-ratios), not a bug,
and it is why we plot them side by side instead of only the margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_PANELS = {
    "dpo": [("loss", ["loss", "eval/loss"]),
            ("rewards (β-scaled log-ratios)", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            ("preference accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
            ("policy log-probs (both may fall)", ["logps/chosen", "logps/rejected"])],
    "sft": [("loss (NLL per token)", ["loss", "eval/loss"]), ("learning rate", ["lr"])],
    "ppo": [("reward (mean score)", ["reward"]), ("KL(pi || ref) per sequence", ["kl"]), ("kl_coef", ["kl_coef"]),
            ("entropy per token", ["entropy"]), ("losses", ["policy_loss", "value_loss"]),
            ("clipping", ["clip_fraction", "value_clip_fraction", "approx_kl"])],
}
_X_LABEL = {"ppo": "iteration"}


def plot_training(rows: list[dict[str, Any]], path: Path, *, kind: str = "dpo") -> Path | None:
    panels = _PANELS[kind]
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, keys) in zip(axes if len(panels) > 1 else [axes], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if key.startswith("eval/") else None, ms=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(_X_LABEL.get(kind, "step"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_demo(summary: dict[str, Any], scores: dict[str, list[list[float]]], path: Path) -> Path:
    """Left: oracle reward against KL(π‖π_ref) for reference (KL 0) and policy, as in the paper's frontier
    plot, with 95% intervals. Right: the distribution of oracle scores of both models' held-out samples."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.errorbar([0.0], [summary["reference_reward"]], yerr=[summary["reference_reward_ci95"]], fmt="o",
                 color="tab:gray", capsize=4, label="reference")
    ax1.errorbar([summary["kl"]], [summary["policy_reward"]], yerr=[summary["policy_reward_ci95"]],
                 xerr=[summary["kl_ci95"]], fmt="o", color="tab:blue", capsize=4, label=f"DPO β={summary['beta']}")
    ax1.set_xlabel("KL(π ‖ π_ref), nats per sample")
    ax1.set_ylabel("oracle reward (P[positive])")
    ax1.set_title("reward vs KL on held-out prompts", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    bins = [i / 20 for i in range(21)]
    ax2.hist(scores["sentiment"][0], bins=bins, alpha=0.55, label="reference", color="tab:gray")
    ax2.hist(scores["sentiment"][1], bins=bins, alpha=0.55, label="DPO policy", color="tab:blue")
    ax2.set_xlabel("oracle score of a sample")
    ax2.set_title("held-out sample scores", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_METHOD_STYLE = {"DPO": ("tab:blue", "o"), "PPO": ("tab:orange", "s"), "PPO-GT": ("tab:red", "^"),
                 "Preferred-FT": ("tab:green", "D"), "best-of-N": ("tab:purple", "x"), "reference": ("black", "*")}


def plot_frontier(points: list[dict[str, Any]], path: Path, *, title: str = "") -> Path:
    """Reward against KL(π‖π_ref), drawn like the DPO paper's Figure 2 (left): one colour per method, points
    along training joined per setting, 95% intervals on the reward."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    seen = set()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        runs.setdefault((p["method"], p["setting"]), []).append(p)
    for (method, setting), pts in runs.items():
        color, marker = _METHOD_STYLE.get(method, ("tab:gray", "."))
        pts = sorted(pts, key=lambda p: (p["step"], p["kl"]))
        ax.errorbar([p["kl"] for p in pts], [p["reward"] for p in pts], yerr=[p["reward_ci"] for p in pts],
                    color=color, marker=marker, ms=5, lw=1, alpha=0.85, capsize=2,
                    label=method if method not in seen else None)
        seen.add(method)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sample")
    ax.set_ylabel("oracle reward (P[positive])")
    ax.set_title(title or "reward vs KL", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_winrate(points: list[dict[str, Any]], path: Path, *, informative: bool = True, title: str = "",
                 why: str | None = None) -> Path:
    """Drawn like the DPO paper's Figure 3: win rate against the dataset's chosen reply vs sampling temperature,
    one line per method with its 95% band and a 50% line; right, the win rate along DPO's training."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    final = [p for p in points if p["step"] is None]
    for method in dict.fromkeys(p["method"] for p in final):
        pts = sorted((p for p in final if p["method"] == method), key=lambda p: p["temperature"])
        t = [p["temperature"] for p in pts]
        left.plot(t, [p["win_rate"] for p in pts], marker="o", ms=4, label=method)
        left.fill_between(t, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], alpha=0.15)
    curve = [p for p in points if p["step"] is not None]
    for key in dict.fromkeys((p["method"], p["temperature"]) for p in curve):
        pts = sorted((p for p in curve if (p["method"], p["temperature"]) == key), key=lambda p: p["step"])
        s = [p["step"] for p in pts]
        right.plot(s, [p["win_rate"] for p in pts], marker="o", ms=4, label=f"{key[0]}, T={key[1]:g}")
        right.fill_between(s, [p["ci_low"] for p in pts], [p["ci_high"] for p in pts], alpha=0.15)
    for ax, xlabel in ((left, "sampling temperature"), (right, "training step (DPO) / iteration (PPO)")):
        ax.axhline(0.5, color="gray", lw=1, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("win rate vs chosen")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    note = "" if informative else f"\n[UNINFORMATIVE: the judge {why or 'does not beat always-longer'}]"
    fig.suptitle((title or "win rate vs chosen") + note, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
