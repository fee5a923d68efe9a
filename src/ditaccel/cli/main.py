"""``ditaccel`` command line: one module per subcommand, each with ``HELP``, ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from . import (bench, demo, env, generate, metrics, plan, profile, train_classifier, train_reference, train_shiva,
               train_text_reference)

COMMANDS = {
    "bench": bench,
    "demo": demo,
    "env": env,
    "generate": generate,
    "metrics": metrics,
    "profile": profile,
    "plan": plan,
    "train-reference": train_reference,
    "train-classifier": train_classifier,
    "train-shiva": train_shiva,
    "train-text-reference": train_text_reference,
}


# Where each command writes: argument -> "file", "folder" or "stem" (an artifact: STEM.safetensors
# + STEM.json).  Checked before the command runs, so a path that cannot be written fails at once.
OUTPUTS = {
    "generate": {"out": "file", "json": "file", "save_dir": "folder"},
    "profile": {"out": "stem", "plot": "folder"},
    "plan": {"out": "file", "plot": "file"},
    "bench": {"out": "folder", "cache_dir": "folder"},
    "demo": {"out": "folder", "cache_dir": "folder"},
    "metrics": {"json": "file"},
    "train-reference": {"out": "folder", "export": "folder"},
    "train-classifier": {"out": "stem"},
    "train-shiva": {"out": "folder"},
    "train-text-reference": {"out": "folder", "export": "folder"},
}


# The commands that run a model, and so take --device.
COMPUTES = ("generate", "profile", "plan", "bench", "demo", "train-shiva")


def check_outputs(args) -> None:
    """Every output path of the command can be written, and no two of them are the same file."""
    import os

    from ..io import check_writable

    seen: dict[str, str] = {}
    for name, kind in OUTPUTS.get(args.command, {}).items():
        value = getattr(args, name, None)
        if value:
            flag = "--" + name.replace("_", "-")
            paths = [f"{value}.safetensors", f"{value}.json"] if kind == "stem" else [value]
            check_writable(paths[0], folder=kind == "folder", flag=flag)
            for path in paths:
                key = os.path.realpath(path)
                if key in seen:
                    raise UsageError(f"{seen[key]} and {flag} both name {path}; give them different paths")
                seen[key] = flag


class UsageError(Exception):
    """Raised by a subcommand for bad input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so :func:`main` returns 2 instead of exiting) and
    bare ``type=int`` / ``type=float`` options read as 64-bit integers and finite numbers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from .common import ANY_INT, FINITE_FLOAT

        self.register("type", int, ANY_INT)
        self.register("type", float, FINITE_FLOAT)

    def error(self, message):
        raise ArgumentError(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)")


class ArgumentError(Exception):
    """A command line argparse could not read: the message is the whole line to print."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditaccel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        if name in COMPUTES:
            p.add_argument("--device", default=None,
                           help="where to compute: auto (a CUDA device where torch sees one; under "
                                "accelerate launch, each process's own), cpu, cuda or cuda:N "
                                "(default: $DITACCEL_DEVICE, else auto)")
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..io import ArtifactError
    from ..registry import ModelNotFound
    from ..runtime.state import NonFiniteOutput

    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        check_outputs(args)
        if args.command in COMPUTES:
            from .. import distributed
            from ..devices import resolve_device

            if args.device == "cpu":  # (DITACCEL_DEVICE=cpu does the same by itself)
                distributed.force_cpu()  # gloo between processes, even where CUDA is present
            args.device = resolve_device(args.device)
        return int(args._run(args) or 0)
    except (UsageError, ArtifactError, ModelNotFound, ValueError, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"ditaccel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteOutput as e:
        print(f"ditaccel {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ditaccel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
