"""The page at ``/`` in a real headless browser (Chromium): it posts an image to the served reader and
shows the reading, or the service's error sentence.  Skips, with the reason, where no Chromium is installed
(``apt-get install chromium``)."""

import base64
import html
import io
import re
import shutil
import subprocess

import pytest

import xpnet
from xpnet.captcha import Recognizer, metadata_for
from xpnet.data import Charset, Preprocess, render_captcha

pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install "xpnet[serve]"')

from ._service_server import ServeProcess  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")

CS = Charset("ABCDEFGH", 3)
PP = Preprocess(height=24, width=64, channels=1)


def page_dom(url: str, profile) -> str:
    """The page's DOM once its scripts (and their requests) are done, from headless Chromium."""
    cmd = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def element(dom: str, element_id: str) -> str:
    m = re.search(rf'<div id="{element_id}"[^>]*>(.*?)</div>', dom, re.S)
    assert m, dom[-3000:]
    return html.unescape(re.sub(r"<[^>]+>", " ", m.group(1))).strip()


def test_the_page_shows_the_reading_of_an_image(tmp_path):
    path = tmp_path / "reader.npz"
    xpnet.seed(9)
    model = xpnet.models.simple_convnet(input_shape=PP.shape, n_classes=CS.n_outputs, filters=4, hidden=16)
    xpnet.save(model, path, metadata_for(CS, PP))
    _, image = render_captcha(3, 0, CS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    (tmp_path / "captcha.png").write_bytes(buf.getvalue())
    want = Recognizer.load(path).predict_files([tmp_path / "captcha.png"])
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    junk_url = "data:image/png;base64," + base64.b64encode(b"these bytes are no image").decode()
    with ServeProcess(path) as server:
        dom = page_dom(server.url + "#image=" + data_url, tmp_path / "profile")
        assert re.search(rf'<div id="reading" data-text="{want.texts[0]}">', dom), dom[-3000:]
        assert element(dom, "reading") == want.texts[0]
        assert element(dom, "confidence") == f"confidence {want.confidences[0]:.3f} (model reader)"
        assert element(dom, "error") == ""
        assert '<option value="reader">' in dom        # the model list came from GET /models
        dom = page_dom(server.url + "#image=" + junk_url, tmp_path / "profile")
        assert element(dom, "reading") == ""
        assert element(dom, "error").startswith("the image is not an image file the service reads")
        assert server.proc.poll() is None
