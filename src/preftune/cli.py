"""``preftune <command>``: each command is a recipe (``preftune/recipes/<command>.py``) that registers its own
sub-command; this module only iterates over them, sets up logging and maps errors to exit codes. No logic here.

Config-driven commands take an optional YAML file and ``dotted.key=value`` overrides, e.g.
``preftune dpo model=tiny data.train=pairs.jsonl train.max_steps=10 run.dir=runs/x``.
Exit codes: 0 success; 2 bad input (config, data, model spec, a run directory in use or holding another run);
3 a run that cannot go on (a loss that stays non-finite); 74 an output that could not be written (disk full,
quota, read-only: the path and the cause are named, and the previous checkpoint stays intact); 143 stopped by
SIGTERM and 130 by SIGINT after writing a checkpoint (continue with ``--resume``; a second signal aborts at once,
also 130).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from preftune.errors import USER_ERRORS, Interrupted, OutputError, TrainingError
from preftune.recipes import RECIPES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description="Direct preference optimisation, offline-first.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in RECIPES:
        importlib.import_module(f"preftune.recipes.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow the options (`preftune judge FILE --out DIR judge.mode=text`): argparse
    # leaves positionals that come after an option unparsed
    if extra and isinstance(getattr(args, "args", None), list) and not any(e.startswith("-") for e in extra):
        args.args += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai", "urllib3", "matplotlib", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    route_deepspeed_logs(args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 74
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted: the metrics logged so far are in the run directory; --resume RUN_DIR continues from "
              "its last checkpoint (and starts again from step 0 if it has none yet)", file=sys.stderr)
        return 130
    finally:  # a command run in-process (tests, notebooks) does not keep its run directory locked
        rundir = sys.modules.get("preftune.train.rundir")  # loaded only by commands that take one
        if rundir is not None:
            rundir.release_run_dirs()
        _destroy_process_group()


def _destroy_process_group() -> None:
    """A run on several processes ends its process group itself: left to the interpreter's exit, gloo's threads
    were sometimes destroyed still joinable ("terminate called without an active exception", exit -6 after a
    finished ZeRO-3 run)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _ToStderr(logging.Filter):
    """DeepSpeed's logger writes to stdout, which carries a command's result (JSON): its records (WARNING and up;
    all with -v) go through preftune's logging to stderr instead, and never to stdout. transformers imports
    DeepSpeed whenever it is installed, so this applies to every command."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.level = logging.DEBUG if verbose else logging.WARNING

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            logging.getLogger("preftune.deepspeed").handle(record)
        return False


def route_deepspeed_logs(verbose: bool = False) -> None:
    """Send DeepSpeed's log records through preftune's logging (stderr), never to stdout (see ``_ToStderr``)."""
    logger = logging.getLogger("DeepSpeed")  # the name DeepSpeed's LoggerFactory gives it; filters survive it
    for old in [f for f in logger.filters if isinstance(f, _ToStderr)]:
        logger.removeFilter(old)
    logger.addFilter(_ToStderr(verbose))


if __name__ == "__main__":
    sys.exit(main())
