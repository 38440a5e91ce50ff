"""Fixtures shared by the CAPTCHA job tests."""

import pytest

from xpnet.captcha import job


@pytest.fixture
def trainer_budgets(monkeypatch):
    """The time budget of every trainer the job makes, in order (the trainers themselves are real)."""
    budgets = []
    real_trainer = job.Trainer

    def spy_trainer(*args, **kwargs):
        budgets.append(kwargs["time_budget"])
        return real_trainer(*args, **kwargs)

    monkeypatch.setattr(job, "Trainer", spy_trainer)
    return budgets
