"""ProgressOneCycle: the CAPTCHA job's learning rate over the fraction of the run done."""

import numpy as np
import pytest

from xpnet.captcha.schedule import ProgressOneCycle
from xpnet.errors import UsageError


def test_progress_one_cycle_follows_the_fraction_done():
    done = {"f": 0.0}
    sched = ProgressOneCycle(1e-2, pct_start=0.25, div_factor=10, final_div_factor=100,
                             progress=lambda: done["f"])
    values = []
    for f in np.linspace(0, 1, 41):
        done["f"] = f
        values.append(sched(0))
    assert values[0] == pytest.approx(1e-3) and values[10] == pytest.approx(1e-2)
    assert values[-1] == pytest.approx(1e-5)
    assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) < 0)
    assert sched.to_dict() == {"type": "ProgressOneCycle", "max_lr": 1e-2, "pct_start": 0.25,
                               "div_factor": 10.0, "final_div_factor": 100.0, "warmup_steps": 0}


@pytest.mark.parametrize("total_steps", [100, 1000, 10_000])
def test_progress_one_cycle_warms_up_for_at_least_warmup_steps(total_steps):
    """Runs of any length: the peak comes after max(3% of the run, 300 steps) -- but never after half
    the run -- the rate is continuous, and it still ends annealed."""
    state = {"f": 0.0}
    sched = ProgressOneCycle(3e-3, pct_start=0.03, div_factor=25, final_div_factor=1e4,
                             progress=lambda: state["f"], warmup_steps=300)
    rates = []
    for step in range(total_steps + 1):
        state["f"] = step / total_steps
        rates.append(sched(step))
    rates = np.array(rates)
    peak_at = int(np.argmax(rates))
    want = min(max(0.03 * total_steps, 300), 0.5 * total_steps)
    assert abs(peak_at - want) <= 1 + 0.01 * total_steps, (peak_at, want)
    assert rates.max() == pytest.approx(3e-3, rel=1e-3) and rates[0] == pytest.approx(3e-3 / 25)
    assert np.all(np.diff(rates[:peak_at]) >= 0) and np.all(np.diff(rates[peak_at:]) <= 0)
    assert np.max(np.abs(np.diff(rates))) < 3e-3 * 10 / min(total_steps, 300)   # no jump anywhere
    assert rates[-1] == pytest.approx(3e-3 / 25 / 1e4)


@pytest.mark.parametrize("kwargs, name", [
    ({"max_lr": 0}, "max_lr"), ({"max_lr": float("nan")}, "max_lr"), ({"pct_start": 1.0}, "pct_start"),
    ({"div_factor": -1}, "div_factor"), ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": 2.5}, "warmup_steps"),
])
def test_bad_schedule_arguments_are_usage_errors_naming_the_argument(kwargs, name):
    args = {"max_lr": 1e-3, **kwargs}
    with pytest.raises(UsageError, match=name):
        ProgressOneCycle(**args)
