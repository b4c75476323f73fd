"""Digests that bind what we read back to what we wrote: files by their sha256, JSON documents (a model's
manifest.json, an export's export.json) by a digest of their own content.

A sealed document carries `"digest"`: the sha256 of its canonical JSON without that key (sorted keys, no
whitespace, no NaN). A hand edit or a flipped byte changes the content and no longer matches; since the
document lists each file's sha256 under the role the file plays (task index, backbone), a swapped, stale
or foreign file is refused too. This guards against accidents and careless edits, not against someone
who recomputes the digest on purpose.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

DIGEST_KEY = "digest"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def document_digest(doc: dict) -> str:
    """The sha256 of `doc`'s canonical JSON, its own digest left out (ValueError on NaN or inf)."""
    body = {k: v for k, v in doc.items() if k != DIGEST_KEY}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))


def sealed_json(doc: dict) -> str:
    """`doc` with its digest, as the indented JSON text we write (strict JSON: no NaN)."""
    return json.dumps({**doc, DIGEST_KEY: document_digest(doc)}, indent=2, allow_nan=False)


def read_document(path: Path, fmt: str, version: int, what: str) -> tuple[dict | None, str | None]:
    """(the parsed JSON document at `path`, None), or (None, why it is not a `fmt` document of `version`:
    missing, corrupt, not a `what`, another version). Its digest is checked apart (`seal_problem`)."""
    if not path.is_file():
        return None, "is missing"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"is corrupt ({exc})"
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        return None, f"is not a {what}"
    if doc.get("version") != version:
        return None, f"has format version {doc.get('version')}; this moleflow reads {version}"
    return doc, None


def seal_problem(doc: dict) -> str | None:
    """Why `doc` does not match its digest ("no digest" when it has none), or None when it does."""
    stored = doc.get(DIGEST_KEY)
    if stored is None:
        return "no digest"
    try:
        actual = document_digest(doc)
    except ValueError:  # NaN or inf somewhere: not what we write
        return "content that is not strict JSON (NaN or inf)"
    return None if stored == actual else "content that does not match its digest"


def plain_name(name: object) -> bool:
    """A file name inside its folder: no path separators, no '..', no hidden or absolute names."""
    return isinstance(name, str) and _PLAIN_NAME.fullmatch(name) is not None and ".." not in name


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def file_digest_problem(path: Path, expected: str) -> str | None:
    """Why the file at `path` is not the one whose sha256 is `expected` (missing, altered), or None."""
    if not path.is_file():
        return "is missing"
    digest = sha256_bytes(path.read_bytes())
    if digest != expected:
        return f"is damaged, altered or another file: its sha256 {digest[:12]}… is not the recorded {expected[:12]}…"
    return None
