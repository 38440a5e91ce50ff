"""The page at ``/`` in a real headless browser (Chromium): an image chosen in its file input, dropped on it,
or given in its address is posted to the served reader and the reading appears, or the service's error
sentence.  Driven by ``--dump-dom`` and by the DevTools protocol (``_cdp.py``, stdlib only).  Skips, with the
reason, where no Chromium is installed (``apt-get install chromium``)."""

import base64
import html
import re
import shutil
import subprocess

import pytest

import xpnet
from xpnet.captcha import Recognizer, metadata_for
from xpnet.data import Charset, Preprocess, render_captcha

pytest.importorskip("starlette", reason='needs the serve extra: pip install "xpnet[serve]"')
pytest.importorskip("uvicorn", reason='needs the serve extra: pip install "xpnet[serve]"')

from ._cdp import Browser  # noqa: E402
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model file, [PNG files], [their readings]) of a tiny reader and two 160x60 CAPTCHAs."""
    tmp = tmp_path_factory.mktemp("browser")
    path = tmp / "reader.npz"
    xpnet.seed(9)
    model = xpnet.models.simple_convnet(input_shape=PP.shape, n_classes=CS.n_outputs, filters=4, hidden=16)
    xpnet.save(model, path, metadata_for(CS, PP))
    files = []
    for i in range(2):
        _, image = render_captcha(3, i, CS)
        image.save(tmp / f"captcha{i}.png", format="PNG")
        files.append(tmp / f"captcha{i}.png")
    return path, files, Recognizer.load(path).predict_files(files)


def test_the_page_shows_the_reading_of_an_image(tmp_path, served):
    path, files, want = served
    data_url = "data:image/png;base64," + base64.b64encode(files[0].read_bytes()).decode()
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


def test_a_chosen_or_dropped_file_is_read(tmp_path, served):
    path, files, want = served
    reading = "document.getElementById('reading').dataset.text"
    with ServeProcess(path) as server, Browser(BROWSER, tmp_path / "profile") as browser:
        page = browser.open(server.url)
        try:
            assert page.wait_for("document.getElementById('model')?.options.length") == 1
            root = page.call("DOM.getDocument")["root"]["nodeId"]
            node = page.call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            page.call("DOM.setFileInputFiles", files=[str(files[0])], nodeId=node)   # as if chosen in the dialog
            assert page.wait_for(reading) == want.texts[0]
            x, y = page.evaluate("(() => { const r = document.getElementById('drop').getBoundingClientRect(); "
                                 "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
            page.evaluate(f"{reading} = ''")
            drag = {"items": [], "files": [str(files[1])], "dragOperationsMask": 1}
            for kind in ("dragEnter", "dragOver", "drop"):                          # a file dropped on the zone
                page.call("Input.dispatchDragEvent", type=kind, x=x, y=y, data=drag)
            assert page.wait_for(reading) == want.texts[1]
            shown = page.evaluate("document.getElementById('confidence').textContent")
            assert shown == f"confidence {want.confidences[1]:.3f} (model reader)"
            chars = page.evaluate("[...document.querySelectorAll('#chars span')].map(s => s.textContent)")
            assert [c.split()[0] for c in chars] == list(want.texts[1])
        finally:
            page.close()
