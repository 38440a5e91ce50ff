"""The CAPTCHA application on top of the library.

``config`` (named configurations, ``Settings``), ``plans`` (where the images come
from), ``job`` (the training job), ``recognizer`` (``Recognizer``: read images
with a trained model), plus ``schedule``, ``network`` and ``run_folder``;
``streaming`` (a folder read batch by batch), ``export`` and ``onnx_reader``
(readers as ONNX files and back), and the HTTP service (``service``, ``batcher``,
``upload``, ``service_page``).
"""

from .recognizer import Evaluation, Prediction, Recognizer, metadata_for

__all__ = ["Recognizer", "Prediction", "Evaluation", "metadata_for"]
