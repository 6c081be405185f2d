"""Release engineering: one version everywhere, and distributions that hold the package alone."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

import optax_guard

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = {p.name for p in (ROOT / "optax_guard").glob("*.py")}


def _metadata():
  """The installed distribution's metadata; skips where the checkout runs uninstalled.

  CI installs the package (``.ci/run`` sets ``CI``), so there a missing
  installation fails instead of skipping.
  """
  try:
    return importlib.metadata.metadata("optax_guard")
  except importlib.metadata.PackageNotFoundError:
    if os.environ.get("CI"):
      raise
    pytest.skip("optax_guard is not installed here (run from a checkout on PYTHONPATH): "
                "pip install -e . to check its metadata")


def test_version_is_single_sourced_and_installed():
  assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", optax_guard.__version__)
  assert _metadata()["Version"] == optax_guard.__version__


def test_changelog_has_an_entry_for_the_version():
  changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  assert re.search(rf"^## {re.escape(optax_guard.__version__)}\b", changelog, flags=re.M)


def test_license_is_the_apache_2_text_the_metadata_declares():
  text = (ROOT / "LICENSE").read_text(encoding="utf-8")
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert len(text) > 10_000  # the full text, not a pointer to it
  assert _metadata()["License-Expression"] == "Apache-2.0"


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
  out = tmp_path_factory.mktemp("dist")
  proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (wheel,) = out.glob("*.whl")
  (sdist,) = out.glob("*.tar.gz")
  return wheel, sdist


@pytest.mark.slow
def test_wheel_holds_the_package_alone(dists):
  wheel, _ = dists
  version = optax_guard.__version__
  assert wheel.name == f"optax_guard-{version}-py3-none-any.whl"
  names = zipfile.ZipFile(wheel).namelist()
  package = {n.split("/", 1)[1] for n in names if n.startswith("optax_guard/")}
  assert package == MODULES | {"py.typed"}
  allowed = ("optax_guard/", f"optax_guard-{version}.dist-info/")
  others = [n for n in names if not n.startswith(allowed)]
  assert not others, f"unexpected files in the wheel: {others}"
  assert f"optax_guard-{version}.dist-info/licenses/LICENSE" in names


@pytest.mark.slow
def test_sdist_holds_the_package_and_build_files_alone(dists):
  _, sdist = dists
  top = f"optax_guard-{optax_guard.__version__}"
  with tarfile.open(sdist) as tar:
    names = [m.name for m in tar.getmembers() if m.isfile()]
  rel = {n.split("/", 1)[1] for n in names}
  build_files = {"PKG-INFO", "README.md", "LICENSE", "MANIFEST.in", "pyproject.toml", "setup.cfg"}
  package = {r.split("/", 1)[1] for r in rel if r.startswith("optax_guard/")}
  assert package == MODULES | {"py.typed"}
  others = rel - build_files - {f"optax_guard/{m}" for m in package}
  others = {r for r in others if not r.startswith("optax_guard.egg-info/")}
  assert not others, f"unexpected files in the sdist: {sorted(others)}"
  assert all(n.startswith(top + "/") for n in names)


@pytest.mark.slow
def test_wheel_imports_on_its_own(dists, tmp_path):
  """Installed from the wheel alone (not the checkout), the package imports and works."""
  wheel, _ = dists
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--target", str(target), str(wheel)], check=True, timeout=300)
  code = (
      "import pathlib, jax.numpy as jnp, optax_guard as og\n"
      "print(pathlib.Path(og.__file__).parent.parent)\n"
      "print(og.__version__, (pathlib.Path(og.__file__).parent / 'py.typed').exists())\n"
      "u, _ = og.clip_by_global_norm(1.0).update({'a': jnp.array([3.0, 4.0])}, None)\n"
      "print(u['a'].tolist())\n"
  )
  env = {"PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu", "PATH": ""}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, version_line, values = proc.stdout.strip().splitlines()[-3:]
  assert pathlib.Path(where) == target
  assert version_line == f"{optax_guard.__version__} True"
  assert values == "[0.6000000238418579, 0.800000011920929]"
