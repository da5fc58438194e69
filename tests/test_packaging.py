"""The distributions: what the sdist and the wheel hold, their metadata, and what the extras install.

The sdist and the wheel are built once for the module, offline, with ``python -m build
--no-isolation`` (the wheel is built from the sdist, so a file missing from the sdist breaks
it). Those tests run in the tox env ``packaging``, which has ``build``; the resolver test runs
in the ``torch`` env, which has torch installed.
"""

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTRIBUTION = "doconv-layers"
FRAMEWORKS = {"torch", "tensorflow", "keras", "jax"}  # never capped, except in the `all` extra's tested set


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist path, wheel path, everything the build printed)."""
    pytest.importorskip("build", reason="building the distributions needs the `build` package (tox env packaging)")
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), ROOT],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel, log


def sdist_files(sdist):
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = os.path.commonpath(names)
    return {os.path.relpath(name, top) for name in names}


def wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def test_build_prints_no_license_or_setuptools_warning(built):
    _, _, log = built
    license_warnings = [
        line for line in log.splitlines() if re.search(r"warn|deprecat", line, re.I) and "licen" in line.lower()
    ]
    assert license_warnings == []
    assert "SetuptoolsDeprecationWarning" not in log and "SetuptoolsWarning" not in log, log[-3000:]


def test_sdist_holds_what_its_tests_need(built):
    sdist, _, _ = built
    files = sdist_files(sdist)
    needed = {"LICENSE", "README.md", "tox.ini", "pyproject.toml", "setup.py", "src/doconv/_foldkernel.c"}
    needed |= {f"tests/{name}" for name in os.listdir(os.path.join(ROOT, "tests")) if name.endswith(".py")}
    needed |= {"docs/conf.py", "docs/index.rst", "examples/train_imagenet_gluon.py"}
    assert needed <= files, sorted(needed - files)
    stray = [f for f in files if re.search(r"__pycache__|\.py[cod]$|\.so$|_foldkernel-build\.txt$|^build/|\.tox/", f)]
    assert stray == []
    tracked = _tracked_files()
    if tracked is not None:  # in a git checkout: exactly the project's files, plus setuptools' own
        generated = {f for f in files if f in ("PKG-INFO", "setup.cfg") or ".egg-info/" in f}
        assert files - generated == tracked - {".gitignore"}


def _tracked_files():
    git = shutil.which("git")
    if git is None or not os.path.exists(os.path.join(ROOT, ".git")):
        return None
    # What the next commit would hold: tracked files and new ones git does not ignore.
    proc = subprocess.run(
        [git, "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    return {f for f in proc.stdout.splitlines() if os.path.exists(os.path.join(ROOT, f))}


def test_wheel_holds_the_package_its_kernel_and_license(built, has_c_compiler):
    sdist, wheel, _ = built
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = zf.read("doconv/_foldkernel-build.txt").decode().strip()
    modules = {f[len("src/") :] for f in sdist_files(sdist) if f.startswith("src/doconv/") and f.endswith(".py")}
    assert modules and modules <= names, sorted(modules - names)
    dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert len(dist_info) == 1 and dist_info.pop().startswith("doconv_layers-")
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    kernel = [n for n in names if re.fullmatch(r"doconv/_foldkernel\..*(so|pyd)", n)]
    assert (record == "built") == bool(kernel), (record, kernel)
    if has_c_compiler:
        assert record == "built" and kernel, record
    others = names - modules - set(kernel) - {"doconv/_foldkernel-build.txt"}
    assert all(".dist-info/" in n for n in others), sorted(others)  # no C source, no tests, no stray files


def test_wheel_metadata(built):
    _, wheel, _ = built
    meta = wheel_metadata(wheel)
    assert meta["Name"] == DISTRIBUTION
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]  # PEP 639: deprecated
    extras = {}
    for requirement in meta.get_all("Requires-Dist"):
        spec, _, marker = requirement.partition(";")
        extra = re.search(r"extra == \"([^\"]+)\"", marker)
        name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0).lower()
        extras.setdefault(extra.group(1) if extra else None, {})[name] = spec.strip()
    assert set(extras) >= {None, "torch", "keras", "tensorflow", "jax", "gluon", "all", "demo"}
    for extra, requirements in extras.items():
        for name, spec in requirements.items():
            assert name != "tensorflow-cpu", f"[{extra}] would install tensorflow-cpu beside a user's tensorflow"
            if name in FRAMEWORKS and extra != "all":
                assert "<" not in spec and "==" not in spec, f"[{extra}] caps {spec}"
    assert set(extras["keras"]) == {"keras"}  # Keras 3 only, on whichever backend the user has
    assert set(extras["tensorflow"]) == {"keras", "tensorflow"} and set(extras["jax"]) == {"keras", "jax"}
    assert extras["torch"] == {"torch": "torch>=2.1"}


def test_torch_extra_leaves_an_installed_torch_alone(tmp_path):
    """Resolving `.[torch]` beside the installed torch (>= 2.1) installs doconv-layers and nothing else.

    Offline: no index, the local checkout, the installed setuptools to read its metadata.
    """
    torch = pytest.importorskip("torch", reason="needs an installed torch (tox env torch)")
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--quiet"]
        + ["--report", str(report), f"{ROOT}[torch]"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_CONSTRAINT": "", "PIP_FIND_LINKS": ""},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == [DISTRIBUTION], (installs, torch.__version__)


def test_a_failed_kernel_build_is_recorded_as_the_build_said_it(built, tmp_path):
    """With a compiler that fails, the wheel still builds, without the kernel, and records why."""
    sdist, _, _ = built
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (source,) = (tmp_path / "src").iterdir()
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CC": "/bin/false"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert not [n for n in zf.namelist() if n.startswith("doconv/_foldkernel.")]
        record = zf.read("doconv/_foldkernel-build.txt").decode().strip()
    assert record.startswith("not built: ") and "/bin/false" in record, record
    assert record in " ".join((proc.stdout + proc.stderr).split())  # the build printed the same words
