"""Side-by-side DPO benchmark: preftune against TRL's ``DPOTrainer`` on the same model, data and settings.

- ``workloads``: the workload table (model, pairs, prompt/response token lengths, device) and its data.
- ``systems``: what runs inside one child process per (workload, system): preftune's ``recipes.dpo.run``, or TRL.
- ``gate``: the correctness gate (both compute the same per-sequence log-probs and DPO loss) run before timing.
- ``runner``: spawns the children interleaved, collects rows, computes preftune/TRL ratios, prints, writes JSON.
- ``preftune/recipes/bench.py``: the ``preftune bench`` command that drives them (this package is that recipe's
  own; it runs other recipes in its children, so no component imports it).

TRL is an optional extra (``pip install 'preftune[bench]'``); nothing here imports it at module level.
"""
