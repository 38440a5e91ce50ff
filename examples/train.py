"""Train a CAPTCHA reader -- the main job.  Same options as ``xpnet train`` (``--help`` lists them).

    python examples/train.py                          # synthetic CAPTCHAs, the 'default' configuration
    python examples/train.py --data my_captchas/      # your own labelled images (file name = text)
    python examples/train.py --config long            # the 60-minute CPU configuration
    XPNET_BACKEND=cupy python examples/train.py --config long --time-budget 300   # the same on a GPU

With no arguments it generates a synthetic set (reproducible by seed), trains the default model within
the default configuration's time budget, reports whole-string and per-character accuracy on 2,000
freshly generated held-out images from another seed, and writes the model file, history and plot to
the output folder it prints at the start and at the end.  See ``xpnet/captcha_train.py`` for the
configurations and the rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from xpnet.captcha.job import build_train_parser, train_from_args  # noqa: E402
from xpnet.cli import run_guarded  # noqa: E402


def main(argv=None) -> int:
    args = build_train_parser("train.py").parse_args(argv)
    # the CLI's error policy: one sentence, exit 2 (usage) / 1 (runtime) / 130 (Ctrl-C), tracebacks with --debug
    return run_guarded(lambda a: train_from_args(a) and 0, args, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
