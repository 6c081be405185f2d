"""Sphinx configuration for the optax_guard documentation.

Build the site with ``sphinx-build -W -b html docs docs/_build/html`` and run
every code example of the guides with ``sphinx-build -W -b doctest docs
docs/_build/doctest`` (both are steps of ``.ci/run``).
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

# The data-parallel recipes run on 8 simulated CPU devices; this must be set
# before JAX initialises (autodoc imports optax_guard, hence jax, below).
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Document the checkout this file belongs to, even without an editable install.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from sphinx.util import logging  # noqa: E402

import optax_guard  # noqa: E402

project = "optax_guard"
author = "optax_guard developers"
copyright = "2026, optax_guard developers"  # noqa: A001
release = optax_guard.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: fenced directives (```{testcode}), $math$, definition lists, heading anchors.
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# autodoc: signatures come from the code, never copied into the pages.
autodoc_member_order = "bysource"
# Page contents list methods by their own name (update(), under Optimizer).
toc_object_entries_show_parents = "hide"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Type names shown as the code writes them instead of expanded:
# jax.typing.ArrayLike would otherwise print as a ten-member union and every
# schedule as a Callable of it. Keys are the annotation text in the sources.
autodoc_type_aliases = {
    name: name
    for name in (
        "optax.GradientTransformation",
        "optax.GradientTransformationExtraArgs",
        "optax.Schedule",
        "optax.ScalarOrSchedule",
        "optax.Params",
        "optax.Updates",
        "optax.OptState",
        "jax.Array",
        "Mask",
    )
} | {"ArrayLike": "jax.typing.ArrayLike", "ScalarOrSchedule": "optax.ScalarOrSchedule"}
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = False

# doctest: the guides' ``{testcode}`` blocks run in `sphinx-build -b doctest`.
# Docstring examples already run under pytest (--doctest-modules), so the
# plain ``>>>`` blocks that autodoc pulls in are not run a second time here.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax_guard as og
"""

# Copy buttons on code blocks: the ``>>>``/``...`` prompts and the lines they
# do not start (a docstring example's output) stay out of the copied text;
# the guides' printed outputs (``{testoutput}``, labelled "Output" by the
# stylesheet) get no button.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
copybutton_selector = "div:not(.doctest-output) > div.highlight > pre"

# Formulas render offline: MathJax 3 ships in _static/mathjax (see SOURCE.txt
# there) instead of loading from a CDN when a page is read.
mathjax_path = "mathjax/tex-chtml-full.js"

html_theme = "sphinx_book_theme"
html_title = f"optax_guard {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_js_files = ["custom.js"]
html_theme_options = {
    "repository_url": "https://github.com/optax-guard/optax_guard",
    "use_repository_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
    # One search box (the sidebar's): no second one in a header bar.
    "navbar_persistent": [],
}

_log = logging.getLogger("optax_guard.docs")


def _check_api_reference(app, env):
  """Every name of ``optax_guard.__all__`` is documented in the API reference.

  The index (docs/api.md) lists the families; each name is documented on its
  family's page under docs/api/.

  Runs after all pages are read; a missing name is a warning, so the ``-W``
  build fails.
  """
  documented = set(env.get_domain("py").objects)
  for name in optax_guard.__all__:
    if name == "__version__":
      continue
    if f"optax_guard.{name}" not in documented:
      _log.warning("public name optax_guard.%s is missing from the API reference (docs/api/)",
                   name, type="optax_guard", subtype="api")


_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")


def _readable_signature(app, what, name, obj, options, signature, return_annotation):
  """Writes a type alias inside a union or a Callable by its name.

  Sphinx prints an alias of ``autodoc_type_aliases`` nested in another type
  (``ArrayLike | None``) as ``TypeAliasForwardRef('jax.typing.ArrayLike')``.
  """
  del app, what, name, obj, options
  fix = lambda text: text and _ALIAS_REPR.sub(r"\1", text)
  return fix(signature), fix(return_annotation)


def _label_outputs(app, doctree, docname):
  """Marks the blocks of ``{testoutput}`` as program output (class ``doctest-output``).

  The stylesheet labels them "Output", and the copy button leaves them out.
  """
  del app, docname
  from docutils import nodes

  for block in doctree.findall(nodes.literal_block):
    if block.get("testnodetype") == "testoutput":
      block["classes"].append("doctest-output")


def setup(app):
  app.connect("doctree-resolved", _label_outputs)
  app.connect("env-check-consistency", _check_api_reference)
  app.connect("autodoc-process-signature", _readable_signature)
