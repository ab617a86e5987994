"""``preftune score``: add a scorer's score to each row of a samples file."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("score", help="score samples with a sentiment scorer",
                       description="Add `score_<scorer>` to each JSONL row (computed on prompt + completion, the "
                                   "full text, as the DPO paper's sentiment classifier scores it) and print the mean.")
    p.add_argument("samples", help="JSONL with `prompt` and `completion`")
    p.add_argument("--scorer", required=True, help="sentiment (the demo's oracle, P(positive)) | vader (compound) | "
                                                   "rm:PATH (a reward model trained with `preftune reward`)")
    p.add_argument("--out", help="output file (default: rewrite SAMPLES in place, atomically)")
    p.set_defaults(func=lambda args: run(args.samples, args.out or args.samples, args.scorer))


def run(samples: str, out: str, scorer: str) -> int:
    from preftune.eval.scorers import score_file

    mean = score_file(samples, out, scorer)
    print(f"mean {scorer} score: {mean:.4f}")
    return 0
