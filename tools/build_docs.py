#!/usr/bin/env python
"""Build the documentation site into `_docs/` without Quarto.

nbdev renders its docs with Quarto (`nbdev_docs`, `nbdev_preview`); this script is the offline equivalent
for machines without Quarto:

1. nbdev's own processing (`nbdev.serve.proc_nbs`, what `nbdev_proc_nbs` runs) writes the processed
   notebooks to `_proc/`, with `show_doc` output. It is called directly: the CLI would try to install
   Quarto (with `sudo`) and run `pip install -e` first.
2. Each processed notebook is staged as `<output-file>.ipynb`, with its front matter turned into a title,
   a description and a `<meta name="description">`, and what Quarto would read translated into myst-nb's
   own mechanisms: `include: false`, `echo: false`, `output: false` and `code-fold: true` become the cell
   tags `remove-cell`, `remove-input`, `remove-output` and `hide-input`; `output: asis` splices the
   outputs into the page as markdown (so `show_doc`'s headings are real headings, with the ids nbdev's
   links expect added as anchors); `warning: false` drops stderr; `fig-cap`/`fig-alt` become myst-nb's
   figure and image options; callouts become admonitions. nbdev's absolute doc links become links
   between pages, and its `[source]` links point to highlighted module sources shipped with the site.
3. Sphinx renders the staged notebooks with myst-nb (execution off) and furo, warnings as errors; the
   chapters are ordered as in `nbs/sidebar.yml`, the file Quarto reads for its sidebar.
4. Every local link and asset of the built site is checked; nbdev's back-tick doc links whose target
   does not exist become plain code, any other broken link fails the build.

Usage: `python tools/build_docs.py [--sidebar PATH] [--verbose]`. Preview: `python -m http.server -d _docs`.
"""
import argparse
import html
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = Path(__file__).resolve().parent / "docs_sphinx"
SOURCE_DIR = "_source"  # where the offline site keeps highlighted module sources for `[source]` links


class DocsError(Exception):
    "A problem with the docs sources; the message says which file and what to change."


# ----------------------------------------------------------------------------------------------
# The reading order: nbs/sidebar.yml
# ----------------------------------------------------------------------------------------------

def _sidebar_entries(items, where):
    for it in items or []:
        if isinstance(it, str): yield it
        elif isinstance(it, dict) and 'href' in it: yield it['href']
        elif isinstance(it, dict) and 'section' in it and 'href' not in it:
            raise DocsError(f"{where}: nested section {it['section']!r} is not supported by the offline build")
        else: raise DocsError(f"{where}: unsupported sidebar entry {it!r}")


def _rel(path):
    path = Path(path).resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def read_sidebar(path: Path):
    "`[(caption or None, [notebook path relative to nbs, ...]), ...]` from a Quarto `sidebar.yml`."
    import yaml
    try: data = yaml.safe_load(path.read_text(encoding='utf-8'))
    except FileNotFoundError: raise DocsError(f"{path} not found: it lists the chapters in reading order") from None
    contents = ((data or {}).get('website') or {}).get('sidebar', {})
    if isinstance(contents, list): raise DocsError(f"{path}: several sidebars are not supported")
    contents = (contents or {}).get('contents')
    if not contents: raise DocsError(f"{path}: website.sidebar.contents is empty")
    groups, loose = [], []
    for it in contents:
        if isinstance(it, dict) and 'section' in it and 'href' not in it:
            if loose: groups.append((None, loose)); loose = []
            groups.append((str(it['section']), list(_sidebar_entries(it.get('contents'), path))))
        else: loose.extend(_sidebar_entries([it], path))
    if loose: groups.append((None, loose))
    norm = lambda s: PurePosixPath(s.lstrip('/')).as_posix().removeprefix('./')
    return [(cap, [norm(e) for e in es]) for cap, es in groups]


def check_sidebar(groups, nbs_path: Path, sidebar: Path, notebooks):
    "Every notebook in `nbs/` is listed once, and every listed notebook exists."
    listed = [e for _, es in groups for e in es]
    problems = []
    dups = sorted({e for e in listed if listed.count(e) > 1})
    if dups: problems.append(f"listed more than once: {', '.join(dups)}")
    missing = [e for e in listed if e not in notebooks]
    for e in missing:
        problems.append(f"lists {e}, which is not a notebook in {nbs_path.name}/" if not (nbs_path / e).exists()
                        else f"lists {e}, which nbdev does not process (names starting with _ or . are skipped)")
    for nb in notebooks:
        if nb not in listed: problems.append(f"does not list {nbs_path.name}/{nb}: add it in reading order")
    if problems: raise DocsError(f"{_rel(sidebar)}:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------
# nbdev's processing
# ----------------------------------------------------------------------------------------------

def process_notebooks():
    "Run nbdev's doc processing (as `nbdev_proc_nbs` does, minus installing Quarto); return `_proc`."
    import nbdev.serve, nbdev.serve_drv
    original = nbdev.serve_drv.main

    def named(o):
        src = Path(o[0])
        try: return original(o)
        except Exception as e:
            raise DocsError(f"nbdev could not process {_rel(src)}:\n{e}\ncaused by: {e.__cause__!r}") from e

    nbdev.serve_drv.main = named  # `proc_nbs` looks it up at call time; only the error message changes
    try: return Path(nbdev.serve.proc_nbs(n_workers=0, force=True))
    finally:
        nbdev.serve_drv.main = original
        os.environ.pop('IN_TEST', None)


# ----------------------------------------------------------------------------------------------
# Staging: processed notebooks -> Sphinx sources
# ----------------------------------------------------------------------------------------------

_re_frontmatter = re.compile(r'^\s*---[ \t]*\n(.*?\n)?---[ \t]*$', re.S)
_re_option = re.compile(r'^#\|\s?(.*)$')
_re_showdoc_arg = re.compile(r'^show_doc\(\s*([\w.]+)', re.M)
_re_source_link = re.compile(r'\[source\]\(([^)\s]+)\)(\{[^{}\n]*\})?')
_re_pandoc_attrs = re.compile(r'(?<=\))\{(?:[#.][\w-]+|[\w-]+=)[^{}\n]*\}')
_re_fence = re.compile(r'^\s*(`{3,}|~{3,})')
_re_heading = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
_re_callout = re.compile(r'^(:{3,})\s*\{\s*\.callout-(note|tip|warning|important|caution)\b([^}]*)\}\s*$')
_re_div_close = re.compile(r'^(:{3,})\s*$')
_re_ipynb_link = re.compile(r'(\]\()(?![a-z][\w+.-]*:)([^)\s#]+\.ipynb)(#[^)\s]*)?(\))')


def _src(x): return ''.join(x) if isinstance(x, list) else (x or '')


def _pandoc_id(text):
    "The id pandoc (so Quarto) gives a heading."
    s = re.sub(r'[^\w\s.-]', '', text.replace('`', '').strip().lower())
    s = re.sub(r'\s+', '-', s)
    return re.sub(r'^[^a-z]+', '', s)


def _docutils_id(text):
    from docutils.nodes import make_id
    return make_id(text.replace('`', ''))


def _cell_options(source):
    "Quarto's leading `#|` options of a code cell, and the source without them."
    lines, opts, i = source.splitlines(), {}, 0
    import yaml
    while i < len(lines) and (m := _re_option.match(lines[i].strip())):
        body = m.group(1).strip()
        if ':' in body:
            k, v = body.split(':', 1)
            try: opts[k.strip()] = yaml.safe_load(v) if v.strip() else None
            except yaml.YAMLError: opts[k.strip()] = v.strip()
        elif body: opts[body.split()[0]] = True  # an nbdev directive such as `hide` or `export`
        i += 1
    return opts, '\n'.join(lines[i:])


def _callouts(md):
    "Quarto's callout blocks (`::: {.callout-note}`) as MyST admonitions (`:::{note}`)."
    if ':::' not in md: return md
    out, stack = [], []
    for line in md.splitlines():
        if (m := _re_callout.match(line)):
            title = re.search(r'title\s*=\s*"([^"]*)"', m.group(3))
            stack.append(m.group(1))
            out += [f"{m.group(1)}{{admonition}} {title.group(1)}", f":class: {m.group(2)}"] if title else [f"{m.group(1)}{{{m.group(2)}}}"]
        elif (m := _re_div_close.match(line)) and stack and len(m.group(1)) >= len(stack[-1]): out.append(stack.pop())
        else: out.append(line)
    return '\n'.join(out)


def _asis_markdown(outputs):
    "Split outputs into the markdown that Quarto's `output: asis` splices into the page, and the rest."
    md, rest = [], []
    for o in outputs:
        if o.get('output_type') == 'stream' and o.get('name') == 'stdout': md.append(_src(o.get('text')))
        elif o.get('output_type') in ('display_data', 'execute_result'):
            d = o.get('data', {})
            if 'text/markdown' in d: md.append(_src(d['text/markdown']))
            elif 'text/html' in d: md.append(_src(d['text/html']))
            elif set(d) == {'text/plain'}: md.append(_src(d['text/plain']))
            else: rest.append(o)
        else: rest.append(o)
    return '\n\n'.join(s.strip('\n') for s in md if s.strip()), rest


@dataclass
class Page:
    nb: str  # notebook path relative to nbs/, posix
    proc: Path  # nbdev's processed notebook
    docname: str = ''  # output-file without .html, relative to the site root
    title: str = ''
    description: str = ''
    nbjson: dict = field(default_factory=dict)

    @property
    def prefix(self): return '../' * self.docname.count('/')  # from this page to the site root


class Stager:
    "Turns nbdev's processed notebooks into notebooks myst-nb renders the way Quarto would."

    def __init__(self, cfg, pages):
        self.cfg, self.pages = cfg, pages
        self.by_nb = {p.nb: p for p in pages}
        self.doc_site = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/') + '/'
        self.git_blob = f"{cfg.get('git_url', '').rstrip('/')}/blob/{cfg.get('branch', 'main')}/"
        self.sources = set()  # module paths the `[source]` links point to

    # -- links ---------------------------------------------------------------------------------
    def links(self, md, page):
        "nbdev's absolute doc links and links to notebooks become links between the pages of this site."
        if self.doc_site != '/':  # link targets only: `](https://user.github.io/repo/x.html` and `href="..."`
            md = re.sub(r'(\]\(|href=")' + re.escape(self.doc_site), lambda m: m.group(1) + page.prefix, md)

        def nb_link(m):
            target = (PurePosixPath(page.nb).parent / m.group(2)).as_posix()
            target = os.path.normpath(target).replace(os.sep, '/')
            p = self.by_nb.get(target)
            if p is None: return m.group(0)  # left for the link check to report
            return f"{m.group(1)}{page.prefix}{p.docname}.html{m.group(3) or ''}{m.group(4)}"
        return _re_ipynb_link.sub(nb_link, md)

    def source_link(self, m, page):
        url = m.group(1)
        if url.startswith(self.git_blob):
            path, _, line = url[len(self.git_blob):].partition('#')
            lib = str(self.cfg.get('lib_path', ''))
            if path.endswith('.py') and (ROOT / path).is_file() and path.startswith(Path(lib).name + '/'):
                self.sources.add(path)
                href = f"{page.prefix}{SOURCE_DIR}/{path}.html" + (f"#{line}" if line else '')
                return f'<a class="reference external nbdev-source" href="{html.escape(href)}">source</a>'
        return '<span class="nbdev-source">source</span>'  # no local target: plain text, never a broken link

    # -- `output: asis` markdown (show_doc) ------------------------------------------------------
    def asis(self, md, page, extra_ids, seen_ids):
        "Quarto-only syntax in spliced markdown made MyST: no leading rule, no pandoc attributes, nbdev's ids."
        md = re.sub(r'\A\s*(?:---\s*\n)+', '', md)  # show_doc's leading rule: a transition docutils rejects here
        md = _re_source_link.sub(lambda m: self.source_link(m, page), md)
        md = _re_pandoc_attrs.sub('', md)
        out, fence, first = [], None, True
        for line in md.splitlines():
            if fence:
                if line.strip().startswith(fence): fence = None
            elif (f := _re_fence.match(line)): fence = f.group(1)
            elif (h := _re_heading.match(line)):
                text = h.group(2)
                ids = [text.replace('`', '').lower(), _pandoc_id(text)] + extra_ids
                own = _docutils_id(text)
                spans = []
                for i in dict.fromkeys(ids):
                    if i and i != own and i not in seen_ids:
                        seen_ids.add(i)
                        spans.append(f'<span class="nbdev-anchor" id="{html.escape(i)}"></span>')
                extra_ids = []
                # the first heading's anchors go before what precedes it (show_doc's `[source]` link)
                if spans: out[0 if first else len(out):0 if first else len(out)] = [''.join(spans), '']
                first = False
            out.append(line)
        return self.links('\n'.join(out), page)

    # -- one notebook --------------------------------------------------------------------------
    def stage(self, page):
        import nbformat
        nb = page.nbjson
        cells, seen_ids = [], set()
        title_md = f"# {page.title}\n"
        if page.description:
            title_md += f"\n````{{container}} description\n{self.links(page.description, page)}\n````\n"
        cells.append(nbformat.v4.new_markdown_cell(title_md))
        for c in nb['cells']:
            if c['cell_type'] == 'markdown':
                c['source'] = self.links(_callouts(_src(c.get('source'))), page)
                cells.append(c); continue
            if c['cell_type'] != 'code': cells.append(c); continue
            opts, source = _cell_options(_src(c.get('source')))
            c['source'] = source
            md_cell = None
            tags = list(c.get('metadata', {}).get('tags', []))
            outputs = c.get('outputs', [])
            if opts.get('warning') is False:
                outputs = [o for o in outputs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
            if opts.get('include') is False: tags.append('remove-cell')
            if opts.get('echo') is False: tags.append('remove-input')
            if opts.get('output') is False: tags.append('remove-output')
            elif opts.get('output') == 'asis' and opts.get('include') is not False:
                md, outputs = _asis_markdown(outputs)
                extra = [a.lower() for a in _re_showdoc_arg.findall(source)]
                if md: md_cell = nbformat.v4.new_markdown_cell(self.asis(md, page, extra, seen_ids))
            if opts.get('code-fold') is True: tags.append('hide-input')
            figure = {k: str(opts[q]) for k, q in (('caption', 'fig-cap'), ('name', 'label')) if opts.get(q)}
            if figure: c.setdefault('metadata', {}).setdefault('mystnb', {})['figure'] = figure
            alt = opts.get('fig-alt') or (figure and re.sub(r'[*_`]', '', figure.get('caption', '')))
            if alt: c.setdefault('metadata', {}).setdefault('mystnb', {})['image'] = {'alt': str(alt)}
            for o in outputs:  # nbdev's links in markdown outputs, as in markdown cells
                d = o.get('data', {})
                if 'text/markdown' in d: d['text/markdown'] = self.links(_src(d['text/markdown']), page)
            c['outputs'] = outputs
            c.setdefault('metadata', {})
            if tags: c['metadata']['tags'] = list(dict.fromkeys(tags))
            shows_input = source.strip() and 'remove-input' not in tags
            if 'remove-cell' in tags or shows_input or (outputs and 'remove-output' not in tags): cells.append(c)
            if md_cell is not None: cells.append(md_cell)
        nb['cells'] = cells
        md = nb.setdefault('metadata', {})
        md.pop('widgets', None)
        md.setdefault('kernelspec', {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'})
        md.setdefault('language_info', {'name': 'python', 'pygments_lexer': 'ipython3'})
        if page.description:  # the page's <meta name="description">, as Quarto writes it
            plain = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', page.description).replace('`', '')
            md.setdefault('myst', {}).setdefault('html_meta', {})['description'] = plain
        return nb


def load_pages(order, proc: Path, nbs_path: Path):
    import json
    pages, names = [], {}
    for nb in order:
        p = Page(nb=nb, proc=proc / nb)
        if not p.proc.exists(): raise DocsError(f"nbdev wrote no processed copy of {nbs_path.name}/{nb}")
        p.nbjson = json.loads(p.proc.read_text(encoding='utf-8'))
        cells = p.nbjson.get('cells', [])
        fm = {}
        if cells and cells[0]['cell_type'] in ('markdown', 'raw') and (m := _re_frontmatter.match(_src(cells[0]['source']))):
            import yaml
            try: fm = yaml.safe_load(m.group(1) or '') or {}
            except yaml.YAMLError as e: raise DocsError(f"{nbs_path.name}/{nb}: front matter is not YAML: {e}") from e
            cells.pop(0)
        p.title = str(fm.get('title') or '').strip()
        if not p.title:
            raise DocsError(f"{nbs_path.name}/{nb} has no title: give it front matter (title, description, output-file)")
        p.description = str(fm.get('description') or '').strip()
        out = str(fm.get('output-file') or PurePosixPath(nb).with_suffix('.html').name)
        if not out.endswith('.html') or '/' in out:
            raise DocsError(f"{nbs_path.name}/{nb}: output-file must be a file name ending in .html, got {out!r}")
        p.docname = (PurePosixPath(nb).parent / out[:-len('.html')]).as_posix().removeprefix('./')
        if p.docname in names:
            raise DocsError(f"{nbs_path.name}/{nb} and {nbs_path.name}/{names[p.docname]} both write {p.docname}.html")
        names[p.docname] = nb
        pages.append(p)
    if 'index' not in names: raise DocsError("no notebook has `output-file: index.html`: the site needs a home page")
    return pages


def toctree_cells(groups, pages, root):
    "Hidden toctrees in the home page: furo's sidebar then lists the pages in `sidebar.yml`'s order."
    import nbformat
    by_nb = {p.nb: p for p in pages}
    cells = []
    for caption, entries in groups:
        names = ['self' if by_nb[e] is root else by_nb[e].docname for e in entries]
        opts = ':hidden:\n' + (f':caption: {caption}\n' if caption else '')
        cells.append(nbformat.v4.new_markdown_cell(f"```{{toctree}}\n{opts}\n" + '\n'.join(names) + "\n```"))
    return cells


def write_source_pages(paths, dest: Path, title):
    "Highlighted module sources with `#L<n>` line ids, the targets of nbdev's `[source]` links offline."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    fmt = HtmlFormatter(linenos='inline', linespans='L', cssclass='highlight')
    css = fmt.get_style_defs('.highlight')
    for path in sorted(paths):
        code = (ROOT / path).read_text(encoding='utf-8')
        body = re.sub(r'<span id="L-(\d+)">', r'<span id="L\1">', highlight(code, PythonLexer(), fmt))
        up = '../' * (path.count('/') + 1)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{html.escape(path)} - {html.escape(title)}</title><style>{css}\n'
                'body{font-family:sans-serif;margin:1rem 2rem}pre{font-size:13px;line-height:1.4}'
                '.highlight span[id]{scroll-margin-top:30vh}.highlight span[id]:target{background:#fff3b0}</style></head>'
                f'<body><p><a href="{up}index.html">{html.escape(title)}</a> / <code>{html.escape(path)}</code></p>'
                f'{body}</body></html>\n')
        out = dest / SOURCE_DIR / f'{path}.html'
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding='utf-8')


# ----------------------------------------------------------------------------------------------
# Sphinx and the link check
# ----------------------------------------------------------------------------------------------

def run_sphinx(src: Path, out: Path, doctrees: Path, overrides, verbose):
    from sphinx.application import Sphinx
    from sphinx.util.docutils import docutils_namespace, patch_docutils
    with patch_docutils(CONF_DIR), docutils_namespace():
        app = Sphinx(src, CONF_DIR, out, doctrees, 'html', confoverrides=overrides,
                     status=sys.stdout if verbose else None, warning=sys.stderr,
                     warningiserror=True, keep_going=True, verbosity=int(verbose))
        app.build(force_all=True)
    if app.statuscode: raise DocsError("Sphinx reported warnings (treated as errors); see above")


_re_a = re.compile(r'<a\b([^>]*?)\bhref="([^"]*)"([^>]*)>(.*?)</a>', re.S)
_re_asset = re.compile(r'<(?:link|script|img|source)\b[^>]*?\b(?:href|src)="([^"]*)"')
_re_id = re.compile(r'\b(?:id|name)="([^"]*)"')


def _local(href):
    u = urlsplit(href)
    if u.scheme or u.netloc or href.startswith('//'): return None
    return unquote(u.path), unquote(u.fragment)


def check_links(out: Path, sources=None):
    "Every local link and asset resolves; nbdev's code links that would not become plain code."
    sources = sources or {}
    where = lambda f: f"{f.relative_to(out)}" + (f" (from {sources[f.relative_to(out).as_posix()]})" if f.relative_to(out).as_posix() in sources else '')
    files = sorted(out.rglob('*.html'))
    texts = {f: f.read_text(encoding='utf-8') for f in files}
    ids = {f: set(map(html.unescape, _re_id.findall(t))) for f, t in texts.items()}
    broken, degraded = [], []

    def resolve(f, href):
        loc = _local(html.unescape(href))
        if loc is None: return True
        path, frag = loc
        target = (f.parent / path).resolve() if path else f
        if path.endswith('/'): target = target / 'index.html'
        if not target.exists(): return False
        if frag and target.suffix == '.html':
            if target not in ids: ids[target] = set(_re_id.findall(target.read_text(encoding='utf-8')))
            return frag in ids[target]
        return True

    for f, t in texts.items():
        def fix(m):
            if resolve(f, m.group(2)): return m.group(0)
            inner = m.group(4).strip()
            if inner.startswith('<code') and inner.endswith('</code>'):
                degraded.append(f"{f.relative_to(out)}: {m.group(2)}")
                return m.group(4)
            broken.append(f"{where(f)}: link {m.group(2)} ({re.sub('<[^>]+>', '', m.group(4)).strip()!r})")
            return m.group(0)
        new = _re_a.sub(fix, t)
        for src in _re_asset.findall(t):
            if not resolve(f, src): broken.append(f"{where(f)}: asset {src}")
        if new != t: f.write_text(new, encoding='utf-8')
    if broken: raise DocsError("broken links in the built site:\n  " + "\n  ".join(broken))
    return degraded


# ----------------------------------------------------------------------------------------------

def build(sidebar=None, verbose=False):
    t0 = time.perf_counter()
    os.chdir(ROOT)
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    cfg = get_config()
    nbs_path, doc_path = Path(cfg.nbs_path), Path(cfg.doc_path)
    sidebar = Path(sidebar) if sidebar else nbs_path / 'sidebar.yml'
    groups = read_sidebar(sidebar)
    notebooks = sorted(Path(p).relative_to(nbs_path).as_posix() for p in nbglob(nbs_path))
    check_sidebar(groups, nbs_path, sidebar, notebooks)
    order = [e for _, es in groups for e in es]

    proc = process_notebooks()
    pages = load_pages(order, proc, nbs_path)
    root = next(p for p in pages if p.docname == 'index')
    stager = Stager(cfg, pages)
    import nbformat
    with tempfile.TemporaryDirectory(prefix='build_docs_') as tmp:
        tmp = Path(tmp)
        src, static, extra, out = tmp / 'src', tmp / 'static', tmp / 'extra', tmp / 'html'
        # assets next to the notebooks (images and the like), as nbdev copied them to _proc
        skip = {'.ipynb', '.md', '.qmd', '.rst', '.yml', '.yaml', '.css', '.py'}
        for f in proc.rglob('*'):
            if f.is_file() and f.suffix not in skip and not any(x.startswith(('.', '_')) for x in f.relative_to(proc).parts):
                (src / f.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, src / f.relative_to(proc))
        for p in pages:
            nb = stager.stage(p)
            if p is root: nb['cells'] += toctree_cells(groups, pages, root)
            dest = src / f'{p.docname}.ipynb'
            dest.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nbformat.from_dict(nb), dest)
        static.mkdir()
        shutil.copy2(CONF_DIR / 'site.css', static / 'site.css')
        styles = nbs_path / 'styles.css'
        (static / 'styles.css').write_text(styles.read_text(encoding='utf-8') if styles.exists() else '', encoding='utf-8')
        write_source_pages(stager.sources, extra, cfg.get('title', cfg.get('lib_name', '')))
        title = cfg.get('title', cfg.get('lib_name', ''))
        overrides = dict(project=title, html_title=title, copyright=cfg.get('copyright', ''),
                         html_static_path=[str(static)], html_extra_path=[str(extra)] if stager.sources else [])
        run_sphinx(src, out, tmp / 'doctrees', overrides, verbose)
        degraded = check_links(out, {f'{p.docname}.html': f'{nbs_path.name}/{p.nb}' for p in pages})
        if (out / '_sources').is_dir() and not any((out / '_sources').iterdir()): (out / '_sources').rmdir()
        if doc_path.exists(): shutil.rmtree(doc_path)
        shutil.copytree(out, doc_path)
    for d in degraded: print(f"note: doc link without a target shown as plain code: {d}")
    secs = time.perf_counter() - t0
    print(f"Built {len(pages)} pages into {doc_path.relative_to(ROOT) if doc_path.is_absolute() else doc_path}/ "
          f"in {secs:.1f} s. Preview: python -m http.server -d {doc_path.name}")
    return pages


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--sidebar', help='sidebar.yml giving the reading order (default: nbs/sidebar.yml)')
    ap.add_argument('--verbose', action='store_true', help="show Sphinx's progress")
    args = ap.parse_args(argv)
    try: build(args.sidebar, args.verbose)
    except DocsError as e:
        print(f"build_docs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
