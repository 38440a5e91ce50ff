"""Train a CAPTCHA reader -- the main job; the same as ``xpnet train``.

    python examples/train.py                          # synthetic CAPTCHAs, the 'default' configuration
    python examples/train.py --data my_captchas/      # your own labelled images (file name = text)
    python examples/train.py --config long            # the 60-minute CPU configuration

``--help`` lists every option with its default; the configurations are in ``xpnet/captcha/config.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from xpnet.cli import run_guarded  # noqa: E402
from xpnet.cli.train import build_train_parser, run  # noqa: E402


def main(argv=None) -> int:
    args = build_train_parser("train.py").parse_args(argv)
    # the CLI's error policy: one sentence, exit 2 (usage) / 1 (runtime) / 130 (Ctrl-C), tracebacks with --debug
    return run_guarded(run, args, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
