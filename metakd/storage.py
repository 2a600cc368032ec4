"""Artifacts (prepared data, teachers) on a local path or an object store URI.

An artifact is a directory ``<root>/<rel>/`` whose ``_COMPLETE`` marker is written last:
a directory without the marker is an interrupted write and is never read. On a local
filesystem the directory is built beside its final name and renamed into place; on an
object store (s3://, gs://) the files are uploaded first and the marker last.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

MARKER = "_COMPLETE"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Store:
    def __init__(self, root: str):
        self.root = root
        if is_uri(root):
            self.fs, self._base = pafs.FileSystem.from_uri(root)
            self.local_root = None
        else:
            root = root[len("file://"):] if root.startswith("file://") else root
            self.local_root = Path(os.path.expanduser(root)).resolve()
            self.fs, self._base = pafs.LocalFileSystem(), str(self.local_root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def path(self, rel: str) -> str:
        return f"{self._base.rstrip('/')}/{rel}"

    def uri(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_complete(self, rel: str) -> bool:
        return self.exists(f"{rel}/{MARKER}")

    def publish_dir(self, local_dir: str | os.PathLike, rel: str) -> None:
        """Copy ``local_dir`` to ``<root>/<rel>`` and mark it complete; a no-op if already complete.

        Never deletes a complete artifact: when two writers publish the same ``rel``, the first
        complete copy stays and the other is dropped. Raises ``OSError`` when the copy could not be
        put in place (the caller must not mark its key done then).
        """
        if self.is_complete(rel):
            return
        if self.local_root is None:  # each object is one atomic put; the marker goes last
            pafs.copy_files(str(local_dir), self.path(rel), destination_filesystem=self.fs)
            with self.fs.open_output_stream(self.path(f"{rel}/{MARKER}")) as f:
                f.write(b"ok\n")
            return
        final = self.local_root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staging)
        (staging / MARKER).write_text("ok\n")
        try:
            for _ in range(3):  # an incomplete copy (a failed job's result.json) may reappear in between
                _set_aside_incomplete(final)
                try:
                    os.replace(staging, final)  # fails when final is a non-empty directory
                    return
                except OSError as e:
                    if (final / MARKER).exists():  # another writer published a complete copy first: keep it
                        return
                    error = e
            raise OSError(f"could not publish {self.uri(rel)}: {error}") from error
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def fetch_dir(self, rel: str) -> str:
        """A local directory holding the complete artifact (downloaded once for object stores)."""
        if not self.is_complete(rel):
            raise FileNotFoundError(f"{self.uri(rel)}: missing or incomplete (no {MARKER} marker)")
        if self.local_root is not None:
            return str(self.local_root / rel)
        # per user (a shared /tmp path could be pre-created, or filled, by another user)
        cache = Path(os.environ.get("METAKD_CACHE") or Path.home() / ".cache" / "metakd").expanduser() / "store"
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        local = cache / hashlib.sha256(self.uri(rel).encode()).hexdigest()[:16]
        if not (local / MARKER).exists():
            staging = Path(f"{local}.tmp-{uuid.uuid4().hex[:8]}")
            pafs.copy_files(self.path(rel), str(staging), source_filesystem=self.fs)
            if not local.exists():
                os.replace(staging, local)
            else:
                shutil.rmtree(staging, ignore_errors=True)
        return str(local)

    def write_json(self, rel: str, obj) -> None:
        data = json.dumps(obj, indent=1, default=str).encode()
        if self.local_root is not None:
            p = self.local_root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            os.replace(tmp, p)
            return
        with self.fs.open_output_stream(self.path(rel)) as f:  # a single put is atomic on object stores
            f.write(data)

    def read_json(self, rel: str):
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def list_dirs(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)


def _set_aside_incomplete(final: Path) -> None:
    """Remove ``final`` when it is an incomplete copy, never a complete one.

    A check and then ``rmtree`` could remove a complete copy another writer renamed into place
    in between. Instead the directory is first renamed aside (atomic), then looked at: a
    complete copy caught this way is renamed back (unless yet another complete copy took its
    place meanwhile, which then stands for it).
    """
    if not final.exists() or (final / MARKER).exists():
        return
    aside = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(final, aside)
    except FileNotFoundError:  # another writer set it aside first
        return
    if (aside / MARKER).exists():
        try:
            os.replace(aside, final)
            return
        except OSError:
            if not (final / MARKER).exists():
                raise
    shutil.rmtree(aside, ignore_errors=True)
