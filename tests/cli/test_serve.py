"""`xpnet serve`: the missing extra, bad options and models that are not readers are one sentence each
(exit 2 for usage, 1 for a file or the network); nothing is served then."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import xpnet
from xpnet import cli
from xpnet.captcha import metadata_for
from xpnet.data import Charset, Preprocess

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "reader.npz"
    pp = Preprocess(height=16, width=24, channels=1)
    m = xpnet.models.simple_convnet(input_shape=pp.shape, n_classes=8, filters=2, hidden=8)
    xpnet.save(m, path, metadata_for(Charset("ABCD", 2), pp))
    return path


def run(capsys, *argv):
    code = cli.main(["serve", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


def test_without_the_serve_extra_it_says_how_to_install_it(model):
    code = ("import sys; sys.modules['starlette'] = None\n"
            "from xpnet.cli import main\n"
            f"sys.exit(main(['serve', {str(model)!r}, '--port', '0']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ('xpnet: error: xpnet serve needs starlette, which is not installed: '
                                'pip install "xpnet[serve]".')


@pytest.mark.parametrize("argv, code, words", [
    (["--port", "70000"], 2, ["--port", "0 to 65535", "70000"]),
    (["--port", "-1"], 2, ["--port", "-1"]),
    (["--max-bytes", "0"], 2, ["--max-bytes"]),
    (["--max-wait-ms", "-2"], 2, ["--max-wait-ms"]),
    (["--max-connections", "0"], 2, ["--max-connections"]),
    (["--host", "no such host.invalid"], 2, ["--host"]),
])
def test_bad_options_are_one_sentence(capsys, model, argv, code, words):
    pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
    got, err = run(capsys, model, *argv)
    assert got == code, err
    assert err.startswith("xpnet: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, err


def test_no_model_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve"])
    assert exc.value.code == 2
    assert "MODEL" in capsys.readouterr().err


def test_models_that_are_not_readers_exit_1(capsys, tmp_path, model):
    pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
    bare = tmp_path / "bare.npz"
    xpnet.save(xpnet.models.simple_convnet(input_shape=(1, 16, 24), n_classes=8, filters=2, hidden=8), bare)
    code, err = run(capsys, bare, "--port", "0")
    assert code == 1 and "not a CAPTCHA reader" in err and "bare.npz" in err
    code, err = run(capsys, tmp_path / "missing.npz", "--port", "0")
    assert code == 1 and "missing.npz" in err
    (tmp_path / "junk.npz").write_bytes(b"not a model file")
    code, err = run(capsys, tmp_path / "junk.npz", "--port", "0")
    assert code == 1 and "junk.npz" in err and len(err.splitlines()) == 1
    code, err = run(capsys, model, "x=" + str(model), "x=" + str(model))
    assert code == 2 and "two models would be named 'x'" in err


def test_a_port_in_use_is_one_sentence(capsys, model):
    pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, err = run(capsys, model, "--port", port)
    assert code == 1 and f"port {port}" in err and "--port" in err
