"""A Bradley-Terry reward model: the decoder body of a causal LM + a scalar head read at the last token.

``r(x, y) = w · h_T``, where ``h_T`` is the final hidden state at the LAST position whose attention mask is 1
(the last completion token: EOS when responses end with one). That position is computed from the mask, never
found by searching for the pad token: for SmolLM2 pad == EOS and every response ends with EOS.

Deliberate choices:
- The head is ``nn.Linear(hidden, 1, bias=False)`` in fp32. Default init ``normal``: N(0, 1/(H + 1)) from a
  generator seeded by ``seed`` (Stiennon et al. 2020), so every score is a small random projection from step 1
  and the backbone gets a fixed direction to learn along. ``zeros``: every score starts at exactly 0, so the
  Bradley-Terry loss of an untrained model is exactly log 2 (tested); but with a fine-tuning learning rate the
  head grows by at most lr per element per step (Adam), and on SmolLM2 (lr 1e-5, 60 steps) the margins stayed
  below 0.01 and the loss at log 2. The Bradley-Terry likelihood only sees differences r(x, y_w) - r(x, y_l),
  so a bias would never receive a gradient; the offset is handled by the stored normalisation instead.
- Where the score is read matters: with ``data.append_eos=true`` it is read at an EOS appended to every response,
  a position with the same role in every sequence; without it, at whatever content token the text ends on. On
  the demo's sentiment pairs (SmolLM2, 60 steps, lr 5e-5) held-out pairwise accuracy was 0.56-0.64 with EOS vs
  0.52 without (66 pairs, so ±0.06), and Spearman correlation with the oracle on 512 samples 0.42 vs 0.31.
- Normalisation: after training the mean and standard deviation (population) of the raw rewards of the training
  responses (chosen and rejected) are stored; ``normalized=True`` (the default of the scoring API and of the
  ``rm:PATH`` scorer) reports ``(r - mean) / std``, as Ziegler et al. (2019) standardise their reward model
  before RL. ``forward`` and ``normalized=False`` give the raw score.

On disk (``RUN/reward_model/``): the backbone via ``save_pretrained`` (safetensors, loadable with
``transformers.AutoModel``), the tokenizer, ``reward_head.safetensors`` (``weight``: (1, H)) and
``reward_config.json`` (base model spec, hidden size, data settings, normalisation). Written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from preftune.models.load import (ModelSpecError, disable_dropout, from_pretrained_safetensors, load_causal_lm,
                                  load_tokenizer)

CONFIG_FILE = "reward_config.json"
HEAD_INITS = ("normal", "zeros")
HEAD_FILE = "reward_head.safetensors"
FORMAT = "preftune-reward-model"
VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position whose mask is 1, for (B, T) masks (right or left padding alike)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)
    torch._assert_async(torch.all(last >= 0), "reward model: a row has no token (attention mask all zero)")
    return last


def is_reward_model_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


class RewardModel(nn.Module):
    """``forward(input_ids (B, T), attention_mask (B, T)) -> (B,)`` raw fp32 rewards. All parameters (backbone
    and head) are trainable, so the training loop's checkpoints cover the head too."""

    def __init__(self, backbone: nn.Module, hidden_size: int, *, head_init: str = "normal", seed: int = 0,
                 info: dict[str, Any] | None = None):
        super().__init__()
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1, bias=False, dtype=torch.float32)
        with torch.no_grad():
            if head_init == "zeros":
                self.head.weight.zero_()
            else:
                gen = torch.Generator().manual_seed(seed)
                self.head.weight.copy_(torch.randn((1, hidden_size), generator=gen) / math.sqrt(hidden_size + 1))
        self.hidden_size = hidden_size
        # base_model, seed, head_init, data settings (append_eos, ...)
        self.info: dict[str, Any] = {**(info or {}), "head_init": head_init, "seed": seed}
        self.normalization: dict[str, float] | None = None  # {"mean", "std", "n"} of training rewards
        self.tokenizer = None  # set by load(); needed only by score_texts

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert input_ids.dim() == 2 and input_ids.shape == attention_mask.shape, (input_ids.shape, attention_mask.shape)
        last = last_token_index(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return nn.functional.linear(h.float(), self.head.weight.float()).squeeze(-1)

    # ------------------------------------------------------------------ scoring
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """(r - mean) / std with the stored training statistics; the raw scores when there are none."""
        if not self.normalization:
            return raw
        std = self.normalization["std"] if self.normalization["std"] > 1e-8 else 1.0
        return (raw - self.normalization["mean"]) / std

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]], *, normalized: bool = True,
                        batch_size: int = 32) -> torch.Tensor:
        """(N,) fp32 scores (on CPU) of exact token sequences, right-padded in batches, in eval mode."""
        if any(len(s) == 0 for s in sequences):
            raise ValueError("cannot score an empty token sequence")
        device = self.head.weight.device
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start:start + batch_size]
                length = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), length), dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
                    mask[i, :len(s)] = 1
                out.append(self(ids.to(device), mask.to(device)).cpu())
        finally:
            self.train(was_training)
        raw = torch.cat(out) if out else torch.zeros(0)
        return self.normalize(raw) if normalized else raw

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
                  normalized: bool = True, batch_size: int = 32) -> torch.Tensor:
        """(N,) scores of ``prompt_ids[i] + completion_ids[i]``, exactly these tokens (nothing appended): PPO
        scores what it sampled. Each completion should end as training responses did (with EOS when the model
        was trained with ``data.append_eos=true``, see ``info["append_eos"]``)."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
        return self.score_sequences([list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)],
                                    normalized=normalized, batch_size=batch_size)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a FULL text (prompt + completion) as training saw such a sequence: special tokens as for
        a plain-string prompt, and EOS appended when the model was trained on responses ending with EOS (the
        score is then read at an EOS, as in training)."""
        from preftune.data.tokenize import encode_prompt

        if self.tokenizer is None:
            raise ValueError("this reward model has no tokenizer (load it with RewardModel.load)")
        ids = encode_prompt(self.tokenizer, text)
        eos = self.tokenizer.eos_token_id
        if self.info.get("append_eos", True) and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return ids

    def score_texts(self, texts: Sequence[str], *, normalized: bool = True, batch_size: int = 32) -> list[float]:
        return self.score_sequences([self.encode_text(t) for t in texts], normalized=normalized,
                                    batch_size=batch_size).tolist()

    def score_replies(self, prompts: Sequence, replies: Sequence[str], *, normalized: bool = True,
                      batch_size: int = 32) -> list[float]:
        """Scores of (prompt, reply) pairs tokenised as this model's training tokenised its pairs: the prompt kept to
        its last ``max_prompt_tokens``, the reply cut to fit ``max_length``, EOS appended when training did."""
        from preftune.data.schema import SFTExample
        from preftune.data.tokenize import tokenize_example

        if self.tokenizer is None:
            raise ValueError("this reward model has no tokenizer (load it with RewardModel.load)")
        limits = {"max_length": self.info.get("max_length", 512), "max_prompt_tokens": self.info.get(
            "max_prompt_tokens", 256), "append_eos": self.info.get("append_eos", True)}
        rows = [tokenize_example(self.tokenizer, SFTExample(p, r, source=f"reply:{i}"), **limits)
                for i, (p, r) in enumerate(zip(prompts, replies, strict=True))]
        return self.score_ids([t.prompt_ids for t in rows], [t.completion_ids for t in rows], normalized=normalized,
                              batch_size=batch_size).tolist()

    # ------------------------------------------------------------------ disk
    def config_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.info, "hidden_size": self.hidden_size,
                "score_position": "last token whose attention_mask is 1",
                "head": {"bias": False, "dtype": "float32"},
                "normalization": self.normalization}

    def save(self, path: str | Path, tokenizer, card: str | None = None) -> Path:
        """Atomic HF-format directory: backbone (safetensors) + tokenizer + head + reward_config.json."""
        from safetensors.torch import save_file

        from preftune.models.save import save_model

        def extra(tmp: Path) -> None:
            save_file({"weight": self.head.weight.detach().float().contiguous().cpu()}, str(tmp / HEAD_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2), encoding="utf-8")

        return save_model(self.backbone, tokenizer, Path(path), extra=extra, card=card)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str | None = None,
             trust_remote_code: bool = False) -> "RewardModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"reward model not found: {path}")
        if not is_reward_model_dir(path):
            raise ModelSpecError(f"{path} is not a reward model directory (no {CONFIG_FILE})")
        info = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ModelSpecError(f"{path / CONFIG_FILE}: not a {FORMAT} v{VERSION} file")
        backbone = from_pretrained_safetensors(AutoModel, str(path), trust_remote_code=trust_remote_code)
        disable_dropout(backbone)
        keep = {k: v for k, v in info.items()
                if k not in ("format", "version", "hidden_size", "score_position", "head", "normalization")}
        model = cls(backbone, int(info["hidden_size"]), head_init="zeros", info=keep)  # the head is read below
        model.info["head_init"] = info.get("head_init", "zeros")
        model.info["seed"] = info.get("seed", 0)
        weight = load_file(str(path / HEAD_FILE))["weight"]
        if tuple(weight.shape) != (1, model.hidden_size):
            raise ModelSpecError(f"{path / HEAD_FILE}: head shape {tuple(weight.shape)} != (1, {model.hidden_size})")
        with torch.no_grad():
            model.head.weight.copy_(weight)
        model.normalization = info.get("normalization")
        model.tokenizer = load_tokenizer(str(path), trust_remote_code=trust_remote_code)
        model.eval()
        return model.to(device) if device is not None else model


def build_reward_model(spec: str, *, seed: int = 0, head_init: str = "normal",
                       trust_remote_code: bool = False) -> RewardModel:
    """A reward model on the decoder body of the causal LM ``spec`` (its LM head is dropped) with a new head
    (``head_init``, seeded by ``seed``); or, when ``spec`` is a saved reward model directory, that model (head
    included) to train further."""
    if is_reward_model_dir(spec):
        model = RewardModel.load(spec, trust_remote_code=trust_remote_code)
        model.normalization = None  # stale once training continues
        return model.train()
    lm = load_causal_lm(spec, seed=seed, trust_remote_code=trust_remote_code)
    get_decoder = getattr(lm, "get_decoder", None)
    backbone = get_decoder() if get_decoder is not None else None
    if backbone is None or backbone is lm or not hasattr(backbone, "save_pretrained"):
        raise ModelSpecError(f"{spec}: the model exposes no decoder body (get_decoder) to put a reward head on")
    hidden = getattr(lm.config, "hidden_size", None)
    if not isinstance(hidden, int) or hidden < 1:
        raise ModelSpecError(f"{spec}: the model config has no hidden_size")
    return RewardModel(backbone, hidden, head_init=head_init, seed=seed, info={"base_model": spec})


def reward_statistics(scores: torch.Tensor) -> dict[str, float]:
    """Mean and population standard deviation of raw rewards (the stored normalisation)."""
    scores = scores.double()
    mean = float(scores.mean())
    std = float(scores.std(unbiased=False)) if scores.numel() > 1 else 0.0
    return {"mean": mean, "std": std if math.isfinite(std) else 0.0, "n": int(scores.numel())}


class RewardModelScorer:
    """The ``rm:PATH`` scorer: full texts (prompt + completion) -> normalised reward-model scores."""

    name = "rm"

    def __init__(self, path: str | Path, *, batch_size: int = 32):
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = RewardModel.load(path, device=device)
        self.path, self.batch_size = str(path), batch_size

    def __call__(self, texts: list[str]) -> list[float]:
        if isinstance(texts, str):
            raise TypeError("RewardModelScorer takes a list of texts, not one string")
        return self.model.score_texts(list(texts), batch_size=self.batch_size)

    def score_samples(self, samples: Sequence, tokenizer) -> list[float]:
        """PPO's path: the sampled tokens themselves (prompt ids + completion ids, nothing appended, a completion
        cut by the length limit stays without EOS as a cut training response does) when the reward model
        shares the policy's vocabulary. Decoding and re-encoding changed the tokens of nearly every sample (an
        EOS appended to cut ones, different BPE splits: up to 3 in score). Other vocabularies: the texts."""
        same = self.model.tokenizer is not None and (
            self.model.tokenizer is tokenizer or self.model.tokenizer.get_vocab() == tokenizer.get_vocab())
        if not same:
            from preftune.data.schema import review_text

            return self([review_text(x.prompt, x.completion) for x in samples])
        return self.model.score_ids([x.prompt_ids for x in samples], [x.completion_ids for x in samples],
                                    batch_size=self.batch_size).tolist()


def training_normalization(model: RewardModel, items: list, batch_size: int) -> dict[str, float]:
    """Mean/std of the raw fp32 rewards of every training response (chosen and rejected), computed by the
    same path that scores at inference (``score_ids``), so normalised inference scores are centred on them."""
    prompts = [p.prompt_ids for p in items] * 2
    completions = [p.chosen_ids for p in items] + [p.rejected_ids for p in items]
    return reward_statistics(model.score_ids(prompts, completions, normalized=False, batch_size=batch_size))
