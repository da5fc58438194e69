"""Sphinx configuration for the doconv documentation.

The docs build needs Sphinx only: the deep-learning frameworks are mocked, so
autodoc can import doconv.torch, doconv.keras and doconv.gluon without them.
"""

import inspect
import os
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(ROOT / "src"))

project = "doconv"
author = "the doconv developers"
copyright = "the doconv developers (MIT licence)"
# One place for the version: src/doconv/__init__.py (read, not imported, like setup.py does).
release = re.search(r'^__version__ = "([^"]+)"', (ROOT / "src" / "doconv" / "__init__.py").read_text(), re.M).group(1)
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# The frameworks are extras; the docs env installs none of them.
autodoc_mock_imports = ["torch", "tensorflow", "keras", "mxnet", "gluoncv", "jax"]


def _import_keras_adapter_under_mocks():
    """Import doconv.keras once, with a pass-through ``register_keras_serializable``.

    Under autodoc's mocks that decorator would replace ``DOConv2D`` by a mock
    object, and autodoc could not document the class's methods. Imported here,
    the module stays in ``sys.modules`` and autodoc reuses it.
    """
    from sphinx.ext.autodoc.mock import mock

    with mock(autodoc_mock_imports):
        import keras

        keras.saving = types.SimpleNamespace(register_keras_serializable=lambda *args, **kwargs: lambda obj: obj)
        import doconv.keras  # noqa: F401


_import_keras_adapter_under_mocks()


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
    """Show a class's own ``__init__`` signature where its base class is mocked.

    A mocked base (``nn.Module``, ``keras.layers.Layer``, ``gluon.HybridBlock``) brings a
    ``__new__(*args, **kwargs)`` that autodoc would otherwise show as the constructor.
    """
    if what != "class" or signature != "(*args, **kwargs)" or not isinstance(obj, type):
        return None
    for klass in obj.__mro__:
        init = klass.__dict__.get("__init__")
        # Skip the mock's own __init__ (every class here inherits __sphinx_mock__, so test the function).
        if inspect.isfunction(init) and not init.__module__.startswith("sphinx."):
            parameters = list(inspect.signature(init).parameters.values())[1:]  # drop self
            plain = [p.replace(annotation=inspect.Parameter.empty) for p in parameters]
            return str(inspect.Signature(plain)), None
    return None


def setup(app):
    app.connect("autodoc-process-signature", _constructor_signature)


autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

templates_path = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {
    "description": "Depthwise over-parameterized convolution for PyTorch, Keras 3 and MXNet Gluon",
    "fixed_sidebar": True,
}
html_static_path = []
