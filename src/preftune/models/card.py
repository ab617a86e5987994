"""Model cards: the ``README.md`` a saved model directory carries, in the Hugging Face model-card format.

YAML front matter (``base_model`` when it is a hub model, ``library_name: preftune``, tags naming the method),
then what was trained and how: the method and its loss with the parameters, the data (file, SHA-256, counts,
skipped records, truncation; from ``RUN/data.json``), the final train and eval metrics (from
``RUN/metrics.jsonl``), preftune's version, and the command and config that reproduce the run (from
``RUN/config.yaml``). Everything comes from the run directory, so a card never disagrees with the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the aliases that stand for a hub model
TAGS = {"dpo": ["dpo"], "sft": ["sft"], "reward": ["reward-model"], "ppo": ["ppo", "rlhf"]}
SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "perplexity", "reward", "kl", "grad_norm")


def _base_model(spec: str) -> str | None:
    """The hub id a model spec stands for (None for a local directory, a .gguf file or the random ``tiny``)."""
    if spec in HUB_IDS:
        return HUB_IDS[spec]
    if spec == "tiny" or spec.endswith(".gguf") or Path(spec).expanduser().exists() or spec.count("/") != 1:
        return None
    return spec


def _method(command: str, cfg: dict[str, Any]) -> str:
    if command == "dpo":
        d, ref = cfg["dpo"], cfg["reference"]["mode"]
        extra = "".join(f", {k}={d[k]}" for k in ("label_smoothing", "gamma", "sft_weight") if d.get(k))
        return (f"Direct preference optimisation: loss `{d['loss']}` with β={d['beta']}{extra}, against a frozen "
                f"reference (`reference.mode={ref}`, reference model `{cfg.get('ref_model') or cfg['model']}`).")
    if command == "sft":
        return "Supervised fine-tuning on the responses (the prompt masked out of the loss)."
    if command == "reward":
        return "A Bradley-Terry reward model: a scalar head on the model, trained so that chosen scores above rejected."
    if command == "ppo":
        p = cfg["ppo"]
        return (f"PPO against the scorer `{p['scorer']}` with a KL penalty to the frozen reference "
                f"(kl_coef {p['kl_coef']}{', adaptive' if p.get('adaptive_kl') else ''}), {p['iterations']} "
                f"iterations of {p['batch_size']} prompts.")
    return f"`preftune {command}`."


def _training(command: str, cfg: dict[str, Any]) -> str:
    t = cfg["train"]
    if command == "ppo":
        p = cfg["ppo"]
        return (f"optimizer {t['optimizer']}, lr {p['lr']}, {p['ppo_epochs']} epochs of minibatch "
                f"{p['minibatch_size']} per iteration, precision {t['precision']}, seed {t['seed']}")
    lora = cfg.get("lora") or {}
    adapter = f", LoRA r={lora['r']} alpha={lora['alpha']}" if lora.get("enabled") else ""
    return (f"{t['max_steps']} steps of {t['batch_size']} x {t['grad_accum_steps']} accumulation per process, "
            f"optimizer {t['optimizer']}, lr {t['lr']} ({t['schedule']}), max_grad_norm {t['max_grad_norm']}, "
            f"precision {t['precision']}, seed {t['seed']}{adapter}")


def _data(run_dir: Path) -> list[str]:
    path = run_dir / "data.json"
    if not path.is_file():
        return ["(not recorded)"]
    summary = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for split, f in summary.get("files", {}).items():
        reasons = "; ".join(f"{n} x {why}" for why, n in f["skip_reasons"].items())
        out.append(f"- {split}: `{Path(f['path']).name}` (sha256 `{f['sha256'] or 'a directory'}`): "
                   f"{f['records_read']} records, {f['items']} items, {f['skipped']} skipped"
                   f"{f' ({reasons})' if reasons else ''}; {f['prompts_truncated']} prompts and "
                   f"{f['responses_truncated']} responses truncated")
    held = " (held out of train)" if summary.get("eval_held_out_of_train") else ""
    out.append(f"- trained on {summary['train_items']} items, evaluated on {summary['eval_items']}{held}")
    return out


def _metrics(run_dir: Path) -> list[str]:
    from preftune.train.rundir import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    train = next((r for r in reversed(rows) if any(k in r for k in SHOWN)), None)
    evals = next((r for r in reversed(rows) if any(k.startswith("eval/") for k in r)), None)
    out = []
    for name, row, prefix in (("train", train, ""), ("eval", evals, "eval/")):
        if row is None:
            continue
        values = [(k[len(prefix):], row[k]) for k in row if k.startswith(prefix) and k[len(prefix):] in SHOWN
                  and (prefix or not k.startswith("eval/"))]
        if values:
            out.append(f"| {name} (step {row['step']}) | " + ", ".join(f"{k} {v:.4g}" for k, v in values) + " |")
    return ["| | final metrics |", "|---|---|", *out] if out else ["(none logged)"]


def model_card(run_dir: Path, what: str = "policy", *, adapter: bool = False) -> str:
    """The card of the model ``what`` (policy, merged policy, reward model) saved from ``run_dir``."""
    from preftune.version import __version__

    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    command = saved.pop("command", "dpo")
    base = _base_model(saved.get("model", ""))
    tags = ["preftune", *TAGS.get(command, [command])]
    if command == "dpo" and saved["dpo"]["loss"] != "sigmoid":
        tags.append(saved["dpo"]["loss"])
    if adapter:
        tags.append("lora")
    front = {**({"base_model": base} if base else {}), "library_name": "preftune", "tags": tags}
    replay = dict(saved, run={**saved.get("run", {}), "dir": None})
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {run_dir.name}: {what}", "",
             f"Trained with preftune {__version__} (`preftune {command}`) from `{saved.get('model')}`"
             f"{' as a LoRA adapter' if adapter else ''}.", "", "## Method", "", _method(command, saved), "",
             f"Training: {_training(command, saved)}.", "", "## Data", "", *_data(run_dir), "", "## Results", "",
             *_metrics(run_dir), "", "## Reproduce", "",
             f"Save the config below as `config.yaml` and run `preftune {command} config.yaml` (the data files "
             "must be at the same paths; their SHA-256 is above).", "", "```yaml",
             yaml.safe_dump({"command": command, **replay}, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
