"""`moleflow serve`: a real uvicorn on 127.0.0.1 spoken to over HTTP, and its page in headless Chromium."""
from __future__ import annotations

import io
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from helpers import serving
from moleflow.cli import main
from moleflow.continual.jobs import run_add_task
from moleflow.service import model_slot

TOKEN = "s3cret-token-for-tests"


def _png(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def _images(root: Path, cls: str, kind: str = "*") -> list[Path]:
    return sorted((root / cls / "test").glob(f"{kind}/*.png"))


@pytest.fixture(scope="module")
def service(trained_model):
    with serving(trained_model, max_upload_bytes=200_000) as url:
        yield url


def test_predict_health_tasks(service, striped_root):
    files = [("files", _png(p)) for p in _images(striped_root, "bottle", "hole")[:1] + _images(striped_root, "grid", "good")[:1]]
    r = httpx.post(f"{service}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["classes"] for x in res] == [["bottle"], ["grid"]]
    assert res[0]["anomalous"] is True and res[0]["score"] > res[0]["threshold"]
    for x in res:
        assert Image.open(io.BytesIO(__import__("base64").b64decode(x["overlay_png"]))).size == (64, 64)
    tasks = httpx.get(f"{service}/tasks").json()
    assert [t["classes"] for t in tasks["tasks"]] == [["bottle"], ["grid"]] and tasks["generation"] == 1
    assert res[0]["threshold"] == tasks["tasks"][0]["threshold"]
    assert httpx.get(f"{service}/health").json() == {"status": "ok", "generation": 1, "tasks": 2, "uploads_in_flight": 0}
    assert "/predict" in httpx.get(f"{service}/openapi.json").json()["paths"]
    assert httpx.get(f"{service}/docs").status_code == 200
    without = httpx.post(f"{service}/predict?maps=false", files=files[:1], timeout=60).json()["results"][0]
    assert "overlay_png" not in without and without["score"] == pytest.approx(res[0]["score"])


@pytest.mark.parametrize("name, body, status, message", [
    ("notes.txt", b"this is not an image", 400, "upload 'notes.txt' is not an image file"),
    ("empty.png", b"", 400, "upload 'empty.png' is empty"),
    ("big.png", b"\x89PNG" + b"0" * 300_000, 413, "larger than the limit"),
])
def test_bad_uploads_are_4xx_with_a_message(service, name, body, status, message):
    r = httpx.post(f"{service}/predict", files=[("files", (name, body, "application/octet-stream"))], timeout=60)
    assert r.status_code == status and message in r.json()["detail"]


def test_truncated_image_and_no_files(service, striped_root):
    data = _images(striped_root, "bottle", "good")[0].read_bytes()
    r = httpx.post(f"{service}/predict", files=[("files", ("cut.png", data[: len(data) // 2], "image/png"))], timeout=60)
    assert r.status_code == 400 and "cut.png" in r.json()["detail"]
    r = httpx.post(f"{service}/predict", data={"x": "1"}, timeout=60)
    assert r.status_code == 400 and "no images" in r.json()["detail"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(service, striped_root):
    paths = _images(striped_root, "bottle") + _images(striped_root, "grid")

    def ask(p: Path) -> tuple[str, list]:
        r = httpx.post(f"{service}/predict?maps=false", files=[("files", _png(p))], timeout=60)
        assert r.status_code == 200, r.text
        return p.parent.parent.parent.name, r.json()["results"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, paths))
    assert all(res[0]["classes"] == [cls] for cls, res in answers)


def test_hot_reload_during_requests_fails_none_and_mixes_none(trained_model, striped_root, tmp_path):
    model = tmp_path / "run" / "model"
    shutil.copytree(trained_model, model)
    pair = [("files", _png(_images(striped_root, "bottle", "good")[0])), ("files", _png(_images(striped_root, "grid", "good")[0]))]
    answers, stop = [], threading.Event()
    with serving(model) as url:
        def client() -> None:
            while not stop.is_set():
                r = httpx.post(f"{url}/predict?maps=false", files=pair, timeout=120)
                answers.append((r.status_code, r.json()))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        run_add_task(model, [["mvtec:screw"]], {"mvtec": str(striped_root)}, tmp_path / "add", progress=False, echo=lambda _: None)
        deadline = time.monotonic() + 60
        while not any(a[1].get("generation") == 2 for a in answers) and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(120)
        screw = httpx.post(f"{url}/predict", files=[("files", _png(_images(striped_root, "screw", "good")[0]))], timeout=60).json()
        tasks = httpx.get(f"{url}/tasks").json()
    assert answers and all(code == 200 for code, _ in answers)
    assert {a["generation"] for _, a in answers} == {1, 2}  # requests answered before and after the switch
    for _, a in answers:  # one model per answer: both images scored by it, both routed to their product
        assert [x["classes"] for x in a["results"]] == [["bottle"], ["grid"]]
    assert tasks["generation"] == 2 and [t["classes"] for t in tasks["tasks"]][-1] == ["screw"]
    assert screw["results"][0]["classes"] == ["screw"] and screw["generation"] == 2


def test_no_page_references_another_host_and_every_asset_is_served(service):
    """/, /docs and /redoc work offline: no absolute URL in them, and each script, style sheet, icon and
    spec they name is served here (Swagger UI and ReDoc come from the package fastapi-offline)."""
    for path in ("/", "/docs", "/redoc"):
        r = httpx.get(service + path)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", r.text, re.I), f"{path} names another host"
        refs = re.findall(r"""(?:src|href|url|spec-url)\s*[=:]\s*["']([^"']+)["']""", r.text)
        assert path == "/" or len(refs) >= 3
        for ref in (r for r in refs if not r.startswith("data:")):  # inline images of the answers
            assert ref.startswith("/") and httpx.get(service + ref).status_code == 200, f"{path}: {ref}"


def _replace_manifest(model: Path, text: bytes) -> None:
    tmp = model / "manifest.json.new"
    tmp.write_bytes(text)
    os.replace(tmp, model / "manifest.json")  # as add-task does: a new file renamed over the old one


def test_a_model_that_does_not_load_is_tried_once_and_health_says_degraded(trained_model, striped_root, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    good = (model / "manifest.json").read_bytes()
    loads = []

    class CountingDetector:  # Detector.load, counted
        @staticmethod
        def load(path):
            loads.append(path)
            return real(path)

    real = model_slot.Detector.load
    monkeypatch.setattr(model_slot, "Detector", CountingDetector)
    one = [("files", _png(_images(striped_root, "bottle", "good")[0]))]
    with serving(model) as url:
        assert len(loads) == 1
        _replace_manifest(model, b"{ this is not a manifest")
        for _ in range(3):  # the last good generation answers; the broken model is tried by the first batch only
            r = httpx.post(f"{url}/predict?maps=false", files=one, timeout=60)
            assert r.status_code == 200 and r.json()["generation"] == 1
        health = httpx.get(f"{url}/health").json()
        assert len(loads) == 2
        assert health["status"] == "degraded" and health["generation"] == 1
        assert "manifest.json" in health["reason"] and "\n" not in health["reason"]
        _replace_manifest(model, good)
        r = httpx.post(f"{url}/predict?maps=false", files=one, timeout=60)
        assert r.json()["generation"] == 2 and len(loads) == 3
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "generation": 2, "tasks": 2, "uploads_in_flight": 0}


def test_health_tries_a_changed_model_without_waiting_for_it(trained_model, tmp_path):
    """With no request scoring, /health itself has the changed manifest tried (on a worker thread) and
    reports the outcome from then on."""
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    with serving(model) as url:
        _replace_manifest(model, b"[]")
        deadline = time.monotonic() + 60
        while (health := httpx.get(f"{url}/health").json())["status"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.1)
    assert health["status"] == "degraded" and health["generation"] == 1 and "manifest" in health["reason"]


@pytest.fixture(scope="module")
def guarded(trained_model):
    with serving(trained_model, token=TOKEN) as url:
        yield url


def test_with_a_token_every_route_but_health_and_the_page_needs_it(guarded, striped_root):
    one = [("files", _png(_images(striped_root, "bottle", "hole")[0]))]
    r = httpx.post(f"{guarded}/predict", files=one, timeout=60)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in r.json()["detail"]
    r = httpx.post(f"{guarded}/predict", files=one, headers={"Authorization": "Bearer not-the-token"}, timeout=60)
    assert r.status_code == 401 and "invalid_token" in r.headers["www-authenticate"] and "refused" in r.json()["detail"]
    r = httpx.post(f"{guarded}/predict", files=one, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["classes"] == ["bottle"]
    for path in ("/tasks", "/docs", "/redoc", "/openapi.json"):
        assert httpx.get(guarded + path).status_code == 401, path
    assert httpx.get(f"{guarded}/tasks", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(f"{guarded}/health").json()["status"] == "ok"
    assert "moleflow inspection" in httpx.get(f"{guarded}/").text  # the static page: it asks for the token itself


# --------------------------------------------------------------------------- the command line


def test_serve_refuses_a_network_host_without_a_token(trained_model, capsys, monkeypatch):
    monkeypatch.delenv("MOLEFLOW_API_TOKEN", raising=False)
    assert main(["serve", str(trained_model), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-auth" in err and "MOLEFLOW_API_TOKEN" in err


def test_serve_says_whether_auth_is_on_and_never_prints_the_token(trained_model, tmp_path, capsys, monkeypatch):
    import uvicorn

    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))  # nothing binds
    monkeypatch.delenv("MOLEFLOW_API_TOKEN", raising=False)
    assert main(["serve", str(trained_model), "--host", "0.0.0.0", "--no-auth"]) == 0
    out = capsys.readouterr()
    assert "warning: auth is off (--no-auth)" in out.err and started[-1].host == "0.0.0.0"
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert main(["serve", str(trained_model), "--host", "0.0.0.0", "--token-file", str(token_file)]) == 0
    out = capsys.readouterr()
    assert "auth: on" in out.out and TOKEN not in out.out + out.err and len(started) == 2
    monkeypatch.setenv("MOLEFLOW_API_TOKEN", TOKEN)
    assert main(["serve", str(trained_model), "--no-auth"]) == 2
    assert "--no-auth contradicts" in capsys.readouterr().err
    assert main(["serve", str(trained_model)]) == 0
    out = capsys.readouterr()
    assert "auth: on (Bearer token from MOLEFLOW_API_TOKEN" in out.out and TOKEN not in out.out + out.err
    assert started[-1].host == "127.0.0.1" and started[-1].http.header_timeout == 10.0


def test_serve_names_a_missing_or_empty_model_folder_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, problem in ((tmp_path / "nonexistent", "does not exist"), (tmp_path / "empty", "manifest.json is missing")):
        assert main(["serve", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and problem in err and "Errno" not in err and "Traceback" not in err


# --------------------------------------------------------------------------- the page in a real browser


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: where CSP refusals show
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=opts, service=Service(driver))


def test_the_page_shows_verdict_score_product_and_overlay(service, striped_root, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(service + "/")
        WebDriverWait(browser, 30).until(lambda b: "bottle" in b.find_element(By.ID, "tasks").text)
        image = _images(striped_root, "bottle", "hole")[0]
        browser.find_element(By.ID, "files").send_keys(str(image))
        card = WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result")))
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "DEFECT"
        assert "product: bottle" in card.find_element(By.CSS_SELECTOR, ".product").text
        assert "threshold" in card.find_element(By.CSS_SELECTOR, ".score").text
        overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return arguments[0].naturalWidth", overlay) == 64)
        assert browser.save_screenshot(str(tmp_path / "page.png"))  # the page renders to an image
    finally:
        browser.quit()


def test_the_page_asks_for_the_token_and_then_scores(guarded, striped_root):
    """Asked for the token, a wrong one is refused and asked again; with the right one the page scores
    an image. Screenshots for a person to look at: /tmp/moleflow-page-token-form.png (the form after the
refusal) and /tmp/moleflow-page-with-token.png (the verdict)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(guarded + "/")
        wait = WebDriverWait(browser, 30)
        field = wait.until(ec.visibility_of_element_located((By.ID, "token")))
        field.send_keys("not-the-token\n")
        wait.until(lambda b: "refused" in b.find_element(By.ID, "login-msg").text)
        assert browser.save_screenshot("/tmp/moleflow-page-token-form.png")
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
        wait.until(lambda b: "bottle" in b.find_element(By.ID, "tasks").text)
        assert not browser.find_element(By.ID, "login").is_displayed()
        browser.find_element(By.ID, "files").send_keys(str(_images(striped_root, "bottle", "hole")[0]))
        card = WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result")))
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text == "DEFECT"
        assert browser.execute_script("return sessionStorage.getItem('moleflow-token')") == TOKEN
        assert browser.save_screenshot("/tmp/moleflow-page-with-token.png")
    finally:
        browser.quit()


@pytest.mark.parametrize("path, rendered", [("/docs", ".swagger-ui .info .title"), ("/redoc", "redoc h1")])
def test_the_docs_render_from_this_host_only(service, path, rendered):
    """The browser's own record of what it fetched: /docs and /redoc render from the service's files,
    and anything their scripts ask of another host is refused by the browser, never fetched."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chrome()
    try:
        browser.get(service + path)
        title = WebDriverWait(browser, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, rendered)))
        assert "moleflow inspection service" in title.text
        fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert any(u.startswith(service + "/") and u.endswith(".js") for u in fetched), fetched
        # ReDoc's bundle asks for its logo from a CDN whatever its options: the service's
        # Content-Security-Policy has the browser refuse it (an entry without a response is all it leaves)
        blocked = [m["message"] for m in browser.get_log("browser") if "violates the following Content Security Policy" in m["message"]]
        for url in (u for u in fetched if not u.startswith(service + "/")):
            assert any(f"'{url}'" in m and "blocked" in m for m in blocked), f"{path} fetched {url}"
    finally:
        browser.quit()
