"""Training: ``Trainer`` / ``fit``, its typed state, and the extras as small callbacks."""

from .callbacks import (Callback, Checkpointer, EarlyStopping, HistoryFiles, Limits, NanGuard, ProgressBar,
                        ProgressLog)
from .history import History
from .state import TrainState
from .trainer import Trainer, fit

__all__ = ["Trainer", "fit", "TrainState", "History", "Callback", "Checkpointer", "EarlyStopping", "HistoryFiles",
           "Limits", "NanGuard", "ProgressBar", "ProgressLog"]
