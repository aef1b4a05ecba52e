"""Reading ``weights_manifest.json`` without torch, so a user interface can list models before torch is installed.

``checkpoints`` re-exports everything here; loading weights lives there.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and the fix."""


def default_manifest_path() -> str:
    """``$ONEPROMPTSEG_MANIFEST``, else ``weights_manifest.json`` beside the package (repo root or module dir)."""
    env = os.environ.get("ONEPROMPTSEG_MANIFEST")
    if env:
        return env
    for cand in (os.path.join(_PKG_DIR, "..", "weights_manifest.json"),
                 os.path.join(_PKG_DIR, "weights_manifest.json")):
        if os.path.exists(cand):
            return os.path.abspath(cand)
    return os.path.abspath(os.path.join(_PKG_DIR, "..", "weights_manifest.json"))


def _read_manifest(manifest_path: Optional[str]) -> Tuple[Dict[str, Any], str]:
    path = manifest_path or default_manifest_path()
    if not os.path.exists(path):
        return {"models": []}, path
    try:
        with open(path) as f:
            return json.load(f), path
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the weights manifest ({e}); restore it from the release") from e


def list_models(manifest_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """Manifest entries, each with 'default' set and 'path' resolved to where the file is expected."""
    man, path = _read_manifest(manifest_path)
    out = []
    for e in man.get("models", []):
        e = dict(e)
        e["default"] = e.get("name") == man.get("default")
        e["path"] = checkpoint_path(e, path)
        out.append(e)
    return out


def checkpoint_path(entry: Dict[str, Any], manifest_path: Optional[str] = None) -> str:
    """Where the entry's file is expected: relative to the manifest's folder."""
    base = os.path.dirname(os.path.abspath(manifest_path or default_manifest_path()))
    return os.path.normpath(os.path.join(base, entry["file"]))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
