"""Data: label codec, CAPTCHA generation, labelled-folder loading, MNIST."""

from .labels import DIGITS_UPPER, Charset

__all__ = ["Charset", "DIGITS_UPPER"]
