"""`moleflow serve`: a real uvicorn on 127.0.0.1 spoken to over HTTP, and its page in headless Chromium."""
from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from moleflow.continual.jobs import run_add_task
from moleflow.service.app import ServiceConfig, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, **settings):
    """The service on a free loopback port, in a thread; yields its base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServiceConfig(model_dir, **settings)), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


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
    assert httpx.get(f"{service}/health").json() == {"status": "ok", "generation": 1, "tasks": 2}
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


# --------------------------------------------------------------------------- the page in a real browser


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
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
