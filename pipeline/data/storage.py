"""Where datasets live: local folders, fsspec URLs (s3://, gs://, memory://, ...) and `pipe:` commands.

fsspec (a Lightning dependency) does the I/O for folders and URLs alike; object-store protocols need their
package (s3fs, gcsfs) installed. A `pipe:` location is a shell command with `{name}` where the file name goes,
e.g. `pipe:aws s3 cp s3://bucket/ds/{name} -`: its standard output is the file (webdataset streams shards
the same way).
"""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import fsspec

PIPE = "pipe:"


def is_url(location: str | Path) -> bool:
    """True for fsspec URLs such as s3://bucket/ds or memory://ds (file:// counts as local)."""
    return "://" in str(location) and not str(location).startswith("file://")


def is_pipe(location: str | Path) -> bool:
    return str(location).startswith(PIPE)


def local_path(location: str | Path) -> Path | None:
    """The local folder of a location, or None for URLs and pipes."""
    text = str(location)
    if is_pipe(text) or is_url(text):
        return None
    return Path(text.removeprefix("file://"))


def join(location: str | Path, name: str) -> str:
    """The location of file `name` inside dataset `location` (a URL, folder or pipe template)."""
    text = str(location)
    if is_pipe(text):
        if "{name}" not in text:
            raise ValueError(f"a pipe: location needs {{name}} where the file name goes, got {text!r}")
        return text.replace("{name}", shlex.quote(name))
    if is_url(text):
        return text.rstrip("/") + "/" + name
    return str(Path(text.removeprefix("file://")) / name)


def read_bytes(location: str | Path, name: str, *, timeout: float = 600.0) -> bytes:
    """The whole of file `name` in `location`; FileNotFoundError if it is not there."""
    url = join(location, name)
    if is_pipe(url):
        proc = subprocess.run(url[len(PIPE):], shell=True, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise FileNotFoundError(f"{url!r} exited with {proc.returncode}: {proc.stderr.decode()[-500:].strip()}")
        return proc.stdout
    with fsspec.open(url, "rb") as f:
        return f.read()


def exists(location: str | Path, name: str) -> bool:
    url = join(location, name)
    if is_pipe(url):
        try:
            read_bytes(location, name)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return False
        return True
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isfile(path)


def open_stream(url: str):
    """A binary file object for one shard URL (folder path, fsspec URL); for webdataset's url_opener."""
    return fsspec.open(url, "rb").open()


def open_file(location: str | Path, name: str):
    """A binary stream of file `name` in `location`; a pipe's output is read whole. FileNotFoundError if absent."""
    if is_pipe(location):
        return io.BytesIO(read_bytes(location, name))
    return open_stream(join(location, name))


# --- writing: gan-shards publishes datasets with these ---------------------------------------------------------

class DatasetError(ValueError):
    """A problem with the input images, a dataset or its location that the user can fix."""


def list_names(location: str | Path) -> list[str]:
    """Names of the files directly inside folder or URL `location`; [] if it does not exist."""
    text = str(location)
    fs, path = fsspec.core.url_to_fs(text if is_url(text) else str(local_path(text)))
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "file")


def put_file(local_file: str | Path, location: str | Path, name: str) -> None:
    """Upload `local_file` as file `name` inside URL (or folder) `location`."""
    fs, path = fsspec.core.url_to_fs(join(location, name))
    fs.put_file(str(local_file), path)


def remove(location: str | Path, name: str) -> None:
    """Delete file `name` inside `location` if it is there."""
    fs, path = fsspec.core.url_to_fs(join(location, name))
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


class Publisher:
    """Publishes a dataset written file by file so that a reader never finds a manifest without its files.

    A local OUT_DIR is staged beside itself and renamed into place at the end (readers see the old dataset or
    the new one). A URL gets each finished file uploaded from a local temporary folder, so only one file at a
    time needs local disk, and the manifest last. Only a dataset with `manifest`, or leftovers of an interrupted
    upload (files all matching `ours`), is replaced, and only with overwrite.
    """

    def __init__(self, location: str | Path, *, manifest: str, ours: re.Pattern, overwrite: bool) -> None:
        text = str(location)
        if is_pipe(text):
            raise DatasetError("OUT_DIR cannot be a pipe: command; give a folder or a URL such as s3://bucket/ds")
        self.manifest, self.url = manifest, text.rstrip("/") if is_url(text) else None
        self.out = None if self.url else local_path(text)
        self.stage: Path | None = None
        self.uploaded: list[str] = []
        self.old = self._check_url(ours, overwrite) if self.url else self._check_folder(overwrite)

    def _check_url(self, ours: re.Pattern, overwrite: bool) -> list[str]:
        """The names of the dataset this one replaces; refuse what we must not replace."""
        try:
            names = list_names(self.url)
        except (ImportError, ValueError, OSError) as exn:  # e.g. s3:// without s3fs installed
            raise DatasetError(f"cannot list OUT_DIR {self.url} ({exn})") from None
        if self.manifest in names or (names and all(ours.fullmatch(n) for n in names)):
            if not overwrite:
                what = "a dataset" if self.manifest in names else f"shards but no {self.manifest} (interrupted?)"
                raise DatasetError(f"OUT_DIR {self.url} already holds {what}; pass --overwrite to replace it")
            return names
        if names:  # never delete files we did not write, whatever the flag says
            raise DatasetError(f"refusing to write into {self.url}: it holds files gan-shards did not write, "
                               f"such as {names[0]}; choose another OUT_DIR")
        return []

    def _check_folder(self, overwrite: bool) -> list[str]:
        out = self.out
        if out.exists() and not out.is_dir():
            raise DatasetError(f"OUT_DIR {out} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()):
            if not overwrite:
                raise DatasetError(f"OUT_DIR {out} is not empty; pass --overwrite to replace it")
            if not (out / self.manifest).exists():  # never rmtree a folder we did not write, whatever the flag says
                raise DatasetError(f"refusing to replace {out}: it is not empty and has no {self.manifest} "
                                   "from gan-shards")
        return []

    def begin(self) -> Path:
        """The local folder to write the files into."""
        if self.url:
            self.stage = Path(tempfile.mkdtemp(prefix="gan-shards-"))
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.stage = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
            self.stage.mkdir()  # not mkdtemp: its 0o700 would become the dataset's permissions
        return self.stage

    def file_done(self, path: Path) -> None:
        """Called with each finished file in the stage folder: uploads it to a URL."""
        if not self.url:
            return
        if self.manifest in self.old:  # replacing files under a live manifest would make it lie: retire it first
            remove(self.url, self.manifest)
            self.old.remove(self.manifest)
        put_file(path, self.url, path.name)
        self.uploaded.append(path.name)
        path.unlink()

    def commit(self, manifest_text: str) -> None:
        """Write the manifest last and make the dataset visible."""
        (self.stage / self.manifest).write_text(manifest_text)
        if not self.url:
            _rename_into_place(self.stage, self.out)
            return
        put_file(self.stage / self.manifest, self.url, self.manifest)
        for name in set(self.old) - set(self.uploaded) - {self.manifest}:  # files of a larger old dataset
            remove(self.url, name)
        shutil.rmtree(self.stage, ignore_errors=True)

    def abort(self) -> None:
        """Remove what this run wrote (best effort at a URL; what is left there has no manifest)."""
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        for name in self.uploaded:
            try:
                remove(self.url, name)
            except OSError:
                pass


def _rename_into_place(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; a reader sees the old dataset or the new one, never half of one."""
    if out.is_dir() and any(out.iterdir()):
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, trash / out.name)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)  # POSIX rename replaces an empty folder
