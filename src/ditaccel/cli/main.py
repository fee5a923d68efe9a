"""``ditaccel`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo, env, generate, metrics, soda, train

COMMANDS = {
    "bench": bench,
    "demo": demo,
    "env": env,
    "generate": generate,
    "metrics": metrics,
    "profile": soda.Profile,
    "plan": soda.Plan,
    "train-reference": train.Reference,
    "train-classifier": train.Classifier,
    "train-shiva": train.Shiva,
    "train-text-reference": train.TextReference,
}


class UsageError(Exception):
    """Raised by a subcommand for bad input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..io import ArtifactError
    from ..registry import ModelNotFound

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (UsageError, ArtifactError, ModelNotFound, ValueError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"ditaccel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditaccel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
