"""One module per command. Each holds its config dataclass (only the config sections it reads), its
``register(subparsers)`` and a ``run(cfg, ...)`` that reads top to bottom, composing the components below
(``data``, ``models``, ``losses``, ``train``, ``rl``, ``eval``), which never import a recipe.

A recipe module imports cheaply (torch and transformers load inside ``run``), so that ``preftune --help`` and a
config error come at once.
"""

RECIPES = ("dpo", "sft", "reward", "ppo", "eval", "sample", "score", "judge", "winrate", "demo", "frontier", "bench", "inspect", "export")
