"""Every Python block of README.md runs as written, in the tox env of the framework it imports.

A block's framework is read from its imports; the prose just before it names its install
line (``pip install ".[EXTRA]" [packages]``), which must be an extra of that framework. Each
block runs in a child process, in a temporary folder (so files it writes go there). Where its
framework, or a package its install line adds, is missing, it is skipped, and
``test_every_block_runs_in_some_tox_env`` checks that some tox env installs all of them and
runs this file, so that every block runs in CI.
"""

import ast
import configparser
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# (imported module, framework): the first match decides.
_FRAMEWORK_OF = [
    ("doconv.gluon", "gluon"),
    ("gluoncv", "gluon"),
    ("mxnet", "gluon"),
    ("doconv.keras", "keras"),
    ("keras", "keras"),
    ("doconv.torch", "torch"),
    ("torch", "torch"),
]
_EXTRAS = {"torch": {"torch", "demo", "all"}, "keras": {"keras", "tensorflow", "jax", "all"}, "gluon": {"gluon", "all"}}
# What a block of each framework needs importable, and what a tox env must install for it.
_MODULES = {"torch": ["torch"], "keras": ["keras"], "gluon": ["mxnet", "gluoncv"], None: []}
_KERAS_BACKENDS = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}
_TOX_DEPS = {"torch": ["torch"], "keras": ["tensorflow-cpu"], "gluon": ["mxnet", "gluoncv"], None: []}
_INSTALL = re.compile(r"""pip install ["']?(?:\.|doconv-layers)\[([\w,]+)\]["']?((?:[ \t]+[A-Za-z][\w.-]*)*)""")


def _blocks():
    """(first line, code, framework, extras, extra packages) of every ```python block of the README."""
    with open(README, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    blocks, prose, i = [], [], 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)", lines[i])
        if not fence:
            prose.append(lines[i])
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if fence.group(1) == "python":
            code = "\n".join(lines[i + 1 : end]) + "\n"
            install = _INSTALL.findall("\n".join(prose))
            extras, packages = (install[-1][0].split(","), install[-1][1].split()) if install else ([], [])
            blocks.append((i + 1, code, _framework(code), extras, packages))
        prose, i = [], end + 1
    return blocks


def _framework(code):
    imported = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return next((framework for module, framework in _FRAMEWORK_OF if module in imported), None)


BLOCKS = _blocks()


def test_the_readme_has_a_block_per_framework():
    assert {framework for _, _, framework, _, _ in BLOCKS} >= {"torch", "keras", "gluon"}


@pytest.mark.parametrize("line, code, framework, extras, packages", BLOCKS, ids=[f"line{b[0]}-{b[2]}" for b in BLOCKS])
def test_block_names_its_install_line(line, code, framework, extras, packages):
    if framework is not None:
        assert set(extras) & _EXTRAS[framework], f"README.md:{line}: a {framework} block, install line extras {extras}"


@pytest.mark.parametrize("line, code, framework, extras, packages", BLOCKS, ids=[f"line{b[0]}-{b[2]}" for b in BLOCKS])
def test_block_runs(tmp_path, line, code, framework, extras, packages):
    needed = _MODULES[framework] + [p.replace("-", "_") for p in packages]
    if framework == "keras":  # keras imports its backend on import
        needed.append(_KERAS_BACKENDS.get(os.environ.get("KERAS_BACKEND", "tensorflow"), "tensorflow"))
    for module in needed:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"README.md:{line} needs {module}, not installed in this env")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README.md:{line}:\n{proc.stderr[-4000:]}"


def test_every_block_runs_in_some_tox_env():
    tox = configparser.ConfigParser(interpolation=None)
    tox.read(os.path.join(ROOT, "tox.ini"))
    envs = {}
    for section in tox.sections():
        if section.startswith("testenv:") and "tests/test_readme.py" in tox[section].get("commands", ""):
            deps = tox[section].get("deps", "").split()
            envs[section[len("testenv:") :]] = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in deps}
    assert envs, "no tox env runs tests/test_readme.py"
    for line, _, framework, _, packages in BLOCKS:
        needed = set(_TOX_DEPS[framework]) | {p.lower() for p in packages}
        assert any(needed <= deps for deps in envs.values()), f"README.md:{line}: no tox env installs {needed}"
