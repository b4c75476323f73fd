"""Model directory: atomic writes, checksums, task files never rewritten."""
import json

import pytest
import torch

from moleflow.atomic import atomic_write_bytes
from moleflow.model.checkpoint import CheckpointError, TaskRecord, read_checked, read_manifest, write_model


def _write(d, tasks, new):
    return write_model(
        d, config={"a": 1}, backbone={"name": "x"}, channels=4, grid=(2, 2),
        shared={"w": torch.arange(4.0)},
        tasks=[TaskRecord(t, [f"c{t}"], 0.5, [f"c{t}"]) for t in tasks],
        task_tensors={t: {"lora": torch.full((3,), float(t))} for t in new},
    )


def test_atomic_write_leaves_no_temp(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"abc")
    assert (tmp_path / "f.bin").read_bytes() == b"abc"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_adding_a_task_keeps_old_files_byte_identical(tmp_path):
    _write(tmp_path, [0], [0])
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("*.safetensors")}
    m = _write(tmp_path, [0, 1], [1])
    assert [t["file"] for t in m["tasks"]] == ["task_000.safetensors", "task_001.safetensors"]
    for name, (data, mtime) in before.items():
        assert (tmp_path / name).read_bytes() == data
        assert (tmp_path / name).stat().st_mtime_ns == mtime  # not even rewritten
    for entry in m["tasks"]:
        assert torch.equal(read_checked(tmp_path, entry)["lora"], torch.full((3,), float(entry["index"])))


def test_altered_or_truncated_file_is_refused(tmp_path):
    m = _write(tmp_path, [0], [0])
    p = tmp_path / m["tasks"][0]["file"]
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or was altered"):
        read_checked(tmp_path, m["tasks"][0])
    p.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="task_000"):
        read_checked(tmp_path, m["tasks"][0])


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a model directory"):
        read_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="not a model directory"):
        read_manifest(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a moleflow manifest"):
        read_manifest(tmp_path)
