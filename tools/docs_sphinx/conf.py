"""Sphinx configuration for the offline docs build (`python tools/build_docs.py`).

`tools/build_docs.py` stages the notebooks that nbdev has processed and passes the values that come from
`settings.ini` (project, title, static and extra paths) as overrides; everything else is fixed here.
Quarto is not used: myst-nb renders the stored outputs and furo draws the site.
"""
from pathlib import Path

extensions = ["myst_nb", "sphinx-mathjax-offline"]  # the second is the package's import name, hyphens and all

project = "additive_pos_attn"  # overridden from settings.ini
html_title = project
root_doc = "index"

# Notebooks are rendered as stored: nbdev has already executed the `show_doc` cells.
nb_execution_mode = "off"
# Markdown outputs and cells are MyST, so `$...$` in docstrings shown by `show_doc` is maths.
nb_render_markdown_format = "myst"
nb_merge_streams = True
nb_ipywidgets_js = {}  # never pull widget managers from a CDN
myst_enable_extensions = ["dollarmath", "amsmath", "fieldlist"]  # fieldlist: docstring sections (build_docs.py)
myst_dmath_double_inline = True  # pandoc (Quarto) reads `$$...$$` inside a paragraph as display maths
# nbdev's links are page names (`base.html#check_positions`), not Sphinx references: keep them as written;
# `tools/build_docs.py` checks every local link of the built site.
myst_all_links_external = True
# Quarto allows `###` right under the title (nbdev's `show_doc` headings do this); docutils needs no warning for it.
suppress_warnings = ["myst.header"]

html_theme = "furo"
html_static_path = []  # set by build_docs.py: this folder's css and nbs/styles.css
html_css_files = ["styles.css", "site.css"]
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {"navigation_with_keys": True}
pygments_style = "sphinx"

# MathJax 3 comes from the site (sphinx-mathjax-offline); keep only what `tex-chtml.js` loads.
MATHJAX_KEEP = ("tex-chtml.js", "output/chtml/fonts/woff-v2/", "input/tex/extensions/")


def _prune_mathjax(app, exc):
    "Remove the parts of the 24 MB MathJax copy that `tex-chtml.js` never loads (fonts, autoload extensions kept)."
    root = Path(app.outdir) / "_static" / "mathjax"
    if exc is not None or not root.exists(): return
    for f in sorted(root.rglob("*"), reverse=True):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and not rel.startswith(MATHJAX_KEEP): f.unlink()
        elif f.is_dir() and not any(f.iterdir()): f.rmdir()


def setup(app):
    app.connect("build-finished", _prune_mathjax, priority=900)  # after sphinx-mathjax-offline's copy (500)
