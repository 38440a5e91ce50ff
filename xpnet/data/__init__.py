"""Data: label codec, image preprocessing, labelled folders, CAPTCHA generation, augmentation.

    from xpnet.data import load_folder, generate_captchas, CaptchaStream, Preprocess, normalize, Augment, Distort
"""

from .augment import Augment, augment, shift, warp
from .distort import Distort, distort
from .captcha import CaptchaStream, generate_captchas, render_captcha, write_captcha_pngs
from .folder import (
    IMAGE_EXTENSIONS, LabelledImages, fold_indices, label_from_name, load_folder, load_npz, save_npz, split_indices,
    suggest_preprocess,
)
from .images import Preprocess, normalize, open_image, read_image, read_images, to_mode
from .labels import DIGITS_UPPER, Charset

__all__ = [
    "Charset", "DIGITS_UPPER",
    "Preprocess", "normalize", "open_image", "read_image", "read_images", "to_mode",
    "LabelledImages", "load_folder", "label_from_name", "split_indices", "fold_indices", "save_npz", "load_npz",
    "suggest_preprocess", "IMAGE_EXTENSIONS",
    "generate_captchas", "write_captcha_pngs", "render_captcha", "CaptchaStream",
    "Augment", "augment", "shift", "warp", "Distort", "distort",
]
