"""Peak memory and throughput of training variants (reference strategy x batch layout), same model, data
and batch.

    python bench/reference_modes.py [--model smollm2-135m] [--steps 12] [--batch-size 8] [--out FILE.json]
    python bench/reference_modes.py --variants model/padded,model/prefix_shared --prompt-words 300 --repeats 2

Each mode runs the `preftune dpo` recipe in a fresh child process (so peak RSS is that mode's own), on the same synthetic
review pairs (built deterministically from the Rotten Tomatoes snippets the oracle uses: prompt = the opening
of a snippet, chosen/rejected = continuations from a fresh and a rotten snippet). pairs/s is the mean over
logged steps after the first two (warm-up); the one-off precompute pass is reported separately.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("model/padded", "adapter/padded", "precomputed/padded")


def make_pairs(path: Path, n: int, prompt_words: int = 6) -> None:
    from preftune.data.records import write_jsonl
    from preftune.eval.scorers import rotten_tomatoes_snippets

    snippets = rotten_tomatoes_snippets("train")
    fresh = [text for text, label in snippets if label == 1]
    rotten = [text for text, label in snippets if label == 0]
    rows = []
    for i in range(n):
        words = " ".join(fresh[j % len(fresh)] for j in range(i * 40, i * 40 + 40)).split()
        prompt = " ".join(words[:prompt_words])
        rows.append({"prompt": prompt, "chosen": " " + " ".join(fresh[i + n].split()[:24]),
                     "rejected": " " + " ".join(rotten[i].split()[:24])})
    write_jsonl(path, rows)


def child(variant: str, model: str, data: str, steps: int, batch_size: int, run_dir: str) -> None:
    from preftune.config import load_config
    from preftune.recipes.dpo import run as run_dpo
    from preftune.train.rundir import read_metrics

    t0 = time.perf_counter()
    mode, layout = variant.split("/")
    cfg = load_config(None, [f"model={model}", f"data.train={data}", f"train.max_steps={steps}",
                             f"train.batch_size={batch_size}", f"reference.mode={mode}", f"run.dir={run_dir}",
                             f"reference.cache_dir={run_dir}/refcache", "train.progress=false", "run.plot=false",
                             "lora.export_merged=false", "data.max_length=1024", "data.max_prompt_tokens=960",
                             f"train.layout={layout}"])
    run_dpo(cfg)
    rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "pairs_per_s" in r and r["step"] > 2]
    print(json.dumps({"variant": variant, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "pairs_per_s": sum(r["pairs_per_s"] for r in rows) / len(rows),
                      "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
                      "wall_s": time.perf_counter() - t0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="reference.mode/train.layout pairs")
    parser.add_argument("--prompt-words", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="run the variants this many times, interleaved")
    parser.add_argument("--out")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.data, args.steps, args.batch_size, args.run_dir)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        make_pairs(data, args.steps * args.batch_size, args.prompt_words)
        variants = args.variants.split(",")
        for rep in range(args.repeats):
            for variant in variants if rep % 2 == 0 else variants[::-1]:
                run_dir = Path(tmp) / f"{variant.replace('/', '-')}-{rep}"
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--model", args.model, "--data",
                                      str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                                      "--run-dir", str(run_dir)], capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"{variant:26} peak RSS {r['peak_rss_gb']:.2f} GB   {r['pairs_per_s']:.2f} pairs/s   "
                  f"{r['tokens_per_s']:.0f} tokens/s   (wall {r['wall_s']:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
