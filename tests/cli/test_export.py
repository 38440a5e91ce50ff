"""`xpnet export MODEL.npz OUT.onnx`: the file it writes reads like the .npz through `xpnet predict`;
bad input, an unwritable output and a missing extra are one sentence each."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import xpnet
from xpnet import cli
from xpnet.captcha import Recognizer, metadata_for
from xpnet.data import Charset, Preprocess

pytest.importorskip("onnx", reason='needs the onnx extra: pip install "xpnet[onnx]"')

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "fixtures" / "really_simple_4char"


@pytest.fixture(scope="module")
def reader_npz(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    cs, pp = Charset("23456789ABCDEFGHJKLMNPQRSTUVWXYZ", 4), Preprocess(height=24, width=72, channels=1)
    xpnet.seed(4)
    model = xpnet.models.captcha_net_bn(length=4, n_classes=cs.n_classes, input_shape=pp.shape, width=4)
    xpnet.save(model, tmp / "reader.npz", metadata_for(cs, pp, model="captcha_net_bn"))
    return tmp / "reader.npz"


def readings(capsys, model, images):
    assert cli.main(["predict", str(model), *map(str, images), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return [(r["path"], r["text"]) for r in rows], [r["confidence"] for r in rows]


def test_export_then_predict_reads_like_the_npz(tmp_path, reader_npz, capsys):
    out = tmp_path / "reader.onnx"
    assert cli.main(["export", str(reader_npz), str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    assert Recognizer.load(out).metadata["length"] == 4
    images = sorted(REAL.glob("*.png"))[:8]
    want, want_conf = readings(capsys, reader_npz, images)
    got, got_conf = readings(capsys, out, images)
    assert len(want) == 8 and got == want
    assert max(abs(a - b) for a, b in zip(got_conf, want_conf)) <= 1e-4


def one_sentence(capsys, code, argv, *needles):
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xpnet: error: "), err
    for n in needles:
        assert n in err[0], (n, err[0])


def test_bad_input_is_one_sentence(tmp_path, reader_npz, capsys, monkeypatch):
    plain = tmp_path / "plain.npz"
    xpnet.save(xpnet.Sequential([xpnet.Flatten(), xpnet.Dense(4)], input_shape=(1, 2, 2)), plain)
    one_sentence(capsys, 1, ["export", str(plain), str(tmp_path / "p.onnx")], "plain.npz is not a CAPTCHA reader")
    one_sentence(capsys, 1, ["export", str(tmp_path / "none.npz"), str(tmp_path / "p.onnx")], "does not exist")
    one_sentence(capsys, 2, ["export", str(reader_npz), str(tmp_path / "reader.npz")], "must name an .onnx file")
    one_sentence(capsys, 1, ["export", str(reader_npz), str(tmp_path / "no" / "r.onnx")], "does not exist")
    (tmp_path / "r.onnx").write_bytes(b"previous")

    def refuse(folder, name):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("xpnet.storage._create_temp", refuse)
    one_sentence(capsys, 1, ["export", str(reader_npz), str(tmp_path / "r.onnx")], "could not write ONNX model",
                 "permission denied", "the previous r.onnx is intact")
    assert (tmp_path / "r.onnx").read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["plain.npz", "r.onnx"]


def test_without_onnx_export_says_how_to_install_it(tmp_path, reader_npz):
    code = ("import sys; sys.modules['onnx'] = None\n"
            "from xpnet.cli import main\n"
            f"sys.exit(main(['export', {str(reader_npz)!r}, {str(tmp_path / 'r.onnx')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), XPNET_BACKEND="numpy"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == ('xpnet: error: exporting to ONNX needs the onnx package, which is not installed: '
                                'pip install "xpnet[onnx]".')
    assert not (tmp_path / "r.onnx").exists()
