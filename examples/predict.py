"""Read CAPTCHA images with a trained reader: the text and a confidence per image.

    python examples/predict.py runs/captcha-.../model.npz image1.png image2.jpg
    python examples/predict.py runs/captcha-.../model.npz some_folder/        # every image in it

The same as ``xpnet predict`` (``--help`` lists the options): the model is loaded once, on the
current backend (``XPNET_BACKEND=numpy|cupy``); each line is ``path<TAB>text<TAB>confidence``, and
when file names carry labels (``2A2X.png``) the line says whether the reading is right and the
accuracy is printed at the end.  The confidence is the product over the characters of the sigmoid
probability of each chosen character (see ``xpnet.captcha.recognizer``).

In a program::

    from xpnet.captcha import Recognizer
    reader = Recognizer.load("model.npz")
    pred = reader.predict_files(["a.png"])
    print(pred.texts[0], pred.confidences[0])
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from xpnet.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    debug = [a for a in argv if a == "--debug"]
    sys.exit(main(debug + ["predict"] + [a for a in argv if a != "--debug"]))
