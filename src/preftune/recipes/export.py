"""``preftune export``: a trained model as one GGUF file for llama.cpp, Ollama or LM Studio."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp, Ollama, LM Studio)",
                       description="Write MODEL (a saved policy such as RUN/policy, a LoRA adapter directory, which "
                                   "is merged, or any model spec) as a GGUF file with its tokenizer and chat "
                                   "template inside. Llama-family models (SmolLM2 and the like). Prints a JSON "
                                   "summary.")
    p.add_argument("model", help="model directory (e.g. RUN/policy) or model spec")
    p.add_argument("--gguf", required=True, help="output .gguf file (written atomically)")
    p.add_argument("--type", dest="kind", choices=("f32", "f16", "q8_0"), default="f16",
                   help="weights' type: f32 (exact), f16 (default) or q8_0 (8-bit blocks); norms stay f32")
    p.add_argument("--tokenizer-pre", help="llama.cpp's pre-tokenizer name, for a tokenizer preftune cannot name "
                                           "itself (it names gpt-2 and smollm)")
    p.set_defaults(func=lambda args: run(args.model, args.gguf, kind=args.kind, tokenizer_pre=args.tokenizer_pre))


def run(model: str, gguf: str, *, kind: str = "f16", tokenizer_pre: str | None = None) -> int:
    from preftune.errors import ModelSpecError
    from preftune.models.gguf_export import export_gguf

    out = Path(gguf)
    if out.is_dir():
        raise ModelSpecError(f"--gguf {gguf} is a directory; give the output file's path (e.g. {gguf}/model.gguf)")
    lm, tokenizer = load_exportable(model)
    summary = export_gguf(lm, tokenizer, out, kind=kind, name=Path(model).name or model, tokenizer_pre=tokenizer_pre)
    print(json.dumps(summary, indent=2))
    return 0


def load_exportable(model: str):
    """The causal LM (a LoRA adapter merged onto its base) and tokenizer of ``model``; a reward model is refused."""
    from preftune.errors import ModelSpecError
    from preftune.models.load import load_causal_lm, load_tokenizer
    from preftune.models.reward_model import is_reward_model_dir

    if is_reward_model_dir(model):
        raise ModelSpecError(f"{model} is a reward model (a score head, no language-model head); GGUF export "
                             "writes causal language models such as RUN/policy")
    return load_causal_lm(model), load_tokenizer(model)
