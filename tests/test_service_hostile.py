"""`moleflow serve` against hostile clients, over raw sockets to a real uvicorn on 127.0.0.1.

Each test decides when its fault happens and sets the server's timeouts small for itself; the waits
are generous (30 s and more) for a loaded machine, and no test asserts a tight timing except the two
the service promises: a huge image is refused in under 1 s, and /health answers in under 1 s while
2,000 uploads hang.
"""
from __future__ import annotations

import io
import resource
import selectors
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from helpers import free_port, serving
from moleflow.data.images import ImageTooLargeError, image_from_bytes

BOUNDARY = b"x-boundary"
PART = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="files"; filename="slow.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n")


def _head(length: int | None, path: str = "/predict") -> bytes:
    size = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary="
            + BOUNDARY + b"\r\n" + size + b"\r\n\r\n")


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (or 30 s pass)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for 30 s (it sent {data[:200]!r})") from None
    return data


def _huge_png() -> bytes:
    """12000 x 12000 = 144 megapixels, nearly all one grey: a few hundred KB that decode to 144 MB (and
    432 MB as RGB)."""
    im = Image.new("L", (12000, 12000), 128)
    ImageDraw.Draw(im).rectangle((100, 100, 400, 300), fill=30)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_image_from_bytes_refuses_by_the_header_only_when_asked():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    with pytest.raises(ImageTooLargeError, match=r"upload 'a.png' is 40 x 30 pixels .* limit is 0.0 megapixels"):
        image_from_bytes(buf.getvalue(), 16, "upload 'a.png'", max_pixels=1000)
    assert image_from_bytes(buf.getvalue(), 16).shape == (3, 16, 16)  # other callers: as before


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no VmHWM in /proc (not Linux)")


@contextmanager
def _serve_process(model: Path):
    """`moleflow serve` in its own process, so its memory is its own; ended at the end by its pid."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moleflow.cli", "serve", str(model), "--port", str(port), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "moleflow serve did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def test_a_huge_image_is_refused_from_its_header_fast_and_without_memory(trained_model, striped_root):
    huge = _huge_png()
    assert len(huge) < 1_000_000
    good = next((striped_root / "bottle" / "test" / "good").glob("*.png")).read_bytes()
    with _serve_process(trained_model) as (proc, url):
        warm = httpx.post(f"{url}/predict", files=[("files", ("good.png", good, "image/png"))], timeout=120)
        assert warm.status_code == 200  # the peak memory of scoring one image is in the baseline
        before = _peak_rss_mb(proc.pid)
        t0 = time.monotonic()
        r = httpx.post(f"{url}/predict", files=[("files", ("huge.png", huge, "image/png"))], timeout=60)
        seconds = time.monotonic() - t0
        grown = _peak_rss_mb(proc.pid) - before
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "upload 'huge.png' is 12000 x 12000 pixels" in detail and "--max-pixels" in detail
    assert seconds < 1.0, f"took {seconds:.2f} s"
    assert grown < 100, f"the server's peak memory grew by {grown:.0f} MB"


@pytest.fixture(scope="module")
def strict(trained_model):
    """One service with small timeouts and a 64 KB request limit for the tests below."""
    with serving(trained_model, header_timeout_s=1.0, body_timeout_s=1.0, max_request_bytes=65536) as url:
        yield url


def test_trickled_headers_are_cut_at_the_header_timeout(strict):
    sock = _connect(strict)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    answer, cut, deadline = b"", False, time.monotonic() + 30
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        while not cut and time.monotonic() < deadline:
            if sel.select(timeout=0.1):  # the server spoke or closed: read what it said
                answer, cut = _read_all(sock), True
                break
            try:
                sock.send(b"a")  # one more header byte every 0.1 s: it would go on for ever
            except (BrokenPipeError, ConnectionResetError):
                cut = True
    sock.close()
    assert cut, "a client trickling its headers was still connected after 30 s"
    assert answer == b"" or (answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer), answer


def test_a_silent_connection_is_closed_at_the_header_timeout(strict):
    with _connect(strict) as sock:
        assert _read_all(sock) == b""  # closed without a word (it never asked anything)


def test_a_body_shorter_than_its_content_length_gets_408_at_the_body_timeout(strict):
    with _connect(strict) as sock:
        sock.sendall(_head(60000) + PART + b"only part of the promised 60000 bytes")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer
    deadline = time.monotonic() + 30  # the upload's slot is free again once the app has seen the disconnect
    while httpx.get(f"{strict}/health").json()["uploads_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{strict}/health").json()["uploads_in_flight"] == 0


def test_a_content_length_over_the_limit_gets_413_before_the_body_is_sent(strict):
    with _connect(strict) as sock:
        sock.sendall(_head(10**9))  # headers only: the body is never sent
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-mb" in answer and b"65536 bytes" in answer, answer


def test_a_chunked_body_is_cut_at_the_limit(strict):
    data = PART + b"\0" * 70000
    with _connect(strict) as sock:
        sock.sendall(_head(None) + b"%x\r\n" % len(data) + data + b"\r\n")  # over the limit, not ended: the 413 ends it
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-mb" in answer, answer


def _enough_descriptors(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _hold_uploads(url: str, count: int) -> list[socket.socket]:
    """`count` uploads that sent their headers and the start of a 100 KB body, and then nothing."""
    socks = []
    for _ in range(count):
        sock = _connect(url)
        sock.sendall(_head(100_000) + PART)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _refusals(socks: list[socket.socket], expected: int, url: str, held: int) -> int:
    """Reads the 503s as they come until `expected` uploads were refused and /health counts `held` in
    flight (within 120 s); -> the number of 503s."""
    refused, deadline = 0, time.monotonic() + 120
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                try:
                    answer = key.fileobj.recv(65536)
                except OSError:  # reset: not an answer
                    answer = b""
                refused += answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
                sel.unregister(key.fileobj)
            if refused >= expected and httpx.get(f"{url}/health", timeout=30).json()["uploads_in_flight"] == held:
                break
    return refused


@pytest.mark.parametrize("cap", [32, 2500])
def test_2000_unfinished_uploads_do_not_stop_health(trained_model, striped_root, cap):
    """cap 32: 32 uploads hang in the server, 1,968 get 503 at once; cap 2500: all 2,000 hang in it.
    Either way /health answers within 1 s, and the slots are free again once the clients go."""
    count, held = 2000, min(cap, 2000)
    _enough_descriptors(2 * count + 512)  # both ends of every connection live in this process
    one = [("files", ("good.png", next((striped_root / "bottle" / "test" / "good").glob("*.png")).read_bytes(), "image/png"))]
    with serving(trained_model, max_uploads_in_flight=cap, body_timeout_s=600, header_timeout_s=600) as url:
        socks = _hold_uploads(url, count)
        try:
            assert _refusals(socks, count - held, url, held) == count - held
            t0 = time.monotonic()
            health = httpx.get(f"{url}/health", timeout=30)
            seconds = time.monotonic() - t0
            assert health.status_code == 200 and health.json()["uploads_in_flight"] == held
            assert seconds < 1.0, f"/health took {seconds:.2f} s"
            if cap == held:
                busy = httpx.post(f"{url}/predict", files=one, timeout=30)
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "--max-uploads-in-flight" in busy.json()["detail"]
        finally:
            for s in socks:
                s.close()
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=30).json()["uploads_in_flight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=30).json()["uploads_in_flight"] == 0
        assert httpx.post(f"{url}/predict?maps=false", files=one, timeout=60).status_code == 200
