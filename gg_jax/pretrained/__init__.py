"""The authors' released checkpoints by name: downloaded, verified, converted and cached on request.

    model, variables, meta = gg_jax.pretrained.load("resnet50_3g_imagenet")
    logits = model.apply(variables, images_nhwc, train=False)

    config.init_from = "pretrained:resnet50_3g_imagenet"             # fine-tuning
    python evaluate.py --config=configs/imagenet_r50.py --pretrained=resnet50_3g_imagenet
    python -m gg_jax.pretrained list | info NAME | fetch NAME [--from_file PATH]

`names()` lists the entries (`gg_jax.pretrained.registry`: the 3G-Net ResNet-50/101 on
ImageNet and Places365, fast-MPN-COV's iSQRT-COV ResNet-50/101, torchvision's ResNet-50/101),
`entry(name)` tells all about one. `fetch(name)` downloads the file once, checks it, converts it
with `gg_jax.convert` and caches the variables directory, whose path it returns; `load(name)` is
`gg_jax.checkpoints.load` of that directory, as is `checkpoints.load("pretrained:NAME")`. The
second `load` reads the cache only: no network, no PyTorch.

Downloads happen only when asked, into `$GG_JAX_CACHE` (default `~/.cache/gg_jax`):
    downloads/FILE          the verified file (delete it to free space; it is not needed to load)
    downloads/FILE.sha256   its digest, recorded at the first download
    downloads/FILE.part     a transfer under way or interrupted (a rerun resumes it)
    variables/NAME/         the converted variables (meta.json + variables/)
Direct URLs are fetched with urllib (resuming with HTTP Range requests); Google Drive files with
gdown (`pip install gdown`). Baidu Pan needs a browser: download the file by hand and pass it,
`fetch(name, from_file=PATH)` or `--from_file PATH`; it is verified and converted the same way.

Checksums: an entry's `sha256` (the full digest, or the leading hex digits torchvision's file
names carry) must match, or nothing is cached. Where the registry has no full digest, the
first file's is printed and written to `downloads/FILE.sha256`, and any later file must match
it. To pin it for everyone, put the printed digest into the entry's `sha256` in
`gg_jax/pretrained/registry.py`.

Listed but not loadable (`registry.NOT_AVAILABLE`, with the reason): fast-MPN-COV's VGG-D
iSQRT-COV model (its 3-layer ImageNet classifier has no gg_jax counterpart).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile

from gg_jax import checkpoints
from gg_jax.checkpoints.variables import META_FILE
from gg_jax.errors import MissingDependencyError, UserError
from gg_jax.pretrained import download
from gg_jax.pretrained.errors import (
    CacheError,
    ChecksumError,
    DownloadError,
    NotACheckpointError,
    UnknownPretrainedError,
    one_line,
)
from gg_jax.pretrained.registry import ENTRIES, NOT_AVAILABLE, Entry, Published

__all__ = [
    "CacheError",
    "ChecksumError",
    "DownloadError",
    "Entry",
    "NotACheckpointError",
    "Published",
    "UnknownPretrainedError",
    "cache_root",
    "cached",
    "entry",
    "fetch",
    "load",
    "names",
]

CACHE_ENV = "GG_JAX_CACHE"
PREFIX = "pretrained:"


def names() -> list[str]:
    """The loadable entries, in the registry's order."""
    return list(ENTRIES)


def entry(name: str) -> Entry:
    """The registry entry `name`; UnknownPretrainedError naming the entries, or why it is not loadable."""
    if name in ENTRIES:
        return ENTRIES[name]
    if name in NOT_AVAILABLE:
        raise UnknownPretrainedError(f"{name}: {NOT_AVAILABLE[name]}")
    raise UnknownPretrainedError(
        f"no pretrained checkpoint is called {name!r}; the registry has {', '.join(names())} "
        "(python -m gg_jax.pretrained list)."
    )


def cache_root(cache_dir: str | None = None) -> str:
    """The cache's root: `cache_dir`, else $GG_JAX_CACHE, else ~/.cache/gg_jax."""
    return os.path.abspath(
        os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "gg_jax"))
    )


def _paths(e: Entry, root: str) -> tuple[str, str]:
    """(the cached download, the converted variables directory) of entry `e`."""
    return os.path.join(root, "downloads", e.file_name), os.path.join(root, "variables", e.name)


def _manual(e: Entry) -> str:
    """What to do by hand: the sentence every download error ends with."""
    return (
        f"download {e.file_name} by hand from {' or '.join(e.sources())} and pass it: "
        f"python -m gg_jax.pretrained fetch {e.name} --from_file PATH (from_file=PATH in Python)."
    )


def _read_digest(target: str) -> str:
    try:
        with open(target + ".sha256") as f:
            return f.read().split()[0].lower()
    except (OSError, IndexError):
        return ""


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _cached_meta(e: Entry, out: str) -> dict | None:
    """The metadata of the variables directory `out` if it holds entry `e` as the registry has it now."""
    if not checkpoints.is_variables_dir(out):
        return None
    try:
        with open(os.path.join(out, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    options = meta.get("model_options") or {}
    fits = (
        meta.get("pretrained") == e.name
        and meta.get("model") == e.architecture
        and meta.get("num_classes") == e.num_classes
        and str(meta.get("sha256", "")).startswith(e.sha256.lower())
        and all(options.get(k) == v for k, v in e.model_options.items())
    )
    return meta if fits else None


def cached(name: str, cache_dir: str | None = None) -> str | None:
    """The converted variables directory of `name` if the cache holds an up-to-date one, else None."""
    out = _paths(entry(name), cache_root(cache_dir))[1]
    return out if _cached_meta(entry(name), out) else None


@contextlib.contextmanager
def _locked(root: str, name: str):
    """One fetch of `name` at a time per cache (processes sharing it wait for each other)."""
    import fcntl

    path = os.path.join(root, "locks", f"{name}.lock")
    with download.writing(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a")
    with handle:
        with contextlib.suppress(OSError):  # A file system without locks (some NFS): go on unlocked.
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _verify(e: Entry, digest: str, target: str, what: str) -> None:
    """ChecksumError unless `digest` fits the registry's sha256 and the one recorded at the first download."""
    if e.sha256 and not digest.startswith(e.sha256.lower()):
        pinned = e.sha256 if len(e.sha256) == 64 else f"{e.sha256}... (the digits in its file name)"
        raise ChecksumError(
            f"{what} has sha256 {digest}, but {e.name}'s file has {pinned}: it is damaged or not the authors' "
            f"file; nothing was cached. Download it again, or {_manual(e)}"
        )
    stored = _read_digest(target)
    if stored and stored != digest:
        raise ChecksumError(
            f"{what} has sha256 {digest}, but the {e.file_name} first downloaded into this cache had {stored} "
            f"(recorded in {target}.sha256): the file is damaged or was replaced; nothing was cached. If you trust "
            f"this file, delete {target}.sha256 and run again."
        )


def _require_torch(e: Entry) -> None:
    if importlib.util.find_spec("torch") is None:
        raise MissingDependencyError(
            f"converting {e.name} needs PyTorch once: pip install torch (the CPU build is enough). The converted "
            "variables are cached, and loading them needs no PyTorch."
        )


def _download(e: Entry, target: str, progress: bool) -> tuple[str, str, str]:
    """(complete unverified file, its sha256, where it came from): the entry's URLs in order, then Google Drive."""
    failures = []
    for url in e.urls:
        part = target + ".part"
        _say(f"Downloading {e.name} from {url}", progress)
        try:
            return part, download.http_download(url, part, hint=_manual(e), progress=progress), url
        except DownloadError as err:
            if os.path.isfile(part) and os.path.getsize(part):  # Interrupted: rerun resumes this source.
                raise
            failures.append(err)
        except NotACheckpointError as err:  # An HTML page: not kept; the next source may serve the file.
            with contextlib.suppress(OSError):
                os.remove(part)
            failures.append(err)
    if e.google_drive_id:
        output = target + ".drive.part"
        _say(f"Downloading {e.name} from Google Drive ({e.google_drive_url})", progress)
        with download.writing(output):
            download.drive_download(e.google_drive_id, output, hint=_manual(e), progress=progress)
        return output, download.sha256_of(output), e.google_drive_url
    if not failures:
        raise DownloadError(f"{e.name} has no source to download from automatically: {_manual(e)}")
    if len(failures) == 1:
        raise failures[0]
    hint = _manual(e)
    messages = [str(f) for f in failures]
    tried = [
        (m[: m.rfind(hint)] if hint in m else m).rstrip(" ,;:.").removesuffix(" or").rstrip(" ,") for m in messages
    ]
    raise DownloadError(f"no source gave {e.file_name} ({'; '.join(tried)}): {hint}")


def _convert(e: Entry, path: str, digest: str, origin: str, root: str) -> str:
    """Convert `path` into a temporary variables directory under `root`; returns it."""
    from gg_jax import convert

    try:
        variables, meta = convert.load_torch_checkpoint(
            path,
            e.architecture,
            e.num_classes,
            convention=e.convention,
            allow_nonfinite=False,
            infer_options=True,
            **e.model_options,
        )
    except MissingDependencyError:
        raise
    except UserError as err:
        # The gist of a mismatch: its summary lines and hints, without the lists of keys.
        gist = "; ".join(line.strip().rstrip(":") for line in str(err).splitlines() if not line.startswith("    "))
        raise NotACheckpointError(
            f"{origin} is not {e.name}'s checkpoint ({e.architecture}, {e.num_classes} classes): "
            f"{one_line(gist, 500)} Nothing was cached; {_manual(e)}"
        ) from None
    meta.update(
        pretrained=e.name,
        sha256=digest,
        source=origin,
        published=dataclasses.asdict(e.published),
        init_from_backbone_only=e.init_from_backbone_only,
    )
    parent = os.path.join(root, "variables")
    with download.writing(parent):
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{e.name}.", suffix=".tmp", dir=parent)
        try:
            checkpoints.save_variables(tmp, variables, meta, overwrite=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return tmp


def fetch(name: str, *, from_file: str | None = None, cache_dir: str | None = None, progress: bool = True) -> str:
    """The converted variables directory of entry `name`, downloading and converting it if needed.

    from_file: a file downloaded by hand (Baidu Pan, an offline machine): verified, converted and
      cached as a download would be; the file itself is copied into the cache.
    cache_dir: the cache's root (default $GG_JAX_CACHE, else ~/.cache/gg_jax).
    progress: print what happens and a progress bar on stderr.

    Raises (each a `gg_jax.errors.UserError` with one line saying what to do):
      UnknownPretrainedError, DownloadError (no network, HTTP error, interrupted: rerun resumes),
      NotACheckpointError (an HTML page, another model's file), ChecksumError, CacheError (not
      writable, disk full), MissingDependencyError (gdown for Google Drive, torch to convert).
      After any of them the cache holds no file that looks complete.
    """
    e = entry(name)
    root = cache_root(cache_dir)
    target, out = _paths(e, root)
    with download.writing(root):
        os.makedirs(os.path.dirname(target), exist_ok=True)
    with _locked(root, e.name):
        if from_file is None and cached(e.name, root):
            return out
        if from_file is not None:
            from_file = os.path.abspath(os.path.expanduser(os.fspath(from_file)))
            if not os.path.isfile(from_file):
                raise checkpoints.CheckpointNotFoundError(f"--from_file {from_file} is not a file.")
            path, digest, origin, owned = from_file, "", from_file, False
        elif os.path.isfile(target):
            path, digest, origin, owned = target, "", target, True
        else:
            _require_torch(e)
            path, digest, origin = _download(e, target, progress)
            owned = True
        try:
            download.check_file(path, origin, _manual(e))
            digest = digest or download.sha256_of(path)
            _verify(e, digest, target, origin)
            if (_cached_meta(e, out) or {}).get("sha256") == digest:
                return out  # A file given by hand that the cache already holds: nothing to convert.
            _require_torch(e)
            _say(f"Converting {origin} ({e.architecture}, {e.num_classes} classes)", progress)
            tmp = _convert(e, path, digest, origin, root)
        except (NotACheckpointError, ChecksumError):
            if owned:  # A wrong or damaged download: gone, so that a rerun fetches it again.
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise
        try:
            with download.writing(target):
                if path != target:
                    if owned:
                        os.replace(path, target)
                    else:
                        shutil.copyfile(path, target + ".part")
                        os.replace(target + ".part", target)
                if not _read_digest(target):
                    with open(target + ".sha256.part", "w") as f:
                        f.write(f"{digest}  {e.file_name}\n")
                    os.replace(target + ".sha256.part", target + ".sha256")
                    if len(e.sha256) < 64:
                        print(
                            f"sha256 of {e.file_name}: {digest} (the registry has no full digest for {e.name}: "
                            f"recorded in {target}.sha256, and later files must match it; pin it for everyone with "
                            "sha256= in its entry, gg_jax/pretrained/registry.py)",
                            file=sys.stderr,
                            flush=True,
                        )
                if os.path.isdir(out):
                    shutil.rmtree(out)
                os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _say(f"Cached {e.name} in {out}", progress)
    return out


def load(
    name: str,
    *,
    from_file: str | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
    platform: str | None = None,
    **options,
):
    """`(model, variables, meta)` of entry `name`: `gg_jax.checkpoints.load(fetch(name, ...), **options)`.

    meta holds the checkpoint's metadata and the entry's: "pretrained" (the name), "sha256",
    "source" (where the file came from) and "published" (the accuracy it should reproduce).
    """
    path = fetch(name, from_file=from_file, cache_dir=cache_dir, progress=progress)
    return checkpoints.load(path, platform=platform, **options)
