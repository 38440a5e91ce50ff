"""The ``xpnet`` command: one module per subcommand, registered in ``COMMANDS``.

Error policy: an ``XpnetError`` is printed as one sentence on stderr and the
process exits with its ``exit_code`` (2 for usage errors, 1 for runtime
failures); a traceback is shown only with ``--debug``.  argparse's own usage
errors exit 2 as well.  Anything else that escapes a command (an OSError,
MemoryError, or a bug) still gets one sentence and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .. import config
from ..errors import XpnetError
from . import eval as eval_command
from . import export, generate, info, predict, serve, train

# Each entry adds one subcommand to the parser (in this order in --help).
COMMANDS = [info.add_command, generate.add_command, train.add_command, eval_command.add_command,
            predict.add_command, export.add_command, serve.add_command]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xpnet", description="xpnet: train and use CAPTCHA readers on NumPy (CPU) or CuPy (GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args)


def _printable(text) -> str:
    """One line, whatever a message quotes (file names, labels): control characters are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def run_guarded(func, args, prog: str = "xpnet") -> int:
    """``func(args)`` under the CLI's error policy: its exit code, or one sentence on stderr and 2 / 1 / 130.

    Shared by ``xpnet COMMAND`` and the example scripts, so both answer every failure the same way.
    Every ``XPNET_*`` variable is checked first: a bad value stops the command before any work (exit 2).
    """
    debug = getattr(args, "debug", False)
    try:
        config.check_environment()
        return int(func(args) or 0)
    except XpnetError as exc:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    # Safety nets: library code raises XpnetError on purpose; whatever else escapes still gets one
    # sentence and exit code 1 (a traceback only with --debug).
    except MemoryError:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: out of memory: use a smaller batch size or fewer images, or close other "
              "programs.", file=sys.stderr)
        return 1
    except OSError as exc:
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {_printable(exc.strerror or exc)}{_printable(where)}: check the path, its "
              "permissions and the free disk space (--debug shows where it happened).", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 -- a bug: say so, keep the traceback for --debug
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {_printable(exc)}. This is a bug in xpnet: "
              "run again with --debug and report the traceback.", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "build_parser", "main", "run_guarded"]

if __name__ == "__main__":
    sys.exit(main())
