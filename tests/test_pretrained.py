"""gg_jax.pretrained: the registry of released checkpoints, and download -> verify -> convert -> cache.

No test touches the network: a `ThreadingHTTPServer` on 127.0.0.1 serves a generated
checkpoint (the reference weight recipe on a T=1, 16-channel ResNet-18 3G-Net, saved like the
released 3G-Net files), and registry entries pointing at it are added for the test's duration.
"""

import contextlib
import dataclasses
import errno
import hashlib
import http.server
import io
import os
import re
import sys
import threading
import types
import urllib.parse

import jax
import numpy as np
import pytest

from gg_jax import checkpoints, convert, errors, models, pretrained
from gg_jax.pretrained import registry
from tests import runs
from tests.reference.reference_weights import make_state_dict

SMALL_3G = {"num_blocks": 1, "reduction_dim": 16}  # The tiny demo model's head (tests/runs.py).
NUM_CLASSES = 10
FILE = "tiny-3G.pth.tar"


# ---------------------------------------------------------------------------- the files served
def _pth_bytes(state_dict, released_style=True) -> bytes:
    torch = pytest.importorskip("torch")
    tensors = {("module." if released_style else "") + k: torch.from_numpy(v) for k, v in state_dict.items()}
    buffer = io.BytesIO()
    torch.save({"epoch": 3, "arch": "resnet18_3g", "state_dict": tensors} if released_style else tensors, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files():
    """name -> bytes: the tiny 3G checkpoint, another one (another seed), one of another class count,
    and a torchvision-style ResNet-18 (a bare state_dict)."""
    layout = convert.torch_layout("resnet18_3g", NUM_CLASSES, **SMALL_3G)
    return {
        "tiny": _pth_bytes(make_state_dict(layout=layout, seed=0)),
        "other": _pth_bytes(make_state_dict(layout=layout, seed=1)),
        "seven": _pth_bytes(make_state_dict(layout=convert.torch_layout("resnet18_3g", 7, **SMALL_3G), seed=0)),
        "torchvision": _pth_bytes(make_state_dict(layout=convert.torch_layout("resnet18_gap", 5), seed=2), False),
    }


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET /NAME serves server.routes[NAME] = (body, content type, mode); mode "range" honours
    `Range: bytes=N-`, "norange" ignores it, "cut" sends the headers and half the body once (then
    serves as "range"). Every request is logged as (path, Range header)."""

    timeout = 20  # A stuck client cannot hold a handler thread for ever.

    def do_GET(self):
        self.server.log.append((self.path, self.headers.get("Range")))
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, content_type, mode = route
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and mode in ("range", "cut_done"):
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416, "Range Not Satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode == "cut":
            self.server.routes[self.path] = (body, content_type, "cut_done")
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        try:
            self.wfile.write(body[start:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # The client stopped reading (e.g. it refused an HTML page): expected here.

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """A local HTTP server (a daemon thread, shut down after the test); `.url(path)`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.log = {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test's own cache ($GG_JAX_CACHE): nothing is written to ~/.cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(root))
    return root


@pytest.fixture
def register(monkeypatch):
    """register(**fields) adds an entry like the released 3G-Net ones (name "tiny", the tiny
    3G-Net file) to the registry for the test's duration."""

    def add(**fields):
        base = dataclasses.replace(
            registry.ENTRIES["resnet50_3g_imagenet"],
            name="tiny",
            architecture="resnet18_3g",
            num_classes=NUM_CLASSES,
            dataset="digits",
            file_name=FILE,
            google_drive_id="",
            baidu_url="",
            published=registry.Published(12.5, 1.25, False, 48, 48, "tests/test_pretrained.py"),
        )
        e = dataclasses.replace(base, **fields)
        monkeypatch.setitem(registry.ENTRIES, e.name, e)
        return e

    return add


def _cache_files(root) -> list[str]:
    """Every file under the cache but the lock files, relative to it."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(f for f in out if not f.startswith("locks"))


def _refused(error_class, match, fn, *args, **kwargs):
    """The one-line error `fn` raises: of `error_class`, a `UserError`, matching `match`."""
    with pytest.raises(error_class, match=match) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert isinstance(e.value, errors.UserError) and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def logits():
    """logits(model, variables) on two 48x48 images, one compile per model configuration."""
    fn = jax.jit(lambda model, v, x: model.apply(v, x, train=False), static_argnums=0)
    x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
    return lambda model, variables: np.asarray(fn(model, variables, x))


# ----------------------------------------------------------------------------------- the tests
def test_download_convert_cache_then_load_from_the_cache_alone(server, register, files, cache, tmp_path, logits):
    server.routes["/tiny"] = (files["tiny"], "application/octet-stream", "range")
    register(urls=(server.url("/tiny"),))
    model, variables, meta = pretrained.load("tiny", progress=False)

    # The same model and logits as converting the file directly.
    path = tmp_path / FILE
    path.write_bytes(files["tiny"])
    direct, direct_meta = convert.load_torch_checkpoint(str(path), "resnet18_3g", infer_options=True)
    direct_model = models.create("resnet18_3g", num_classes=NUM_CLASSES, **direct_meta["model_options"])
    assert model == direct_model
    jax.tree.map(np.testing.assert_array_equal, variables, direct)
    np.testing.assert_array_equal(logits(model, variables), logits(direct_model, direct))

    digest = hashlib.sha256(files["tiny"]).hexdigest()
    assert meta["pretrained"] == "tiny" and meta["sha256"] == digest and meta["source"] == server.url("/tiny")
    assert meta["published"]["top1_error"] == 12.5
    cached = _cache_files(cache)
    assert cached[:2] == [f"downloads/{FILE}", f"downloads/{FILE}.sha256"] and "variables/tiny/meta.json" in cached
    assert all(f.startswith("variables/tiny/") for f in cached[2:])
    assert (cache / "downloads" / f"{FILE}.sha256").read_text().split() == [digest, FILE]

    # The second load reads the cache: no request, no PyTorch; so does checkpoints.load("pretrained:...").
    server.routes.clear()
    requests = len(server.log)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)
        for again_model, again, _ in (
            pretrained.load("tiny", progress=False),
            checkpoints.load("pretrained:tiny", name="resnet18_3g"),
        ):
            assert again_model == model
            jax.tree.map(np.testing.assert_array_equal, again, variables)
    assert len(server.log) == requests


@pytest.mark.parametrize("mode", ["range", "norange"])
def test_an_interrupted_download_leaves_no_complete_file_and_a_rerun_finishes_it(server, register, files, cache, mode):
    body = files["tiny"]
    server.routes["/tiny"] = (body, "application/octet-stream", "cut")
    register(urls=(server.url("/tiny"),))
    message = _refused(pretrained.DownloadError, "interrupted", pretrained.fetch, "tiny", progress=False)
    assert f"{len(body) // 2:,} of {len(body):,} bytes" in message and "run again to resume" in message
    assert _cache_files(cache) == [f"downloads/{FILE}.part"]
    assert (cache / "downloads" / f"{FILE}.part").stat().st_size == len(body) // 2

    if mode == "norange":  # A server without Range support: the rerun starts again.
        server.routes["/tiny"] = (body, "application/octet-stream", "norange")
    out = pretrained.fetch("tiny", progress=False)
    assert server.log[-1] == ("/tiny", f"bytes={len(body) // 2}-")
    assert checkpoints.load_variables(out)[1]["sha256"] == hashlib.sha256(body).hexdigest()
    assert (cache / "downloads" / FILE).read_bytes() == body
    assert not (cache / "downloads" / f"{FILE}.part").exists()


def test_checksum_mismatches_are_refused_and_nothing_is_cached(server, register, files, cache):
    server.routes["/tiny"] = (files["tiny"], "application/octet-stream", "range")
    digest = hashlib.sha256(files["tiny"]).hexdigest()
    # A registry digest (full, or torchvision's leading digits) that the file does not have.
    register(urls=(server.url("/tiny"),), sha256="0" * 64)
    message = _refused(pretrained.ChecksumError, f"has sha256 {digest}", pretrained.fetch, "tiny", progress=False)
    assert "nothing was cached" in message and "0" * 64 in message
    register(urls=(server.url("/tiny"),), sha256="0676ba61")
    _refused(pretrained.ChecksumError, "0676ba61... \\(the digits in its file name\\)", pretrained.fetch, "tiny")
    assert _cache_files(cache) == []

    # No registry digest: the one recorded at the first download must match.
    register(urls=(server.url("/tiny"),))
    recorded = cache / "downloads" / f"{FILE}.sha256"
    recorded.write_text(f"{hashlib.sha256(files['other']).hexdigest()}  {FILE}\n")
    message = _refused(pretrained.ChecksumError, "first downloaded into this cache", pretrained.fetch, "tiny")
    assert f"delete {recorded}" in message
    assert _cache_files(cache) == [f"downloads/{FILE}.sha256"]


def test_html_pages_and_other_files_are_refused(server, register, files, cache, tmp_path):
    page = b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>"
    server.routes["/page"] = (page, "text/html; charset=utf-8", "range")
    server.routes["/octets"] = (page, "application/octet-stream", "range")  # The same page, mislabelled.
    server.routes["/seven"] = (files["seven"], "application/octet-stream", "range")
    for route, error, match in (
        ("/page", pretrained.NotACheckpointError, "sent an HTML page"),
        ("/octets", pretrained.NotACheckpointError, "is an HTML page"),
        ("/seven", pretrained.NotACheckpointError, r"is not tiny's checkpoint .*; shape mismatches \(2\); Hints"),
        ("/missing", pretrained.DownloadError, "HTTP 404"),
    ):
        register(urls=(server.url(route),), baidu_url="https://pan.baidu.com/s/1abc", baidu_code="x1y2")
        message = _refused(error, match, pretrained.fetch, "tiny", progress=False)
        assert "or Baidu Pan https://pan.baidu.com/s/1abc (extraction code x1y2)" in message, message
        assert "--from_file PATH" in message
        assert _cache_files(cache) == [], route

    # The same refusal for a file given by hand, which is left where it is.
    saved = tmp_path / "saved.pth.tar"
    saved.write_bytes(page)
    _refused(pretrained.NotACheckpointError, "is an HTML page", pretrained.fetch, "tiny", from_file=str(saved))
    assert saved.read_bytes() == page and _cache_files(cache) == []


def test_from_file_verifies_converts_and_caches(register, files, cache, tmp_path):
    register(baidu_url="https://pan.baidu.com/s/1abc", baidu_code="x1y2")  # No URL: a manual download.
    _refused(
        pretrained.DownloadError,
        "no source to download from automatically: download .* Baidu Pan",
        pretrained.fetch,
        "tiny",
    )
    given = tmp_path / "from_baidu.pth.tar"
    given.write_bytes(files["tiny"])
    out = pretrained.fetch("tiny", from_file=str(given), progress=False)
    _, meta = checkpoints.load_variables(out)
    assert meta["source"] == str(given) and meta["sha256"] == hashlib.sha256(files["tiny"]).hexdigest()
    assert (cache / "downloads" / FILE).read_bytes() == files["tiny"] and given.exists()
    assert pretrained.fetch("tiny", progress=False) == out  # Cached: no source needed.
    # Another file for the same entry does not match the digest recorded.
    other = tmp_path / "other.pth.tar"
    other.write_bytes(files["other"])
    _refused(pretrained.ChecksumError, "first downloaded", pretrained.fetch, "tiny", from_file=str(other))
    assert checkpoints.load_variables(out)[1]["sha256"] == meta["sha256"]


def test_failures_a_user_can_meet_are_one_line(server, register, files, cache, monkeypatch):
    _refused(pretrained.UnknownPretrainedError, "resnet50_3g_imagenet", pretrained.load, "resnet50_3G")
    _refused(pretrained.UnknownPretrainedError, "3-layer MLP", pretrained.fetch, "vgg16_isqrt_imagenet")
    # No server listening there.
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/tiny"
    register(urls=(closed,))
    _refused(pretrained.DownloadError, "cannot download .*check the network", pretrained.fetch, "tiny")
    register(urls=(closed, closed + "2"))  # Each source is tried, and each failure named.
    message = _refused(pretrained.DownloadError, "no source gave", pretrained.fetch, "tiny", progress=False)
    assert f"cannot download {closed} (" in message and f"; cannot download {closed}2 (" in message, message
    # Google Drive without gdown.
    register(google_drive_id="1hN8Q5rlIOQa0YYkcen9jpN9YatPB1j4D")
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "gdown", None)
        _refused(errors.MissingDependencyError, "pip install gdown", pretrained.fetch, "tiny", progress=False)
    # No PyTorch to convert: said before anything is downloaded.
    server.routes["/tiny"] = (files["tiny"], "application/octet-stream", "range")
    register(urls=(server.url("/tiny"),))
    with monkeypatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)
        _refused(errors.MissingDependencyError, "pip install torch", pretrained.fetch, "tiny")
    assert server.log == [] and _cache_files(cache) == []
    # A full disk (/dev/full answers every write with ENOSPC).
    if os.path.exists("/dev/full"):
        (cache / "downloads").mkdir(parents=True, exist_ok=True)
        os.symlink("/dev/full", cache / "downloads" / f"{FILE}.part")
        _refused(pretrained.CacheError, "disk is full .*GG_JAX_CACHE", pretrained.fetch, "tiny", progress=False)
        os.remove(cache / "downloads" / f"{FILE}.part")
    # A cache that cannot be written.
    if os.geteuid() != 0:  # root writes anywhere
        locked = cache.parent / "locked"
        locked.mkdir(mode=0o500)
        _refused(pretrained.CacheError, "cannot write .*GG_JAX_CACHE", pretrained.fetch, "tiny", cache_dir=locked)


def test_google_drive_entries_go_through_gdown(register, files, cache, monkeypatch):
    """gdown (a stand-in here) writes the file; what it gives is checked like any download."""
    calls = []

    def fake_download(id, output, quiet, resume):
        calls.append((id, os.path.basename(output), resume))
        body = files["tiny"] if id == "good" else b"<html>Too many users have viewed this file</html>"
        with open(output, "wb") as f:
            f.write(body)
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    register(google_drive_id="quota")
    _refused(pretrained.NotACheckpointError, "is an HTML page", pretrained.fetch, "tiny", progress=False)
    assert _cache_files(cache) == []
    register(google_drive_id="good")
    out = pretrained.fetch("tiny", progress=False)
    assert calls == [("quota", f"{FILE}.drive.part", True), ("good", f"{FILE}.drive.part", True)]
    assert checkpoints.load_variables(out)[1]["source"] == "https://drive.google.com/file/d/good/view"
    assert _cache_files(cache)[:2] == [f"downloads/{FILE}", f"downloads/{FILE}.sha256"]


def test_init_from_a_released_backbone_keeps_the_head_fresh(register, files, tmp_path):
    """`config.init_from="pretrained:NAME"` of a plain ResNet (torchvision's kind) into a 3G-Net:
    the backbone is loaded, the 3G head and the classifier keep their fresh values."""
    import ml_collections
    import optax

    from gg_jax.training import init_from, state

    given = tmp_path / "resnet18-tv.pth"
    given.write_bytes(files["torchvision"])
    register(
        name="tiny_tv",
        architecture="resnet18_gap",
        num_classes=5,
        convention="torchvision",
        init_from_backbone_only=True,
    )
    source = pretrained.load("tiny_tv", from_file=str(given), progress=False)[1]

    model = models.create("resnet18_3g", num_classes=3, **SMALL_3G)
    tx = optax.sgd(0.1)
    abstract = state.abstract_train_state(model, tx)
    rng = np.random.default_rng(0)
    fresh = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    config = ml_collections.ConfigDict(
        dict(
            init_from="pretrained:tiny_tv",
            init_from_backbone_only=False,
            init_from_classifier="fc",
            init_from_head_modules=("head", "fc"),
        )
    )
    started = init_from.init_from_checkpoint(fresh, config, tx, jax.tree.map(lambda _: device, abstract))
    for col in ("params", "batch_stats"):
        for module, tree in started.variables[col].items():
            want = fresh.variables[col][module] if module in ("head", "fc") else source[col][module]
            jax.tree.map(np.testing.assert_array_equal, tree, want)


def test_evaluation_prints_the_published_error_beside_the_measured_one(register, files, tmp_path, caplog):
    from gg_jax.training import evaluation

    given = tmp_path / "tiny.pth.tar"
    given.write_bytes(files["tiny"])
    register()
    pretrained.fetch("tiny", from_file=str(given), progress=False)
    config = runs.tiny_config(eval__resize_size=48)
    caplog.set_level("INFO")
    result = evaluation.evaluate(config, None, "pretrained:tiny")
    assert result["num_examples"] == 360 and 0 <= result["top1_error"] <= 1
    assert result["published_top1_error"] == 0.125 and result["published_top5_error"] == 0.0125
    assert result["published_source"] == "tests/test_pretrained.py"
    assert result["published_protocol"] == "1 centre crop of 48 from the 48-resized image"
    assert "published error was measured with" not in caplog.text
    # Another protocol than the published one: said.
    config = runs.tiny_config(eval__resize_size=56)
    assert evaluation.published_accuracy({"pretrained": "tiny"}, config)["published_top1_error"] == 0.125
    assert "--config.eval.resize_size=48" in caplog.text


# ------------------------------------------------------------------------------ the registry
# The class counts of the datasets the entries name (TFDS imagenet2012, places365_small).
DATASET_CLASSES = {"imagenet2012": 1000, "places365_small": 365}


@pytest.mark.parametrize("name", pretrained.names())
def test_registry_entries_are_consistent(name):
    e = pretrained.entry(name)
    assert e.name == name and name not in registry.NOT_AVAILABLE
    assert e.architecture in models.names() and e.convention in convert.CONVENTIONS
    assert set(e.model_options) <= set(models.options(e.architecture))
    assert DATASET_CLASSES[e.dataset] == e.num_classes
    # The architecture's PyTorch layout has a classifier of the entry's classes; the published
    # parameter count and file size are those of that layout.
    layout = dict(convert.torch_layout(e.architecture, e.num_classes, **e.model_options))
    assert layout["fc.weight"][0] == e.num_classes
    stats = ("running_mean", "running_var", "num_batches_tracked")
    params = sum(int(np.prod(s)) for k, s in layout.items() if not k.endswith(stats))
    if e.num_params is not None:
        assert params == e.num_params
    if e.file_size_mib is not None:
        float32_mib = 4 * sum(int(np.prod(s)) for k, s in layout.items() if not k.endswith(stats[2])) / 2**20
        assert abs(e.file_size_mib / float32_mib - 1) < 0.005, (e.file_size_mib, float32_mib)
    # Sources: URLs that parse, Drive ids, Baidu links; every entry has one to download from.
    assert e.sources() and os.path.basename(e.file_name) == e.file_name and e.file_name.endswith((".pth", ".tar"))
    for url in e.urls:
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https" and parts.netloc and os.path.basename(parts.path) == e.file_name
        # torch.hub's convention: the hex after the last '-' starts the file's sha256.
        assert e.sha256 == re.search(r"-([0-9a-f]+)\.", url).group(1)
    assert re.fullmatch(r"[0-9a-f]{8,64}|", e.sha256)
    assert re.fullmatch(r"[A-Za-z0-9_-]{25,}|", e.google_drive_id)
    if e.baidu_url:
        parts = urllib.parse.urlsplit(e.baidu_url)
        assert (parts.scheme, parts.netloc) == ("https", "pan.baidu.com") and parts.path.startswith("/s/")
    assert re.fullmatch(r"[0-9a-z]{4}|", e.baidu_code)
    p = e.published
    assert 0 < p.top5_error < p.top1_error < 100 and p.resize_size >= p.image_size
    assert re.search(r"@[0-9a-f]{7}", p.source) and e.licence and e.preprocessing


def test_command_line(tmp_path):
    """`python -m gg_jax.pretrained`: the table; an HTML file given by hand is one `error:` line
    and exit status 1 (as every error of `fetch`: `cli.run_tool`)."""
    env = runs.subprocess_env(tmp_path, GG_JAX_CACHE=tmp_path / "cache")
    proc = runs.run(["-m", "gg_jax.pretrained", "list"], env)
    for name in pretrained.names():
        assert f"| {name} |" in proc.stdout
    assert "| resnet50_3g_places365 | resnet50_3g | 365 | 43.07 / 13.44 | 10 crops |" in proc.stdout
    assert "vgg16_isqrt_imagenet" in proc.stdout
    page = tmp_path / "page.html"
    page.write_text("<html><body>Baidu Pan: sign in</body></html>")
    proc = runs.run(["-m", "gg_jax.pretrained", "fetch", "resnet50_3g_imagenet", "--from_file", page], env, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert (
        "is an HTML page" in lines[0] and "pan.baidu.com/s/1C8uNk0PJCanDaNwol0gR1Q (extraction code 74ot)" in lines[0]
    )
    assert not (tmp_path / "cache" / "downloads" / "ResNet50-3G-ImageNet.pth.tar").exists()


def test_a_file_system_error_names_the_cache(tmp_path):
    """`download.writing` turns the OSErrors of writing into CacheErrors (one line, what to do)."""
    from gg_jax.pretrained import download

    for code, expected in ((errno.ENOSPC, "disk is full"), (errno.EROFS, "cannot write"), (errno.EIO, "cannot write")):
        with pytest.raises(pretrained.CacheError, match=expected) as e:
            with download.writing(str(tmp_path)):
                raise OSError(code, os.strerror(code))
        assert str(tmp_path) in str(e.value) and "GG_JAX_CACHE" in str(e.value)


def test_the_documented_table_is_the_registry():
    """docs/pretrained.md's table: one row per entry, with its model, classes and published errors."""
    rows = {}
    for line in (runs.REPO / "docs" / "pretrained.md").read_text().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0] in pretrained.names():
            rows[cells[0]] = cells
    assert sorted(rows) == sorted(pretrained.names())
    for name, (_, model, classes, errors_, protocol, *_) in rows.items():
        e = pretrained.entry(name)
        assert model.split(" ")[0].strip("`") == e.architecture and classes.endswith(f", {e.num_classes}")
        assert [float(x) for x in errors_.split(" / ")] == [e.published.top1_error, e.published.top5_error]
        assert protocol.startswith("10 crops" if e.published.ten_crop else "1 crop")
