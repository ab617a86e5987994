"""preftune against TRL's DPOTrainer, side by side: the same code as ``preftune bench``.

    python bench/trl_compare.py [--quick] [--out FILE.json] [--workloads ...] [--systems ...] [--steps N] [--repeat R]

See bench/README.md for what is measured and the results; the code lives in src/preftune/benchmark/.
"""

from __future__ import annotations

import sys

from preftune.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
