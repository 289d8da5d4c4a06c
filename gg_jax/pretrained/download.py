"""Downloads into the cache: HTTP(S) with resume and a progress bar, Google Drive through gdown.

`http_download(url, part)` streams into `part` (a `.part` file: never a name that looks
complete), resuming with an HTTP Range request where the server honours it and starting again
where it does not, and returns the sha256 computed while streaming. `drive_download` hands a
Google Drive file to gdown (an optional dependency: Drive's confirmation page for large files
is its business, not ours). `check_head` refuses what is no PyTorch checkpoint (an HTML page,
an error text). Failures are `gg_jax.pretrained.errors` with one line saying what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from gg_jax import __version__
from gg_jax.errors import MissingDependencyError, UserError
from gg_jax.pretrained.errors import CacheError, DownloadError, NotACheckpointError, one_line

CHUNK = 1 << 20
USER_AGENT = f"gg_jax/{__version__} (Python urllib)"
# The first bytes of what torch.save writes: a zip archive (PyTorch >= 1.6), or the legacy
# format's pickle (protocol 2 and later start with the PROTO opcode 0x80).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))


def check_head(head: bytes, what: str, hint: str) -> None:
    """NotACheckpointError unless `head` (a file's first bytes) starts like a PyTorch checkpoint."""
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOLS):
        return
    text = head[:512].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        raise NotACheckpointError(
            f"{what} is an HTML page, not a PyTorch checkpoint (a sign-in, quota, virus-scan or error page); "
            f"nothing was cached; {hint}"
        )
    shown = head[:16].hex(" ") if head else "nothing: it is empty"
    raise NotACheckpointError(
        f"{what} is no PyTorch checkpoint (torch.save writes a zip archive or a pickle; it starts with {shown}); "
        f"nothing was cached; {hint}"
    )


def check_file(path: str, what: str, hint: str) -> None:
    with open(path, "rb") as f:
        check_head(f.read(512), what, hint)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def writing(path: str):
    """OSErrors of writing `path` (disk full, no permission) as one-line `CacheError`s."""
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(
                f"the disk is full while writing {path}: free some space, or set GG_JAX_CACHE to a directory on "
                "another disk (the downloads and converted variables of one checkpoint take 2-3 times its file size)."
            ) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CacheError(
                f"cannot write {path} ({e.strerror}): make that directory writable, or set GG_JAX_CACHE "
                "(cache_dir=) to a writable directory."
            ) from None
        raise CacheError(f"cannot write {path}: {e}. Set GG_JAX_CACHE (cache_dir=) to another directory.") from None


class _TextBar:
    """A progress line on stderr, redrawn at most twice a second."""

    def __init__(self, total: int | None, initial: int, desc: str):
        self.total, self.done, self.desc, self.shown = total, initial, desc, 0.0

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.shown >= 0.5:
            self.shown = time.monotonic()
            self._draw()

    def _draw(self, end: str = "") -> None:
        mib = self.done / 2**20
        of = f" of {self.total / 2**20:.1f} MiB ({100 * self.done / self.total:.0f} %)" if self.total else " MiB"
        print(f"\r{self.desc}: {mib:.1f}{of}", end=end, file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._draw(end="\n")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
    """tqdm where it is installed (it already comes with TFDS and gdown, and draws a proper bar in
    terminals, notebooks and logs alike), else a plain line on stderr: no new dependency for a bar."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(total, initial, desc)
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def http_download(url: str, part: str, *, hint: str, progress: bool = True, timeout: float = 60.0) -> str:
    """Download `url` into `part`, resuming a partial `part`; returns the file's sha256 hexdigest.

    Raises DownloadError (no network, an HTTP error, an interrupted transfer: `part` keeps what
    arrived, so that the next call resumes) and NotACheckpointError (an HTML page).
    """
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # The part is already as long as the file (or longer): start again.
            with writing(part):
                os.remove(part)
            return http_download(url, part, hint=hint, progress=progress, timeout=timeout)
        raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}: {hint}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DownloadError(
            f"cannot download {url} ({reason}): check the network connection (and the proxy, HTTPS_PROXY), or {hint}"
        ) from None
    with response:
        if "text/html" in response.headers.get("Content-Type", ""):
            raise NotACheckpointError(
                f"{url} sent an HTML page instead of the checkpoint (a sign-in, quota or error page); nothing was "
                f"cached; {hint}"
            )
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            resumed = False  # An answer to another range than asked: take the whole file again.
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(CHUNK), b""):
                    digest.update(block)
        interrupted = None
        with writing(part), open(part, "ab" if resumed else "wb") as f:
            with _progress(total, offset, os.path.basename(part).removesuffix(".part"), progress) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except http.client.IncompleteRead as e:
                        chunk, interrupted = e.partial, e
                    except (OSError, http.client.HTTPException) as e:
                        chunk, interrupted = b"", e
                    if not chunk:
                        break
                    if f.tell() == 0:
                        check_head(chunk, url, hint)
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    if interrupted is not None:
                        break
            size = f.tell()
    if interrupted is not None or (total is not None and size != total) or size == 0:
        got = f"{size:,} of {total:,} bytes" if total else f"{size:,} bytes"
        raise DownloadError(
            f"the download of {url} was interrupted after {got}"
            + (f" ({one_line(interrupted, 200)})" if interrupted is not None else "")
            + f"; run again to resume it ({part} keeps what arrived), or {hint}"
        )
    return digest.hexdigest()


def drive_download(file_id: str, output: str, *, hint: str, progress: bool = True) -> None:
    """Download Google Drive file `file_id` into `output` with gdown (which writes its own
    partial files beside `output`, resumes them, and creates `output` only when complete)."""
    try:
        import gdown
    except ImportError:
        raise MissingDependencyError(
            "this checkpoint is on Google Drive, and downloading from Google Drive needs gdown: pip install gdown "
            f"(or pip install 'gg_jax[pretrained]'); or {hint}"
        ) from None
    try:
        got = gdown.download(id=file_id, output=output, quiet=not progress, resume=True)
    except Exception as e:  # gdown's errors differ between its versions (its own, requests', OSError).
        raise DownloadError(
            f"Google Drive did not give file {file_id} ({type(e).__name__}: {one_line(e, 300)}); Drive limits "
            f"downloads of popular files per day: try again later, or {hint}"
        ) from None
    if not got or not os.path.isfile(output):  # Older gdown versions print the error and return None.
        raise DownloadError(
            f"Google Drive did not give file {file_id} (gdown's message is above); try again later, or {hint}"
        )
