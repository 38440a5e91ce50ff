"""Training: ``Trainer`` / ``fit``, its typed state, and the extras as small callbacks."""
