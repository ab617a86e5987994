"""Peak memory per process on 2 CPU processes: data parallel (DDP) against FSDP2, with the reference held as a
model, precomputed, and with LoRA, and against DeepSpeed ZeRO-2 and ZeRO-3; a randomly initialised model of SmolLM2-360M's shape (362M parameters, 0.4B
class), fp32, AdamW, 2 DPO steps of one short pair per process. Also one process, for scale.

    python bench/memory_sharding.py [--out bench/results/memory-sharding-DATE.json] [--layers 32] [--only ZeRO-2,ZeRO-3]

Each run logs its processes' peak RSS (everything the process ever held: both models, gradients, optimizer state,
activations, the gloo buffers); the table prints them beside the bytes per parameter the layout predicts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = {  # name: (processes, overrides)
    "1 process": (1, []),
    "DDP": (2, []),
    "FSDP2": (2, ["train.sharding=fsdp2"]),
    "FSDP2 + precomputed reference": (2, ["train.sharding=fsdp2", "reference.mode=precomputed"]),
    "FSDP2 + LoRA": (2, ["train.sharding=fsdp2", "lora.enabled=true", "lora.export_merged=false"]),
    "ZeRO-2": (2, ["train.sharding=zero2"]),
    "ZeRO-3": (2, ["train.sharding=zero3"]),
}
# bytes per parameter on each process (fp32 weights, AdamW): policy weights 4 + gradients 4 + Adam moments 8,
# reference 4; sharded parts divided by the process count N. LoRA: the base's gradients and moments vanish.
PREDICTED = {"1 process": "16 + 4 = 20", "DDP": "16 + 4 = 20 (+4 DDP buckets)", "FSDP2": "(16 + 4) / N",
             "FSDP2 + precomputed reference": "16 / N", "FSDP2 + LoRA": "(4 + 4) / N + adapter",
             # DeepSpeed keeps its own fp32 master partitions beside the (here also fp32) weights: + 4 / N
             "ZeRO-2": "4 + (4 + 4 + 8 + 4) / N", "ZeRO-3": "(4 + 4 + 4 + 8 + 4) / N"}


def build_model(root: Path, layers: int) -> Path:
    """A random model of SmolLM2-360M's shape with the embedded SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from preftune.models.load import resolve_spec

    config = LlamaConfig(hidden_size=960, intermediate_size=2560, num_hidden_layers=layers, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = root / "model"
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_spec("smollm2-135m")).save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def run(setup: str, model: Path, data: Path, root: Path) -> list[float]:
    processes, extra = SETUPS[setup]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
                if processes > 1 else [sys.executable, "-m"])
    args = [f"model={model}", f"data.train={data}", "data.max_length=64", "data.max_prompt_tokens=32",
            "train.precision=fp32", "train.optimizer=adamw", "train.batch_size=1", "train.max_steps=2",
            "train.save_final=false", "train.progress=false", "run.plot=false", f"reference.cache_dir={root / 'cache'}",
            f"run.dir={root / re.sub(r'[^a-z0-9]+', '-', setup.lower())}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([*launcher, "preftune.cli", "dpo", *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{setup} failed:\n{done.stderr[-3000:]}")
    return sorted(float(m) for m in re.findall(r"peak_rss_gb ([0-9.]+)", done.stderr))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--only", help="comma-separated setups to run (default: all)")
    args = parser.parse_args()
    setups = [s.strip() for s in args.only.split(",")] if args.only else list(SETUPS)
    if any(s not in SETUPS for s in setups):
        parser.error(f"--only: setups are {', '.join(SETUPS)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, n_params = build_model(root, args.layers)
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?",
                                            "chosen": f" It is {2 * i}.", "rejected": f" It is {2 * i + 1}."}) + "\n"
                                for i in range(8)), encoding="utf-8")
        baseline = subprocess.run([sys.executable, "-c", "import resource, torch, transformers, accelerate, "
                                   "preftune.recipes.dpo; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
                                   " / 2**20)"], capture_output=True, text=True, check=True)
        runtime_gb = float(baseline.stdout.strip())
        print(f"{'the runtime alone (imports)':32} peak RSS {runtime_gb:.2f} GiB", flush=True)
        rows = []
        for setup in setups:
            start = time.perf_counter()
            peaks = run(setup, model, data, root)
            rows.append({"setup": setup, "processes": SETUPS[setup][0], "peak_rss_gb_per_process": peaks,
                         "predicted_bytes_per_param": PREDICTED[setup], "seconds": time.perf_counter() - start})
            print(f"{setup:32} peak RSS per process {', '.join(f'{p:.2f}' for p in peaks)} GiB", flush=True)
    print(f"\n{n_params / 1e6:.0f}M parameters (fp32 weights {n_params * 4 / 2**30:.2f} GiB); the runtime alone "
          f"(torch, transformers, accelerate imported) {runtime_gb:.2f} GiB per process\n")
    print("| setup | processes | peak RSS per process (GiB) | predicted bytes/param per process |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['processes']} | {' / '.join(f'{p:.2f}' for p in r['peak_rss_gb_per_process'])} "
              f"| {r['predicted_bytes_per_param']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"parameters": n_params, "runtime_gb": runtime_gb, "rows": rows,
                                              "cpu": os.uname().machine},
                                             indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
