"""The extras of the training loop, one class each, called by ``Trainer`` at fixed points.

``Trainer``'s keyword arguments build the default ones; ``callbacks=[...]`` adds more.
"""

from .base import Callback
from .checkpoints import Checkpointer
from .early_stopping import EarlyStopping
from .history_files import HistoryFiles
from .limits import Limits
from .nan_guard import NanGuard
from .progress import ProgressBar, ProgressLog
from .stuck import StuckWatch

__all__ = ["Callback", "Checkpointer", "EarlyStopping", "HistoryFiles", "Limits", "NanGuard", "ProgressBar",
           "ProgressLog", "StuckWatch"]
