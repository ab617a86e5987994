"""Correctness gate, run before any timing: preftune and TRL compute the same thing on the same batch.

On the ``tiny`` model (policy: seed 0, reference: seed 1, so the loss is not trivially log 2), both saved to
HF directories that both sides load:

- preftune: ``tokenize_pair`` -> ``collate_pairs`` -> ``sequence_logps`` (policy and frozen reference) and
  ``dpo_forward`` with the ``sigmoid`` loss (the training step's own function);
- TRL: ``DPOTrainer``'s own tokenisation of the same records (``train_dataset`` after its ``_prepare_dataset``),
  its ``data_collator``, its concatenated fused-head forward (``compute_ref_log_probs(model, batch)``, the same
  ``model(..., labels=..., fused_lm_head=True).log_probs`` call ``_compute_loss`` makes), and ``compute_loss``.

The records are plain strings: a prompt ending in a word, responses starting with a space. Then both
tokenisations are identical: SmolLM2's tokenizer adds no BOS to either; the byte-level BPE splits at the
prompt/response boundary, so TRL's "tokenise prompt+response, cut at the common prefix" equals preftune's
"tokenise separately, concatenate"; and TRL's appended EOS *text* becomes the same EOS *id* that preftune appends.
Conversations would not match (TRL keeps the "\\n" after ``<|im_end|>`` that preftune drops), so none are used.
The gate first asserts the token ids are identical, so a log-prob difference can only come from the maths.
All in fp32 (no autocast): per-sequence log-probs and the loss must agree to ``tolerance`` (1e-4).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

GATE_RECORDS = [
    {"prompt": "The movie was", "chosen": " wonderful and moving.", "rejected": " dull and far too long."},
    {"prompt": "I thought the acting", "chosen": " was superb throughout.", "rejected": " was wooden and flat."},
    {"prompt": "This film", "chosen": " is a delight from start to end.", "rejected": " is a mess."},
    {"prompt": "Overall the story of two brothers who run a diner",
     "chosen": " kept me hooked until the final scene, and then some.", "rejected": " put me to sleep twice."},
    {"prompt": "In the end", "chosen": " I was moved to tears.", "rejected": " I wanted my money back."},
]
BETA = 0.1


class GateError(AssertionError):
    """preftune and TRL disagree: the benchmark would compare different computations."""


def _save_tiny(root: Path, seed: int, tokenizer) -> str:
    from preftune.models.load import load_causal_lm

    path = root / f"tiny-seed{seed}"
    load_causal_lm("tiny", seed=seed).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _preftune_side(policy_dir: str, ref_dir: str, tokenizer, records: list[dict]) -> dict:
    import torch

    from preftune.data.collate import collate_pairs
    from preftune.data.records import PreferencePair
    from preftune.data.tokenize import tokenize_pair
    from preftune.losses import get_loss
    from preftune.models.load import load_causal_lm, load_reference
    from preftune.models.logprobs import sequence_logps
    from preftune.models.reference import FrozenReference
    from preftune.train.objectives import dpo_forward

    items = [tokenize_pair(tokenizer, PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"gate:{i}"),
                           max_length=512, max_prompt_tokens=256) for i, r in enumerate(records)]
    batch = collate_pairs(items, tokenizer.pad_token_id)
    policy, ref = load_causal_lm(policy_dir), load_reference(ref_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        policy_logps, ref_logps = sequence_logps(policy, *args).logps, sequence_logps(ref, *args).logps
    out = dpo_forward(policy, FrozenReference(ref), get_loss("sigmoid", beta=BETA), batch)
    loss = out.losses.mean()
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in policy.parameters() if p.grad is not None])
    return {"ids": [[p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in items], "policy": policy_logps,
            "ref": ref_logps, "loss": loss.item(), "grad_norm": grad_norm.item()}


def _trl_side(policy_dir: str, ref_dir: str, tokenizer, records: list[dict], out_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=len(records), beta=BETA, loss_type=["sigmoid"],
                     bf16=False, gradient_checkpointing=False, max_length=None, report_to="none", disable_tqdm=True,
                     model_init_kwargs={"dtype": "float32"}, use_cpu=True)  # both sides on the CPU, also on GPU hosts
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    trainer = DPOTrainer(model=policy_dir, ref_model=ref, args=args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(records))]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        policy = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))  # (2B,): chosen rows, then rejected
        ref_logps = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)  # TRL's training-step loss: mean over pairs
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.model.parameters() if p.grad is not None])
    logged_chosen = trainer._metrics["train"]["logps/chosen"][-1]  # from inside _compute_loss
    return {"ids": [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in rows], "policy": policy,
            "ref": ref_logps, "loss": loss.item(), "grad_norm": grad_norm.item(), "logged_chosen_mean": logged_chosen}


def compare(ours: dict, theirs: dict, tolerance: float) -> dict:
    """The gate's verdict: identical token ids, and log-probs, loss and gradient norm within ``tolerance``
    (the gradient norm relative). Raises GateError naming what differs."""
    for i, (a, b) in enumerate(zip(ours["ids"], theirs["ids"], strict=True)):
        if a != b:
            raise GateError(f"record {i}: tokenisations differ (prompt, chosen, rejected ids)\n"
                            f"  preftune: {a}\n  TRL:      {b}")
    n = len(ours["ids"])
    result = {
        "n_pairs": n, "tokens_identical": True, "tolerance": tolerance, "beta": BETA,
        "max_abs_diff_policy_logps": (ours["policy"] - theirs["policy"].cpu()).abs().max().item(),
        "max_abs_diff_ref_logps": (ours["ref"] - theirs["ref"].cpu()).abs().max().item(),
        "abs_diff_loss": abs(ours["loss"] - theirs["loss"]),
        "abs_diff_logps_chosen_mean_in_loss": abs(ours["policy"][:n].mean().item() - theirs["logged_chosen_mean"]),
        "rel_diff_grad_norm": abs(ours["grad_norm"] - theirs["grad_norm"]) / max(abs(theirs["grad_norm"]), 1e-12),
        "loss_preftune": ours["loss"], "loss_trl": theirs["loss"],
        "grad_norm_preftune": ours["grad_norm"], "grad_norm_trl": theirs["grad_norm"],
    }
    bad = {k: v for k, v in result.items() if k.startswith(("max_abs", "abs_diff", "rel_diff")) and not v <= tolerance}
    result["passed"] = not bad
    if bad:
        raise GateError("preftune and TRL disagree beyond " + f"{tolerance:g}: "
                        + ", ".join(f"{k}={v:.3g}" for k, v in bad.items())
                        + f" (loss preftune {ours['loss']:.6f}, TRL {theirs['loss']:.6f})")
    return result


def run_gate(tolerance: float = 1e-4, records: list[dict] | None = None) -> dict:
    """Run the gate; returns the measured differences, or raises GateError."""
    import torch

    from preftune.models.load import load_tokenizer

    records = records or GATE_RECORDS
    tokenizer = load_tokenizer("tiny")
    with tempfile.TemporaryDirectory(prefix="preftune-gate-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy_dir, ref_dir = _save_tiny(Path(tmp), 0, tokenizer), _save_tiny(Path(tmp), 1, tokenizer)
        ours = _preftune_side(policy_dir, ref_dir, tokenizer, records)
        theirs = _trl_side(policy_dir, ref_dir, tokenizer, records, str(Path(tmp) / "trl"))
    return compare(ours, theirs, tolerance)
