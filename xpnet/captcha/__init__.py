"""The CAPTCHA application on top of the library.

``config`` (named configurations, ``Settings``), ``plans`` (where the images come
from), ``job`` (the training job), ``recognizer`` (``Recognizer``: read images
with a trained model), plus ``schedule``, ``network`` and ``run_folder``;
``heads`` (how outputs become texts: fixed-length "bce" blocks or "ctc" columns,
with the CTC loss and targets for training), ``streaming`` (a folder read batch by
batch), ``export`` and ``onnx_reader``
(readers as ONNX files and back), and the HTTP service (``service``, ``batcher``,
``upload``, ``service_page``).
"""

from .heads import CTCLoss, ctc_metadata, ctc_targets
from .recognizer import Evaluation, Prediction, Recognizer, metadata_for

__all__ = ["Recognizer", "Prediction", "Evaluation", "metadata_for", "ctc_metadata", "ctc_targets", "CTCLoss"]
