"""Release check: the built wheel and sdist work as ``pip install aekt-plugin`` promises.

Builds the sdist from the source tree and the wheel from the sdist, as a release does (no build
isolation: setuptools and wheel come with the dev extra, so no network; building from the sdist also
keeps a developer's stale ``build/`` directory out of the wheel), installs the *wheel* into a fresh
virtual environment that sees this environment's torch but not its editable ``aekt_plugin``, and
exercises it from a directory outside the repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import aekt_plugin
from aekt_plugin import configs

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPTS = ("aekt", "aekt-mdistiller", "aekt-timm")
pytestmark = pytest.mark.slow


def _run(*command: str | os.PathLike[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _build(source: Path, outdir: Path, *kinds: str) -> None:
    """``python -m build``; with no ``kinds`` it builds the sdist, then the wheel from the unpacked sdist."""
    _run(sys.executable, "-m", "build", "--no-isolation", *kinds, "--outdir", outdir, source)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("dist")
    _build(REPO, outdir)
    return outdir


def _only(directory: Path, pattern: str) -> Path:
    (match,) = directory.glob(pattern)
    return match


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; torch is visible through a .pth file only."""
    venv = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    )
    # A .pth line adds a directory to sys.path without running the .pth files inside it, so this venv sees
    # torch but not the editable install of the source tree.
    (site_packages / "outer-site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", _only(dist, "*.whl"))
    return venv


def test_version_matches_the_changelog(dist: Path):
    changelog = (REPO / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", changelog, flags=re.M)
    assert released and released[0] == aekt_plugin.__version__
    assert _only(dist, "*.whl").name.startswith(f"aekt_plugin-{aekt_plugin.__version__}-")


def test_twine_check_passes(dist: Path):
    _run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))


def test_wheel_holds_the_package_configs_and_marker_and_nothing_else(dist: Path):
    names = zipfile.ZipFile(_only(dist, "*.whl")).namelist()
    assert "aekt_plugin/py.typed" in names
    for toolkit in configs.TOOLKITS:
        for name in configs.list_configs(toolkit):
            assert f"aekt_plugin/configs/{toolkit}/{name}.yaml" in names
    leftovers = [
        n
        for n in names
        if re.search(r"(^|/)(tests?|benchmarks|examples|build|__pycache__)/|\.pyc$|\.orig$", n)
    ]
    assert not leftovers
    assert all(n.startswith(("aekt_plugin/", "aekt_plugin-")) for n in names)


def test_wheel_metadata_declares_the_extras(dist: Path):
    wheel = zipfile.ZipFile(_only(dist, "*.whl"))
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    for extra in ("timm", "torchdistill", "demo", "all", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    assert (
        "Requires-Python: >=3.10" in metadata
        and "License-Expression: MIT" in metadata
        or "License: MIT" in metadata
    )
    entry_points = wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    for script in CONSOLE_SCRIPTS:
        assert f"{script} = " in entry_points


def _digest(wheel: Path) -> dict[str, str]:
    archive = zipfile.ZipFile(wheel)
    return {
        name: hashlib.sha256(archive.read(name)).hexdigest()
        for name in archive.namelist()
        if not name.endswith(".dist-info/RECORD")
    }


def test_sdist_rebuilds_the_same_wheel(dist: Path, tmp_path: Path):
    with tarfile.open(_only(dist, "*.tar.gz")) as sdist:
        sdist.extractall(tmp_path, filter="data")
    (source,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rebuilt = tmp_path / "rebuilt"
    _build(source, rebuilt, "--wheel")
    assert _digest(_only(rebuilt, "*.whl")) == _digest(_only(dist, "*.whl"))


def test_installed_wheel_works_from_outside_the_repository(installed: Path, tmp_path: Path):
    python = installed / "bin" / "python"
    code = (
        "import pathlib, sys, aekt_plugin, torch\n"
        "from aekt_plugin import configs\n"
        f"location = pathlib.Path(aekt_plugin.__file__)\n"
        f"assert location.is_relative_to({str(installed)!r}), location\n"
        "assert (pathlib.Path(aekt_plugin.__file__).parent / 'py.typed').is_file()\n"
        "count = 0\n"
        "for toolkit in configs.TOOLKITS:\n"
        "    for name in configs.list_configs(toolkit):\n"
        "        assert configs.read_config(toolkit, name).strip(); count += 1\n"
        "assert count >= 14, count\n"
        "z = torch.randn(4, 10, requires_grad=True)\n"
        "aekt_plugin.aekt_loss(z, torch.randn(4, 10), torch.randint(0, 10, (4,))).backward()\n"
        "print('ok', aekt_plugin.__version__, count)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert _run(python, "-c", code, cwd=tmp_path, env=env).startswith("ok")
    for script in CONSOLE_SCRIPTS:
        assert "usage:" in _run(installed / "bin" / script, "--help", cwd=tmp_path, env=env)
    assert "cifar100/res32x4_res8x4" in _run(
        installed / "bin" / "aekt-mdistiller", "--list", cwd=tmp_path, env=env
    )
    assert "0 failed" in _run(
        installed / "bin" / "aekt", "check", "--dtype", "float32", "--failures-only", cwd=tmp_path, env=env
    )
