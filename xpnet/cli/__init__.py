"""The ``xpnet`` command.  Subcommands register themselves in ``COMMANDS``.

Error policy: an ``XpnetError`` is printed as one sentence on stderr and the
process exits with its ``exit_code`` (2 for usage errors, 1 for runtime
failures); a traceback is shown only with ``--debug``.  argparse's own usage
errors exit 2 as well.  Anything else that escapes a command (an OSError,
MemoryError, or a bug) still gets one sentence and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from ..errors import XpnetError


def _cmd_info(args) -> int:
    from .. import backend

    data = backend.info()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"backend      {data['backend']}  ({data['reason']})")
    print(f"dtype        {data['dtype']}")
    print(f"CuPy         {'importable' if data['cupy_importable'] else 'not importable'}; "
          f"CUDA device {'usable' if data['cuda_device_usable'] else 'not usable'} ({data['device_probe']})")
    dev = data.get("device") or {}
    if dev:
        gib = 1024 ** 3
        print(f"device       {dev['name']} (#{dev['id']}, compute capability {dev['compute_capability']}), "
              f"{dev['memory_free_bytes'] / gib:.1f} GiB free of {dev['memory_total_bytes'] / gib:.1f} GiB")
        print(f"CUDA         runtime {data.get('cuda_runtime')}, driver {data.get('cuda_driver')}")
        from ..cuda import kernels

        print(f"kernels      xpnet CUDA kernels {'on' if kernels.enabled() else 'off (XPNET_CUDA_KERNELS=0)'}")
    print(f"python       {data['python']} on {data['platform']}, {data['cpu_count']} CPU cores")
    print("versions     " + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v))
    return 0


def _add_info(sub):
    p = sub.add_parser("info", help="show the backend in use, why, the device and library versions")
    p.add_argument("--json", action="store_true", help="print as JSON (default: a readable table)")
    p.set_defaults(func=_cmd_info)


# Each entry adds one subcommand to the parser.  Other modules append to it.
COMMANDS = [_add_info]

from ..data.captcha import add_generate_command  # noqa: E402
from ..captcha.job import add_train_command  # noqa: E402
from ..captcha.recognizer import add_eval_command, add_predict_command  # noqa: E402

COMMANDS += [add_generate_command, add_train_command, add_eval_command, add_predict_command]


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


def _printable(text) -> str:
    """One line, whatever a message quotes (file names, labels): control characters are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args)


def run_guarded(func, args, prog: str = "xpnet") -> int:
    """``func(args)`` under the CLI's error policy: its exit code, or one sentence on stderr and 2 / 1 / 130.

    Shared by ``xpnet COMMAND`` and the example scripts, so both answer every failure the same way.
    """
    try:
        return int(func(args) or 0)
    except XpnetError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: {_printable(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    # Safety nets: library code raises XpnetError on purpose; whatever else escapes still gets one
    # sentence and exit code 1 (a traceback only with --debug).
    except MemoryError:
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: error: out of memory: use a smaller batch size or fewer images, or close other "
              "programs.", file=sys.stderr)
        return 1
    except OSError as exc:
        if getattr(args, "debug", False):
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {_printable(exc.strerror or exc)}{_printable(where)}: check the path, its "
              "permissions and the free disk space (--debug shows where it happened).", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 -- a bug: say so, keep the traceback for --debug
        if getattr(args, "debug", False):
            traceback.print_exc()
        print(f"{prog}: internal error: {type(exc).__name__}: {_printable(exc)}. This is a bug in xpnet: "
              "run again with --debug and report the traceback.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
