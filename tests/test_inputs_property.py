"""Property-based checks of image input handling (hypothesis over generated files).

Whatever a camera or a user drops into a folder, `load_image` either returns a finite (3, S, S) RGB
tensor in [0, 1] or raises a DatasetError that names the file. Nothing else escapes.
"""
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from moleflow.data import DatasetError, load_image

SIZE = 32
MODES = ["RGB", "L", "P", "RGBA", "I;16", "LA", "1", "CMYK"]


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    return rgb.convert(mode)


def _encode(im: Image.Image, fmt: str, orientation: int | None) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG" and im.mode not in ("RGB", "L", "CMYK"):
        im = im.convert("RGB")
    kwargs = {}
    if orientation is not None and fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _check(path: Path) -> str:
    """'ok' or 'refused'; fails the test on any other outcome."""
    try:
        x = load_image(path, SIZE)
    except DatasetError as exc:
        assert str(path) in str(exc) or path.name in str(exc), f"error does not name the file: {exc}"
        return "refused"
    assert tuple(x.shape) == (3, SIZE, SIZE)
    assert x.dtype.is_floating_point and bool(x.isfinite().all())
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    return "ok"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(MODES),
    fmt=st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"]),
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    orientation=st.one_of(st.none(), st.integers(1, 8)),
)
def test_valid_images_of_any_mode_size_and_orientation_load(tmp_path, mode, fmt, w, h, seed, orientation):
    im = _image(mode, w, h, seed)
    if fmt == "BMP" and mode in ("I;16", "LA", "CMYK", "RGBA"):
        im = im.convert("RGB")
    if fmt == "TIFF" and mode == "LA":
        im = im.convert("RGBA")
    if fmt == "PNG" and mode == "CMYK":  # PNG has no CMYK; such files come as JPEG or TIFF
        im = im.convert("RGB")
    path = tmp_path / f"img_{mode.replace(';', '')}_{w}x{h}.{fmt.lower()}"
    path.write_bytes(_encode(im, fmt, orientation))
    assert _check(path) == "ok"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["PNG", "JPEG"]),
    cut=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_truncated_files_are_refused_or_loaded_never_crash(tmp_path, fmt, cut, seed):
    data = _encode(_image("RGB", 64, 48, seed), fmt, None)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * cut)])
    outcome = _check(path)
    if fmt == "PNG":
        assert outcome == "refused"  # a PNG cut anywhere before its end is incomplete


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=0, max_size=512), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_non_images_with_image_names_are_refused(tmp_path, junk, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(junk)
    assert _check(path) == "refused"


def test_zero_byte_and_missing(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    assert _check(p) == "refused"
    with pytest.raises(DatasetError, match="nothere.png"):
        load_image(tmp_path / "nothere.png", SIZE)


def test_exif_rotation_is_applied(tmp_path):
    # A 40x20 landscape image stored with orientation 6 (rotate 90° clockwise) is a portrait photo:
    # its left half (white) must end up on top.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255
    p = tmp_path / "rot.jpg"
    p.write_bytes(_encode(Image.fromarray(arr), "JPEG", 6))
    x = load_image(p, SIZE)
    top, bottom = float(x[:, : SIZE // 2 - 2].mean()), float(x[:, SIZE // 2 + 2 :].mean())
    assert top > 0.9 and bottom < 0.1


def test_sixteen_bit_keeps_its_range(tmp_path):
    arr = np.full((8, 8), 65535, np.uint16)
    arr[:4] = 0
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    x = load_image(p, SIZE)
    assert float(x.max()) == pytest.approx(1.0, abs=1e-3) and float(x.min()) == pytest.approx(0.0, abs=1e-3)
