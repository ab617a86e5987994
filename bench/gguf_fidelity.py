"""How close llama.cpp's run of `preftune export` is to the HF model it came from, per GGUF type.

    python bench/gguf_fidelity.py [MODEL] [--out DIR]      # default MODEL: smollm2-135m (the embedded model)

For f32, f16 and q8_0: the file's size, and on 4 prompts (plain text, an HH-style turn and a chat-template turn)
llama.cpp's (llama-cpp-python's) next-token log-probs against transformers' fp32 forward of the original model,
on each position's 20 most likely tokens (max and mean |difference|, nats), and how often the argmax agrees.
llama.cpp must cut every prompt into the same token ids (checked)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    import llama_cpp

    from preftune.models.gguf_export import llama_cpp_and_hf_logps
    from preftune.models.load import load_causal_lm, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--out", default=None, help="where the .gguf files go (default: a temporary directory)")
    args = parser.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="gguf-fidelity-"))
    tokenizer, model = load_tokenizer(args.model), load_causal_lm(args.model).eval()
    texts = ["The movie was", "Paris is the capital of", "Human: How do I bake bread?\n\nAssistant:",
             tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Answer briefly."}],
                                           tokenize=False, add_generation_prompt=True)]
    print(f"{'type':5} {'MiB':>7}  top-20 |dlogp| max   mean   argmax agrees")
    for kind in ("f32", "f16", "q8_0"):
        path = out_dir / f"model-{kind}.gguf"
        subprocess.run([sys.executable, "-m", "preftune.cli", "export", args.model, "--gguf", str(path),
                        "--type", kind], check=True, capture_output=True)
        llama = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, verbose=False, n_threads=2)
        worst, means, agree, count = 0.0, [], 0, 0
        for text in texts:
            got, want = llama_cpp_and_hf_logps(llama, model, tokenizer, text)
            top = want.topk(20, dim=-1).indices
            diff = (got.gather(1, top) - want.gather(1, top)).abs()
            worst, means = max(worst, diff.max().item()), [*means, diff.mean().item()]
            agree, count = agree + (got.argmax(-1) == want.argmax(-1)).sum().item(), count + len(want)
        llama.close()
        print(f"{kind:5} {path.stat().st_size / 2**20:7.1f}  {worst:18.3f} {np.mean(means):7.4f}   {agree}/{count}")
    print(json.dumps({"files": str(out_dir)}))


if __name__ == "__main__":
    main()
