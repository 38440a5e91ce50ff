"""xpnet.config: every XPNET_* variable, one policy for bad values."""

import os
import subprocess
import sys

import pytest

from xpnet import config
from xpnet.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("XPNET_")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=full,
                          timeout=120)


@pytest.mark.parametrize("value, forced", [("0", False), ("off", False), ("1", True), ("", False), ("yes", True)])
def test_the_reference_switch_reads_the_environment(value, forced):
    r = run_py("import xpnet; print(xpnet.config.reference_forced())", XPNET_REFERENCE=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(forced)


@pytest.mark.parametrize("name, value", [("XPNET_REFERENCE", "maybe"), ("XPNET_NUM_THREADS", "0"),
                                         ("XPNET_NUM_THREADS", "two"), ("XPNET_IM2COL_BUDGET_MB", "-1"),
                                         ("XPNET_IM2COL_BUDGET_MB", "nan"), ("XPNET_BACKEND", "gpu"),
                                         ("XPNET_DTYPE", "float16"), ("XPNET_FAST", "0"),
                                         ("XPNET_CUDA_KERNELS", "0"), ("XPNET_SHARDS", "forks")])
def test_a_bad_value_never_breaks_import_and_is_one_sentence_naming_the_variable(name, value):
    code = ("import xpnet\n"
            "try:\n"
            "    xpnet.config.check_environment()\n"
            "except xpnet.errors.UsageError as exc:\n"
            "    print(exc)\n")
    r = run_py(code, **{name: value})
    assert r.returncode == 0, r.stderr  # importing xpnet worked
    message = r.stdout.strip()
    assert message.startswith(name) and message.endswith(".") and "\n" not in message
    cli = run_py("import sys; from xpnet.cli import main; sys.exit(main(['info']))", **{name: value})
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [f"xpnet: error: {message}"]


@pytest.mark.parametrize("value, mode", [("", "processes"), ("threads", "threads"), ("Processes", "processes")])
def test_the_shard_mode_reads_the_environment(value, mode):
    r = run_py("import xpnet; print(xpnet.get_shard_mode())", XPNET_SHARDS=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == mode


def test_each_bad_value_is_raised_when_its_setting_is_read():
    r = run_py("import xpnet\n"
               "print(xpnet.get_im2col_budget_bytes())\n"
               "try:\n"
               "    xpnet.get_num_threads()\n"
               "except ValueError as exc:\n"
               "    print('threads:', exc)\n"
               "xpnet.set_num_threads(3)\n"
               "print(xpnet.get_num_threads())\n",
               XPNET_NUM_THREADS="-2", XPNET_IM2COL_BUDGET_MB="64")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == str(64 * 2**20)
    assert lines[1].startswith("threads: XPNET_NUM_THREADS=-2 is not valid")
    assert lines[2] == "3"


def test_setters_check_their_arguments():
    with pytest.raises(UsageError, match="set_num_threads"):
        config.set_num_threads(0)
    with pytest.raises(UsageError, match="set_im2col_budget"):
        config.set_im2col_budget(float("inf"))
    saved = config.get_num_threads()
    try:
        assert config.set_num_threads(None) >= 1
    finally:
        config.set_num_threads(saved)
