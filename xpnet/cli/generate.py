"""``xpnet generate``: render synthetic CAPTCHAs as PNG files and/or one uint8 ``.npz`` cache."""

from __future__ import annotations

import os
import time

from .. import checks
from ..data.captcha import check_filename_safe, fresh_seed, generate_captchas, make_charset, write_captcha_pngs
from ..data.folder import cpu_count, save_npz
from ..data.images import Preprocess
from ..data.labels import DIGITS_UPPER, parse_length
from ..errors import StorageError, UsageError

NPZ_NAME = "captchas.npz"


def add_command(sub) -> None:
    """Register ``xpnet generate``."""
    p = sub.add_parser(
        "generate", help="render synthetic CAPTCHAs (PNG files and/or an .npz cache), reproducible by seed",
        description="Render CAPTCHA images with the captcha package (at 160x60), reproducibly by seed. "
                    "PNG files are named LABEL_INDEX.png, so `xpnet train --data DIR` reads the labels back; "
                    f"the .npz cache ({NPZ_NAME}) holds uint8 images already resized for the model.")
    p.add_argument("--count", type=int, required=True, metavar="N", help="number of images to make (required, >= 1)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder, created if missing (required)")
    p.add_argument("--length", default="4", metavar="L",
                   help="characters per image, or a range such as 4-6 (each image draws its length uniformly "
                        "from the range) (default: 4)")
    p.add_argument("--charset", default=DIGITS_UPPER, metavar="CS",
                   help="the characters to draw from, uniformly; for PNG output none of / \\ : * ? \" < > | _ . "
                        f"(default: {DIGITS_UPPER}, 36 classes)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed: the same seed gives byte-identical images (default: a fresh random seed, "
                        "printed so the set can be made again)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help=f"worker processes; 0 renders in this process (default: every usable CPU core, "
                        f"{cpu_count()} here)")
    p.add_argument("--format", choices=("png", "npz", "both"), default="png",
                   help=f"png: LABEL_INDEX.png files; npz: one compressed uint8 cache DIR/{NPZ_NAME}; "
                        f"both: the two (default: png)")
    p.add_argument("--height", type=int, default=None, metavar="H",
                   help="image height after resizing (default: PNG files keep the 160x60 render; npz: 32)")
    p.add_argument("--width", type=int, default=None, metavar="W",
                   help="image width after resizing (default: PNG files keep the 160x60 render; npz: 80)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 for grey, 3 for RGB (default: 3)")
    p.add_argument("--resize", choices=("fit", "height", "stretch"), default=None,
                   help="resize policy, see xpnet.data.images (default: fit = keep the aspect ratio, fit inside "
                        "the box, pad with the background colour)")
    p.add_argument("--force", action="store_true",
                   help="write into a folder that already holds PNG files or the cache; files of the same name "
                        "are replaced (default: refuse)")
    p.set_defaults(func=run)


def run(args) -> int:
    checks.integer(args.count, "--count", what="a positive number of images")
    lengths = parse_length(args.length, "--length")
    checks.integer(args.workers, "--workers", 0, optional=True, what="0 or more")
    checks.integer(args.seed, "--seed", 0, optional=True, what="a non-negative integer")
    cs = make_charset(args.charset, lengths)
    if args.format in ("png", "both"):
        check_filename_safe(cs)
    sizes = {k: getattr(args, k) for k in ("height", "width", "channels", "resize") if getattr(args, k) is not None}
    for k in ("height", "width"):
        if k in sizes:
            checks.integer(sizes[k], f"--{k}", what="a positive number of pixels")
    pp = Preprocess(**sizes)
    seed = fresh_seed() if args.seed is None else args.seed
    out = os.path.abspath(args.out)
    npz_path = os.path.join(out, NPZ_NAME)
    _check_out(out, npz_path, args.format, args.force)
    t0 = time.perf_counter()
    if args.format == "npz":
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create output folder {out} ({exc.strerror or exc}).") from None
    if args.format == "png":
        write_captcha_pngs(out, args.count, seed, cs, preprocess=pp if sizes else None,
                           workers=args.workers, progress=None)
    else:
        data = generate_captchas(args.count, seed, cs, preprocess=pp, workers=args.workers, progress=None,
                                 png_dir=out if args.format == "both" else None)
        save_npz(npz_path, data)
    dt = time.perf_counter() - t0
    what = {"png": "PNG files", "npz": f"{NPZ_NAME} ({pp.channels}x{pp.height}x{pp.width} uint8)",
            "both": f"PNG files and {NPZ_NAME} ({pp.channels}x{pp.height}x{pp.width} uint8)"}[args.format]
    print(f"wrote {args.count} images as {what} to {out}: {cs.lengths} characters from {cs.chars!r}, "
          f"seed {seed}, {dt:.1f} s ({args.count / dt:.0f} images/s)")
    return 0


def _check_out(out: str, npz_path: str, fmt: str, force: bool) -> None:
    """Refuse a file, or (without --force) a folder that already holds PNG files or the cache."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder.")
    if force or not os.path.isdir(out):
        return
    if fmt in ("png", "both"):
        held = sum(1 for n in os.listdir(out) if n.lower().endswith(".png"))
        if held:
            raise UsageError(f"output folder {out} already holds {held} PNG file(s): choose an empty folder, "
                             f"or add --force to add to it.")
    if fmt in ("npz", "both") and os.path.exists(npz_path):
        raise UsageError(f"{npz_path} already exists: choose another folder, or add --force to replace it.")
