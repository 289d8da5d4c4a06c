"""The installed wheel is the library: it installs into a fresh venv without torch, every module
of gg_jax imports, and no test fixture ships in it."""

import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

_IMPORT_ALL = """
import importlib, pkgutil, sys
import gg_jax
assert "site-packages" in gg_jax.__file__, gg_jax.__file__  # the installed wheel, not the checkout
names = sorted(m.name for m in pkgutil.walk_packages(gg_jax.__path__, "gg_jax."))
for name in names:
    importlib.import_module(name)
assert "torch" not in sys.modules, "a module imported torch"
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("torch is importable in the fresh venv")
print(len(names), "modules:", " ".join(names))
"""


def _without_torch(site: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    """A directory of links to this environment's installed packages, PyTorch's left out."""
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("torch", "functorch", "gg_jax", "__editable__", "_gg_jax")) or name.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.mark.slow
def test_wheel_installs_without_torch_and_imports_every_module(tmp_path):
    def run(*args, **kw):
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=1800, **kw)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return proc

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", REPO)
    (wheel,) = (tmp_path / "dist").glob("gg_jax-*.whl")
    with zipfile.ZipFile(wheel) as z:
        files = z.namelist()
        metadata = z.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
    assert not [f for f in files if not f.startswith(("gg_jax/", "gg_jax-"))], files  # no tests, no fixtures
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert all("extra ==" in line and "convert" in line for line in requires if "torch" in line), requires

    # A fresh venv with the wheel alone; its dependencies are this environment's packages (no
    # download), PyTorch excluded.
    run(sys.executable, "-m", "venv", tmp_path / "venv")
    python = tmp_path / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    fresh_site = pathlib.Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    )
    deps = _without_torch(pathlib.Path(sysconfig.get_paths()["purelib"]), tmp_path / "deps")
    (fresh_site / "deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run(python, "-c", _IMPORT_ALL, cwd=tmp_path, env=dict(env, JAX_PLATFORMS="cpu")).stdout
    assert "gg_jax.models" in out and "gg_jax.cpu.conv" in out and "gg_jax.training.trainer" in out, out


def test_requirements_declare_the_floors_of_pyproject():
    """requirements.txt (what the README installs) and pyproject.toml (what pip installs with
    the `train` extra) declare the same packages with the same version floors, and the
    environment running the tests satisfies them."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["train"]]
    lines = (REPO / "requirements.txt").read_text().splitlines()
    listed = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]

    def floors(reqs):
        return {canonicalize_name(r.name): str(r.specifier) for r in reqs}

    assert floors(listed) == floors(declared)
    for req in declared:
        assert req.specifier, f"{req.name} has no version floor"
        installed = importlib.metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), (req.name, installed, str(req.specifier))
