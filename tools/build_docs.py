#!/usr/bin/env python
"""Build the documentation site into `_docs/` without Quarto.

nbdev renders its docs with Quarto (`nbdev_docs`); this script is the offline equivalent:

1. Each chapter `nbs/sidebar.yml` lists (the file Quarto reads for its sidebar) goes through nbdev's own doc
   processing, as `nbdev_proc_nbs` runs it: cells flagged `export`, `exporti`, `hide` or `default_exp` are
   dropped, `show_doc` entries are added and run, names in backticks become doc links.
2. What nbdev leaves for Quarto is translated for myst-nb, and only what the notebooks use: the front matter
   gives the title, the description and `<meta name="description">`; the `#| echo: false` + `#| output: asis`
   cells nbdev writes for `show_doc` become the markdown they print, with the anchors nbdev's links expect;
   `#| fig-alt` becomes the image's alt text; `#| eval: false` needs nothing. Any other Quarto option fails
   the build (`TRANSLATED` in tools/_nbread.py). nbdev's absolute doc links become links between pages, and its
   `[source]` links point to highlighted module sources shipped with the site. In `show_doc`'s entries, the
   signature shows the annotations as the source writes them (`Optional[KVCache]`, none made up from a default)
   and Google-style docstring sections (`Args:`, `Shape:`, `Example::`, ...) become field lists and code blocks.
3. Sphinx renders the pages with myst-nb (stored outputs, no execution) and furo, warnings as errors, in
   `sidebar.yml`'s order.
4. Every local link and asset of the built site is checked; doc links without a target become plain code,
   any other broken link fails the build.

Usage: `python tools/build_docs.py [--sidebar PATH] [--out DIR] [--verbose]`. Preview: `python -m http.server -d _docs`.
"""
import argparse, ast, html, inspect, io, os, re, shutil, sys, tempfile, textwrap, time, tokenize
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbdev.showdoc
import nbformat
from nbdev.config import get_config

from _nbread import NotebookError, code, front_matter, printed_markdown, process, quarto_options

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / 'tools' / 'docs_sphinx'
SOURCE_DIR = '_source'  # where the site keeps highlighted module sources for `[source]` links


class DocsError(NotebookError):
    "A problem with the docs sources; the message says which file and what to change."


@dataclass
class Page:
    nb: str  # the notebook, relative to nbs/
    docname: str  # its `output-file`, without `.html`
    title: str
    description: str  # as the notebook's front matter gives it


def _rel(path): return Path(path).resolve().relative_to(ROOT) if Path(path).resolve().is_relative_to(ROOT) else path


def read_sidebar(path: Path) -> list:
    "The notebooks a Quarto `sidebar.yml` lists, in order: a flat list of names relative to nbs/."
    import yaml
    try: data = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    except FileNotFoundError: raise DocsError(f"{path} not found: it lists the chapters in reading order") from None
    entries = ((data.get('website') or {}).get('sidebar') or {}).get('contents') or []
    if not entries or not all(isinstance(e, str) for e in entries):
        raise DocsError(f"{_rel(path)}: website.sidebar.contents must list the notebooks by name, got {entries!r}")
    return entries


def chapters(sidebar=None) -> list:
    "The pages of the site in `sidebar.yml`'s order, after checking that it lists each notebook once."
    from nbdev.doclinks import nbglob
    nbs = get_config(path=ROOT).path('nbs_path')
    sidebar = Path(sidebar) if sidebar else nbs / 'sidebar.yml'
    listed = read_sidebar(sidebar)
    notebooks = [Path(p).relative_to(nbs).as_posix() for p in nbglob(nbs)]
    problems = [f"lists {e} more than once" for e in sorted({e for e in listed if listed.count(e) > 1})]
    problems += [f"lists {e}, which is not a notebook nbdev processes in nbs/" for e in listed if e not in notebooks]
    problems += [f"does not list nbs/{nb}: add it in reading order" for nb in notebooks if nb not in listed]
    if problems: raise DocsError(f"{_rel(sidebar)}:\n  " + "\n  ".join(problems))
    pages = []
    for name in listed:
        try: fm = front_matter(nbformat.read(nbs / name, as_version=4))
        except Exception as e: raise DocsError(f"nbs/{name}: cannot read its front matter: {e}") from e
        out = str(fm.get('output-file') or Path(name).with_suffix('.html').name)
        if not fm.get('title') or not out.endswith('.html') or '/' in out:
            raise DocsError(f"nbs/{name}: its front matter needs a title and an output-file such as base.html, "
                            f"got {fm}")
        description = str(fm.get('description') or '').strip()
        pages.append(Page(name, out[:-len('.html')], str(fm['title']).strip(), description))
    names = [p.docname for p in pages]
    if len(set(names)) < len(names): raise DocsError(f"two notebooks write the same page: {names}")
    if 'index' not in names: raise DocsError("no notebook has `output-file: index.html`: the site needs a home page")
    return pages


# ----------------------------------------------------------------------------------------------
# Staging: nbdev's processed notebooks -> notebooks myst-nb renders
# ----------------------------------------------------------------------------------------------

_re_source_link = re.compile(r'\[source\]\(([^)\s]+)\)(\{[^{}\n]*\})?')  # show_doc's, with pandoc attributes
_re_fence = re.compile(r'^\s*(`{3,}|~{3,})')
_re_heading = re.compile(r'^#{1,6}\s+(.*?)\s*$')


# Docstrings are written as torch's: Google-style sections, a header such as `Args:` and an indented block of
# entries `name (type): text`. Markdown reads that block as code, so each section becomes a MyST field list (as
# Sphinx's napoleon renders them): entries as a bulleted list, `Example::` (`>>>` lines) as a code block.
_re_section = re.compile(r'^(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Attributes|'
                         r'Raises|Warns|Returns|Return|Yields|Shape|Shapes|Inputs|Outputs|Examples?|Notes?|Warnings?|'
                         r'See Also|References):(:?)\s*$')
_ENTRIES = {'Args', 'Arguments', 'Parameters', 'Keyword Args', 'Keyword Arguments', 'Other Parameters', 'Attributes',
            'Raises', 'Warns'}
_re_entry = re.compile(r'^(?P<name>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\((?P<type>(?:[^()]|\([^()]*\))*)\))?'
                       r'\s*:\s+(?P<text>.*)$')


def _section_body(name: str, literal: bool, body: str) -> str:
    "One section's dedented block as MyST: a code block, a list of `name (type): text` entries, or as written."
    if literal or (name.startswith('Example') and body.lstrip().startswith('>>>')):
        return f"```{'pycon' if '>>>' in body else 'python'}\n{body}\n```"
    if name not in _ENTRIES: return body  # prose, or a `- ...` list already (`Shape:`)
    entries = []
    for line in body.splitlines():  # an entry starts at column 0; indented lines continue it
        if line[:1].isspace() and entries: entries[-1] += ' ' + line.strip()
        elif line.strip(): entries.append(line.strip().removeprefix('- '))
    items = [(f"**{m['name']}**" + (f" (*{m['type'].strip()}*)" if m['type'] else '') + f" – {m['text']}")
             if (m := _re_entry.match(e)) else e for e in entries]
    return '\n'.join(f'- {i}' for i in items)


def docstring_sections(md: str) -> str:
    "Google-style docstring sections in show_doc's markdown (outside code fences) as MyST field lists."
    lines, out, i, fence = md.splitlines(), [], 0, None
    while i < len(lines):
        line, i = lines[i], i + 1
        if fence: fence = None if line.strip().startswith(fence) else fence
        elif (f := _re_fence.match(line)): fence = f.group(1)
        if fence or not (m := _re_section.match(line)): out.append(line); continue
        j = i
        while j < len(lines) and (not lines[j].strip() or lines[j][:1].isspace()): j += 1
        block = textwrap.dedent('\n'.join(lines[i:j])).strip('\n')
        if not block: out.append(line); continue  # a line such as `Returns:` with nothing indented under it
        body = _section_body(m.group(1), bool(m.group(2)), block)
        out += [f':{m.group(1)}:', *(f'  {b}' if b.strip() else '' for b in body.splitlines()), '']
        i = j
    return '\n'.join(out)


def _comments_above_def(f) -> set:
    "The comments on a function's decorator lines, which fastcore's docments takes for its first line's parameters."
    try:
        src = textwrap.dedent(inspect.getsource(f))
        tree = ast.parse(src).body
        start = tree[0].lineno if tree and hasattr(tree[0], 'decorator_list') else 0  # the `def` line
        return {t.string.lstrip('#').strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT and t.start[0] < start}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError): return set()  # no source, or not a whole `def`


def short_annotation(anno) -> str:
    "An annotation as a signature shows it: `typing.Optional[additive_pos_attn.base.KVCache]` -> `Optional[KVCache]`."
    text = anno if isinstance(anno, str) else inspect.formatannotation(anno)
    text = re.sub(r'\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])', '', text)
    return re.sub(r'\bNoneType\b', 'None', text)  # `Callable[[int], None]` reads `NoneType` otherwise


def docs_renderer():
    """nbdev's show_doc renderer with the signature as the source writes it. fastcore's shows `Optional[KVCache]` as
    `Optional`, gives a parameter without annotation its default's type (`cache:NoneType=None`) and takes a comment
    on a decorator line for the description of the `def` line's last parameter."""
    from fastcore.docments import DocmentText, _fmt_default
    from nbdev.showdoc import BasicMarkdownRenderer
    empty = inspect.Parameter.empty

    class Signature(DocmentText):
        def __init__(self, obj, **kwargs):
            super().__init__(obj, **kwargs)
            # the function docments reads: a class's __init__, unless it is a dataclass
            f = obj.__init__ if inspect.isclass(obj) and not hasattr(obj, '__dataclass_fields__') else obj
            try: written = inspect.signature(f).parameters
            except (TypeError, ValueError): written = {}
            stray = _comments_above_def(f)
            for name, p in self.dm.items():
                if name in written and written[name].annotation is empty: p['anno'] = empty
                if p.get('docment') and {ln.strip() for ln in p['docment'].splitlines()} <= stray: p['docment'] = None

        def _fmt_param(self, nm, p):
            pre = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}.get(p.get('kind'), '')
            anno, default = p.get('anno', empty), p.get('default', empty)
            return (pre + nm + (f':{short_annotation(anno)}' if anno is not empty else '')
                    + (f'={_fmt_default(default)}' if default is not empty else ''))

        @property
        def _ret_str(self):
            ret = self.dm.get('return', {})
            anno = f"->{short_annotation(ret['anno'])}" if ret.get('anno', empty) is not empty else ''
            return f"){anno}:" + (f" # {ret['docment']}" if ret.get('docment') else '')

    class Renderer(BasicMarkdownRenderer):
        def __init__(self, sym, name=None, title_level=3, maxline=110):
            super().__init__(sym, name=name, title_level=title_level, maxline=maxline)
            self.dm = Signature(self.sym, maxline=maxline, docstring=False)
    return Renderer


class Stager:
    def __init__(self, cfg):
        self.doc_site = re.escape(f"{cfg.doc_host}{cfg.doc_baseurl}".rstrip('/') + '/')
        self.git_blob = f"{cfg.git_url.rstrip('/')}/blob/{cfg.branch}/"
        self.lib = Path(cfg.lib_path).name
        self.sources = set()  # the module paths `[source]` links point to

    def links(self, md: str) -> str:
        "nbdev's absolute doc links (`https://user.github.io/repo/base.html#x`) as links between the pages."
        return re.sub(r'(\]\(|href=")' + self.doc_site, r'\1', md)

    def source_link(self, m) -> str:
        path, _, line = m.group(1).removeprefix(self.git_blob).partition('#')
        if m.group(1).startswith(self.git_blob) and path.startswith(self.lib + '/') and (ROOT / path).is_file():
            self.sources.add(path)
            href = f"{SOURCE_DIR}/{path}.html" + (f"#{line}" if line else '')
            return f'<a class="reference external nbdev-source" href="{html.escape(href)}">source</a>'
        return '<span class="nbdev-source">source</span>'  # no local target: plain text, never a broken link

    def show_doc(self, md: str, seen: set) -> str:
        "show_doc's markdown as MyST: no leading rule, local `[source]` links, an anchor with nbdev's id per heading."
        from docutils.nodes import make_id
        md = self.links(_re_source_link.sub(self.source_link, re.sub(r'\A\s*(?:---\s*\n)+', '', md)))
        md = docstring_sections(md)
        out, fence, first = [], None, True
        for line in md.splitlines():
            if fence: fence = None if line.strip().startswith(fence) else fence
            elif (f := _re_fence.match(line)): fence = f.group(1)
            elif (h := _re_heading.match(line)):
                # nbdev links to `base.html#check_bool`; docutils gives the heading `check-bool`. The entry's
                # first anchor goes above what precedes its heading: show_doc's `[source]` link.
                if (i := h.group(1).replace('`', '').lower()) not in seen | {make_id(i)}:
                    seen.add(i)
                    out.insert(0 if first else len(out), f'<span class="nbdev-anchor" id="{html.escape(i)}"></span>\n')
                first = False
            out.append(line)
        return '\n'.join(out)

    def stage(self, page: Page, nb, where: str):
        "The processed notebook `nb` made ready for myst-nb; `where` names its source in errors."
        head = f"# {page.title}\n"
        fm = front_matter(nb)  # the processed front matter, whose description nbdev has linked
        if fm: nb.cells.pop(0)
        if description := str(fm.get('description') or '').strip():
            head += f"\n````{{container}} description\n{self.links(description)}\n````\n"
            plain = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', description).replace('`', '')
            nb.metadata.setdefault('myst', {})['html_meta'] = {'description': plain}
        cells, seen = [nbformat.v4.new_markdown_cell(head)], set()
        for c in nb.cells:
            if c.cell_type == 'markdown': c.source = self.links(c.source)
            if c.cell_type != 'code':
                cells.append(c)
                continue
            opts = quarto_options(c, f"{where}, the cell {code(c).strip()[:40]!r}")
            if opts.get('output') == 'asis':  # nbdev's show_doc cells
                cells.append(nbformat.v4.new_markdown_cell(self.show_doc(printed_markdown(c), seen)))
                continue
            c.source = code(c)
            if opts.get('echo') == 'false': c.metadata['tags'] = c.metadata.get('tags', []) + ['remove-input']
            if 'fig-alt' in opts: c.metadata['mystnb'] = {'image': {'alt': opts['fig-alt']}}
            for o in c.outputs:
                if 'text/markdown' in o.get('data', {}): o.data['text/markdown'] = self.links(o.data['text/markdown'])
            cells.append(c)
        nb.cells = cells
        nb.metadata.pop('widgets', None)
        nb.metadata.setdefault('language_info', {'name': 'python', 'pygments_lexer': 'ipython3'})
        return nb


def write_source_pages(paths, dest: Path, title: str):
    "Highlighted module sources with `#L<n>` line ids, the targets of nbdev's `[source]` links offline."
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    fmt = HtmlFormatter(linenos='inline', linespans='L', cssclass='highlight')
    for path in sorted(paths):
        body = highlight((ROOT / path).read_text(encoding='utf-8'), PythonLexer(), fmt)
        body = re.sub(r'<span id="L-(\d+)">', r'<span id="L\1">', body)
        up = '../' * (path.count('/') + 1)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>{html.escape(path)} - {html.escape(title)}</title><style>{fmt.get_style_defs(".highlight")}\n'
                'body{font-family:sans-serif;margin:1rem 2rem}pre{font-size:13px;line-height:1.4}'
                '.highlight span[id]{scroll-margin-top:30vh}.highlight span[id]:target{background:#fff3b0}'
                '</style></head>'
                f'<body><p><a href="{up}index.html">{html.escape(title)}</a> / <code>{html.escape(path)}</code></p>'
                f'{body}</body></html>\n')
        out = dest / SOURCE_DIR / f'{path}.html'
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding='utf-8')


# ----------------------------------------------------------------------------------------------
# Sphinx and the link check
# ----------------------------------------------------------------------------------------------

def run_sphinx(src: Path, out: Path, doctrees: Path, overrides: dict, verbose: bool):
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


def check_links(out: Path, sources: dict) -> list:
    "Every local link and asset resolves; doc links in code that do not become plain code. Returns those."
    ids = {}

    def resolves(f: Path, href: str) -> bool:
        u = urlsplit(html.unescape(href))
        if u.scheme or u.netloc: return True
        target = (f.parent / unquote(u.path)).resolve() if u.path else f
        if not target.exists(): return False
        if u.fragment and target.suffix == '.html':
            if target not in ids:
                ids[target] = set(map(html.unescape, _re_id.findall(target.read_text(encoding='utf-8'))))
            return unquote(u.fragment) in ids[target]
        return True

    broken, degraded = [], []
    for f in sorted(out.rglob('*.html')):
        rel, text = f.relative_to(out).as_posix(), f.read_text(encoding='utf-8')
        where = rel + (f" (from {sources[rel]})" if rel in sources else '')

        def fix(m):
            if resolves(f, m.group(2)): return m.group(0)
            if m.group(4).strip().startswith('<code') and m.group(4).strip().endswith('</code>'):
                degraded.append(f"{rel}: {m.group(2)}")
                return m.group(4)
            broken.append(f"{where}: link {m.group(2)} ({re.sub('<[^>]+>', '', m.group(4)).strip()!r})")
            return m.group(0)
        new = _re_a.sub(fix, text)
        broken += [f"{where}: asset {a}" for a in _re_asset.findall(text) if not resolves(f, a)]
        if new != text: f.write_text(new, encoding='utf-8')
    if broken: raise DocsError("broken links in the built site:\n  " + "\n  ".join(broken))
    return degraded


# ----------------------------------------------------------------------------------------------

def build(sidebar=None, out=None, verbose=False) -> list:
    "Build the site into `out` (default: settings.ini's doc_path); return its pages in reading order."
    t0, out = time.perf_counter(), Path(out).resolve() if out else None
    os.chdir(ROOT)  # nbdev runs the notebooks' imports and show_doc cells from here, as `nbdev_proc_nbs` does
    cfg = get_config(path=ROOT)
    nbs, out = _rel(cfg.path('nbs_path')), out or cfg.path('doc_path')
    pages = chapters(sidebar)
    stager = Stager(cfg)
    nbdev.showdoc.BasicMarkdownRenderer = docs_renderer()  # show_doc's default renderer, when settings.ini names none
    with tempfile.TemporaryDirectory(prefix='build_docs_') as tmp:
        tmp = Path(tmp)
        src, static, extra, html_dir = tmp / 'src', tmp / 'static', tmp / 'extra', tmp / 'html'
        src.mkdir()
        for p in pages:
            process(nbs / p.nb, tmp / p.nb)  # nbs/ is relative: errors name nbs/<notebook>
            nb = stager.stage(p, nbformat.read(tmp / p.nb, as_version=4), f"nbs/{p.nb}")
            if p.docname == 'index':  # furo's sidebar lists the pages in the order of this hidden toctree
                names = '\n'.join('self' if q is p else q.docname for q in pages)
                nb.cells.append(nbformat.v4.new_markdown_cell(f"```{{toctree}}\n:hidden:\n\n{names}\n```"))
            nbformat.write(nb, src / f'{p.docname}.ipynb')
        static.mkdir()
        shutil.copy2(CONF_DIR / 'site.css', static / 'site.css')
        styles = nbs / 'styles.css'
        (static / 'styles.css').write_text(styles.read_text(encoding='utf-8') if styles.exists() else '',
                                           encoding='utf-8')
        write_source_pages(stager.sources, extra, cfg.title)
        overrides = dict(project=cfg.title, html_title=cfg.title, copyright=cfg.copyright,
                         html_static_path=[str(static)], html_extra_path=[str(extra)] if stager.sources else [])
        run_sphinx(src, html_dir, tmp / 'doctrees', overrides, verbose)
        degraded = check_links(html_dir, {f'{p.docname}.html': f'nbs/{p.nb}' for p in pages})
        if out.exists(): shutil.rmtree(out)
        (html_dir / '_sources').rmdir()  # empty: the site ships no page sources
        shutil.copytree(html_dir, out)
    for d in degraded: print(f"note: doc link without a target shown as plain code: {d}")
    print(f"Built {len(pages)} pages into {_rel(out)}/ in {time.perf_counter() - t0:.1f} s. "
          f"Preview: python -m http.server -d {_rel(out)}")
    return pages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--sidebar', help='sidebar.yml giving the reading order (default: nbs/sidebar.yml)')
    ap.add_argument('--out', help="where to write the site (default: settings.ini's doc_path, _docs/)")
    ap.add_argument('--verbose', action='store_true', help="show Sphinx's progress")
    args = ap.parse_args(argv)
    try: build(args.sidebar, args.out, args.verbose)
    except NotebookError as e:
        print(f"build_docs: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
