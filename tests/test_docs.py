"""The offline docs site (`python tools/build_docs.py`): the build's own checks, each cell directive the
notebooks use, and the real site checked in a real browser.

The real site is built once per session into a temporary folder (never `_docs/`), served on 127.0.0.1, and every
page is opened in headless Chromium (Debian's `chromium`, driven by Playwright); the API pages are also checked to
read as docs (docstring sections as lists, signatures as the source writes them, nothing clipped at the column).
Without a browser those tests are skipped with the reason, unless `ADDITIVE_POS_ATTN_REQUIRE_BROWSER=1` (set by
`.ci/run`), which makes that a failure.
`ADDITIVE_POS_ATTN_DOCS_SIDEBAR` may name another `sidebar.yml` while chapters are being written.
"""
import functools
import http.server
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get('ADDITIVE_POS_ATTN_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
REQUIRE_BROWSER = os.environ.get('ADDITIVE_POS_ATTN_REQUIRE_BROWSER') == '1'
SERVER_LIFETIME_S = 600  # the server stops by itself after this, whatever happens to the session
API = {'PositionalAttentionBase': 'additive_pos_attn.base',
       'AdditivePosMultiheadAttention': 'additive_pos_attn.additive'}


def _tools():
    "`tools/build_docs.py` and `tools/_nbread.py`, imported as the scripts import each other."
    if str(ROOT / 'tools') not in sys.path: sys.path.insert(0, str(ROOT / 'tools'))
    import _nbread, build_docs
    return build_docs, _nbread


def _run_build(root=ROOT, *args):
    return subprocess.run([sys.executable, str(root / 'tools' / 'build_docs.py'), *args], cwd=root,
                          capture_output=True, text=True, timeout=900)


def _need_docs_packages():
    missing = [m for m in ('sphinx', 'myst_nb', 'furo') if importlib.util.find_spec(m) is None]
    if missing: pytest.skip(f"docs packages missing ({', '.join(missing)}): pip install -e '.[docs]'")


# ------------------------------------------------------------------------------------------------
# The build's own checks and each directive, on a one-chapter copy of the project
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def mini_project(tmp_path):
    "A copy of the project's settings and tools with a home page and no chapters, to add pages to."
    shutil.copy2(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    shutil.copytree(ROOT / 'tools', tmp_path / 'tools', ignore=shutil.ignore_patterns('__pycache__'))
    nbs = tmp_path / 'nbs'
    nbs.mkdir()
    shutil.copy2(ROOT / 'nbs' / 'styles.css', nbs / 'styles.css')

    def notebook(name, *cells, title='A page', output_file=None, description=None):
        fm = f"---\ntitle: {title}\n" + (f"description: {description}\n" if description else '')
        fm += f"output-file: {output_file or name.replace('.ipynb', '.html')}\n---"
        mk = lambda kind, src, outputs=(): {
            'cell_type': kind, 'metadata': {}, 'source': src,
            **({'outputs': list(outputs), 'execution_count': None} if kind == 'code' else {})}
        nb = {'cells': [mk('markdown', fm)] + [mk(*c) for c in cells], 'metadata': {
            'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}},
              'nbformat': 4, 'nbformat_minor': 5}
        (nbs / name).write_text(json.dumps(nb), encoding='utf-8')

    def sidebar(*names):
        listed = ''.join(f'      - {n}\n' for n in names)
        (nbs / 'sidebar.yml').write_text('website:\n  sidebar:\n    contents:\n' + listed)

    notebook('index.ipynb', ('markdown', 'Home, with maths $x^2$.'), title='Home', output_file='index.html')
    return tmp_path, notebook, sidebar


@pytest.mark.parametrize('cells, listed, messages', [
    pytest.param([('markdown', 'More.')], ['index.ipynb', '02_gone.ipynb', 'index.ipynb'],
                 ['does not list nbs/01_page.ipynb', 'lists 02_gone.ipynb', 'lists index.ipynb more than once'],
                 id='sidebar'),
    pytest.param([('code', 'from nbdev.showdoc import show_doc'), ('code', 'show_doc(no_such_name)')], None,
                 ['nbdev could not process nbs/01_page.ipynb', 'no_such_name'], id='nbdev-error',
                 marks=pytest.mark.slow),
    pytest.param([('code', '1 + 1'), ('code', '#| code-fold: true\nx = 1')], None,
                 ["nbs/01_page.ipynb, the cell 'x = 1': #| code-fold: true is not translated"],
                 id='untranslated-option', marks=pytest.mark.slow),
    pytest.param([('markdown', '```{no-such-directive}\n```')], None, ['no-such-directive', 'treated as errors'],
                 id='sphinx-warning', marks=pytest.mark.slow),
])
def test_build_fails_naming_the_problem(mini_project, cells, listed, messages):
    """A sidebar that does not list each notebook once, a notebook nbdev cannot process, a Quarto option the build
    does not translate and a Sphinx warning each fail the build, with a message that says what to fix."""
    _need_docs_packages()
    root, notebook, sidebar = mini_project
    notebook('01_page.ipynb', *cells)
    sidebar(*(listed or ['index.ipynb', '01_page.ipynb']))
    res = _run_build(root)
    assert res.returncode == 1, res.stdout + res.stderr
    assert all(m in res.stderr for m in messages), res.stderr


PNG = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='


@pytest.mark.slow
def test_directives(mini_project):
    "Each directive the notebooks use, front matter and links, as the page shows them."
    _need_docs_packages()
    root, notebook, sidebar = mini_project
    stream = lambda text: {'output_type': 'stream', 'name': 'stdout', 'text': text}
    figure = {'output_type': 'display_data', 'metadata': {}, 'data': {'image/png': PNG, 'text/plain': '<Figure>'}}
    notebook('01_cells.ipynb',
             ('code', '#| default_exp mini\ndefault_exp_marker = 1'),
             ('code', '#| export\ndef show_me(x):\n    "Docstring with maths $y^2$."\n    return "export_body_marker"'),
             ('code', '#| exporti\ndef _internal(): return "exporti_marker"'),
             ('code', '#| hide\nhide_marker()', [stream('hide_output_marker\n')]),
             ('code', '#| cuda\ncuda_marker()'),
             ('code', '#| eval: false\neval_marker()'),
             ('code', '#| echo: false\necho_marker()', [stream('echo_output_marker\n')]),
             ('code', '#| fig-alt: A one-pixel figure\nplot_marker()', [figure]),
             ('code', 'shown_marker()', [stream('shown_output_marker\n')]),
             ('markdown', 'A doc link to a page this site lacks: `AdditivePosMultiheadAttention`; links home: '
                          '[absolute](https://additive-pos-attn.github.io/additive_pos_attn/index.html), '
                          '[relative](index.html).'),
             title='Cells', output_file='cells.html', description='"The cells, with `code`."')
    sidebar('index.ipynb', '01_cells.ipynb')
    res = _run_build(root)
    assert res.returncode == 0, res.stdout + res.stderr
    page = (root / '_docs' / 'cells.html').read_text(encoding='utf-8')
    assert re.search(r'<h1>Cells<', page)
    assert re.search(r'class="[^"]*description.*The cells, with <code', page, re.S)
    assert '<meta content="The cells, with code." name="description"' in page
    # export, exporti, hide and default_exp cells are left out, code and outputs; export adds show_doc's entry
    for marker in ('default_exp_marker', 'export_body_marker', 'exporti_marker', '_internal', 'hide_marker',
                   'hide_output_marker'):
        assert marker not in page, marker
    # show_doc's entry, with the id nbdev links to (`cells.html#show_me`) beside the one docutils gives (`show-me`)
    assert '<span class="nbdev-anchor" id="show_me"></span>' in page
    assert re.search(r'<section id="show-me">\s*<h\d>show_me<', page)
    assert 'Docstring with maths' in page and 'class="math' in page
    assert 'cuda_marker' in page and 'eval_marker' in page and '#|' not in page
    assert 'echo_marker' not in page and 'echo_output_marker' in page
    img = re.search(r'<img alt="A one-pixel figure" src="([^"]+\.png)"', page)
    assert img and (root / '_docs' / img.group(1)).stat().st_size > 0
    assert 'plot_marker' in page and 'shown_marker' in page and 'shown_output_marker' in page
    # nbdev links the name to additive.html, which this site lacks: plain code, no broken link
    assert 'additive.html' not in page and '<span class="pre">AdditivePosMultiheadAttention</span></code>' in page
    assert 'doc link without a target shown as plain code: cells.html: additive.html' in res.stdout
    assert re.search(r'<a [^>]*href="index.html"[^>]*>absolute</a>', page)
    assert re.search(r'<a [^>]*href="index.html"[^>]*>relative</a>', page)
    assert not (root / '_docs' / '_sources').exists()


DOCSTRING = """*Summary.*

Args:

    embed_dim (int): Model width ``D``.
    device (torch.device, optional): Factory option,
        on two lines.
    kdim, vdim: As for `torch.nn.MultiheadAttention`.

Shape:

    - query: ``(B, T, D)``.

Example::

    >>> layer(x).shape
    torch.Size([2, 10, 64])

```python
Args:
    in a code block: left alone
```"""

DECORATED = """import functools
from typing import Optional
class KVCache: pass
def wraps(f): return functools.wraps(f)(lambda *a, **k: f(*a, **k))
@wraps  # a comment on the decorator line
def forward(query, key, value, *, cache: Optional[KVCache] = None, device=None, scale=1.0,  # how much
            mask: 'Optional[KVCache]' = None) -> 'tuple[int, Optional[int]]':
    "Docstring."
"""


def test_docstring_sections_and_signatures(tmp_path, monkeypatch):
    """show_doc's entries as build_docs renders them: Google-style sections as field lists (entries as a list,
    `Example::` as code), signatures with the annotations the source writes and no decorator comment as a
    parameter's description."""
    build_docs = _tools()[0]
    md = build_docs.docstring_sections(DOCSTRING)
    assert ':Args:\n  - **embed_dim** (*int*) – Model width ``D``.\n' in md
    assert '  - **device** (*torch.device, optional*) – Factory option, on two lines.\n' in md
    assert '  - **kdim, vdim** – As for `torch.nn.MultiheadAttention`.\n' in md
    assert ':Shape:\n  - query: ``(B, T, D)``.\n' in md
    assert ':Example:\n  ```pycon\n  >>> layer(x).shape\n  torch.Size([2, 10, 64])\n  ```\n' in md
    assert md.endswith('```python\nArgs:\n    in a code block: left alone\n```')
    (tmp_path / 'decorated.py').write_text(DECORATED)
    monkeypatch.syspath_prepend(str(tmp_path))
    import decorated
    sig = build_docs.docs_renderer()(decorated.forward)._repr_markdown_()
    assert ('query, key, value, cache:Optional[KVCache]=None, device=None, scale=1.0, # how much\n'
            '    mask:Optional[KVCache]=None\n)->tuple[int, Optional[int]]:') in sig, sig


# ------------------------------------------------------------------------------------------------
# The real site, in a browser
# ------------------------------------------------------------------------------------------------

def _browser_or_skip():
    "Playwright's sync API, or a skip (a failure when the browser is required)."
    reason = None
    try: from playwright.sync_api import sync_playwright
    except ImportError: reason = "playwright is not installed (pip install -e '.[docs]')"
    if reason is None and not Path(CHROMIUM).exists(): reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if reason is None: return sync_playwright
    if REQUIRE_BROWSER: pytest.fail(f"ADDITIVE_POS_ATTN_REQUIRE_BROWSER=1 but {reason}")
    print(f"skipping the browser test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "Build the site once into a temporary folder; return it and its pages in reading order."
    _browser_or_skip()
    _need_docs_packages()
    sidebar = os.environ.get('ADDITIVE_POS_ATTN_DOCS_SIDEBAR')
    out = tmp_path_factory.mktemp('docs') / 'site'
    res = _run_build(ROOT, '--out', str(out), *(['--sidebar', sidebar] if sidebar else []))
    print(res.stdout, res.stderr)
    assert res.returncode == 0, f"python tools/build_docs.py failed:\n{res.stdout}\n{res.stderr}"
    return out, _tools()[0].chapters(sidebar)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture(scope='module')
def server(site):
    "The built site served on 127.0.0.1 from a thread, shut down when the module's tests end (or after a limit)."
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_QuietHandler, directory=str(site[0])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(SERVER_LIFETIME_S, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    try: yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    finally:
        watchdog.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope='module')
def browser(server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


# Text nodes outside code and typeset maths: `$...$` or `\(...\)` here is maths MathJax never saw.
_UNTYPESET_JS = """() => {
  const skip = new Set(['PRE', 'CODE', 'SCRIPT', 'STYLE', 'TEXTAREA', 'MJX-CONTAINER']);
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT, {acceptNode(n) {
    for (let e = n.parentElement; e; e = e.parentElement) if (skip.has(e.tagName)) return NodeFilter.FILTER_REJECT;
    return NodeFilter.FILTER_ACCEPT; }});
  const out = []; let n;
  while ((n = walker.nextNode())) out.push(n.textContent);
  return out.join(' ');
}"""

_PAGE_JS = """() => ({
  images: [...document.images].map(i => ({src: i.src, alt: i.alt, ok: i.complete && i.naturalWidth > 0})),
  math: document.querySelectorAll('.math').length,
  typeset: document.querySelectorAll('mjx-container').length,
  mathWithout: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container'))
                .map(e => e.textContent.slice(0, 80)),
  sidebar: [...document.querySelectorAll('.sidebar-tree a.reference')].map(a => a.getAttribute('href')),
  h1: (document.querySelector('article h1') || {}).textContent || '',
  description: (document.querySelector('article div.description') || {}).textContent || '',
})"""


def _wait_for_mathjax(page):
    ready = "window.MathJax && MathJax.startup && MathJax.startup.promise"
    page.wait_for_function(f"() => !document.querySelector('.math') || ({ready})", timeout=20000)
    page.evaluate(f"() => {ready} ? MathJax.startup.promise.then(() => true) : true")


@pytest.mark.slow
def test_site_in_browser(site, server, browser):
    docs, pages = site
    html_pages = sorted(p.relative_to(docs).as_posix() for p in docs.rglob('*.html') if '_static' not in p.parts)
    assert {f'{p.docname}.html' for p in pages} <= set(html_pages)
    context = browser.new_context(viewport={'width': 1280, 'height': 1000})
    problems, foreign, math_pages = [], set(), 0
    host = urlsplit(server).hostname

    def guard(route):  # nothing may leave 127.0.0.1: record it and answer without the network
        foreign.add(route.request.url)
        route.abort()
    context.route(lambda url: urlsplit(url).scheme in ('http', 'https', 'ws', 'wss') and urlsplit(url).hostname != host,
                  guard)
    page = context.new_page()
    current = {'url': ''}
    page.on('console', lambda m: m.type == 'error' and problems.append(f"{current['url']}: console error: {m.text}"))
    page.on('pageerror', lambda e: problems.append(f"{current['url']}: page error: {e}"))
    page.on('requestfailed',
            lambda r: r.url not in foreign and problems.append(f"{current['url']}: request failed: {r.url}"))
    page.on('response', lambda r: r.status >= 400 and problems.append(f"{current['url']}: HTTP {r.status}: {r.url}"))
    page.on('request', lambda r: urlsplit(r.url).scheme not in ('http', 'https', 'data', 'blob', 'about')
            and foreign.add(r.url))

    from nbdev.processors import _hide_dirs  # the directives whose cells nbdev leaves out of the docs
    nbread = _tools()[1]

    def figures(p):
        "The alt text (fig-alt, else None) of each image output of the cells nbdev shows."
        import nbformat
        cells = [c for c in nbformat.read(ROOT / 'nbs' / p.nb, as_version=4).cells
                 if c.cell_type == 'code' and not nbread.directives(c).keys() & _hide_dirs]
        return [nbread.directives(c).get('fig-alt') for c in cells for o in c.outputs
                if any(k.startswith('image/') for k in o.get('data', {}))]
    expected_sidebar = [f'{p.docname}.html' for p in pages]
    by_page = {f'{p.docname}.html': p for p in pages}
    for rel in html_pages:
        current['url'] = rel
        resp = page.goto(server + rel, wait_until='load')
        assert resp is not None and resp.ok, f"{rel}: {resp and resp.status}"
        _wait_for_mathjax(page)
        info = page.evaluate(_PAGE_JS)
        for img in info['images']:
            if not img['ok']: problems.append(f"{rel}: image did not load: {img['src']}")
        if info['math']:
            math_pages += 1
            if info['typeset'] == 0 or info['mathWithout']:
                problems.append(f"{rel}: maths not typeset: {info['mathWithout'][:3]}")
        text = page.evaluate(_UNTYPESET_JS)
        for pat in (r'\$\$', r'(?<![\w$])\$[^\s$][^$\n]*\$', r'\\\(', r'\\\['):
            if (m := re.search(pat, text)):
                problems.append(f"{rel}: untypeset maths: {text[max(0, m.start() - 30):m.end() + 30]!r}")
        if rel in by_page:
            p = by_page[rel]
            # furo links the current page as '#'; put its own name back to compare the order
            resolved = [rel if h == '#' else h.split('#')[0] for h in info['sidebar']]
            if resolved != expected_sidebar:
                problems.append(f"{rel}: sidebar {resolved} != sidebar.yml order {expected_sidebar}")
            alts = figures(p)
            if len(info['images']) < len(alts):
                problems.append(f"{rel}: {len(info['images'])} images, the notebook stores {len(alts)}")
            for alt in filter(None, alts):
                if alt not in [i['alt'] for i in info['images']]:
                    problems.append(f"{rel}: no image with the fig-alt {alt!r}")
            if info['h1'].rstrip('¶').strip() != p.title: problems.append(f"{rel}: title {info['h1']!r} != {p.title!r}")
            if p.description and not info['description'].strip(): problems.append(f"{rel}: description missing")
    assert math_pages > 0, "no page has maths: the MathJax check checked nothing"
    assert not problems, '\n'.join(problems)
    assert not foreign, f"requests to hosts other than 127.0.0.1: {sorted(foreign)}"

    # every sidebar link resolves
    for href in expected_sidebar:
        resp = page.request.get(server + href)
        assert resp.ok, f"sidebar link {href}: HTTP {resp.status}"
    context.close()


@pytest.mark.slow
def test_api_entries(site, server, browser):
    "nbdev's doc links for the two classes land on their entries: heading, signature, docstring, source link."
    import additive_pos_attn, additive_pos_attn._modidx as modidx
    docs = site[0]
    page = browser.new_page(viewport={'width': 1280, 'height': 1000})
    for name, module in API.items():
        target = modidx.d['syms'][module][f'{module}.{name}'][0]  # e.g. 'additive.html#additiveposmultiheadattention'
        page.goto(server + target, wait_until='load')
        _wait_for_mathjax(page)
        anchor = target.split('#')[1]
        entry = page.evaluate("""(id) => {
            const a = document.getElementById(id); if (!a) return null;
            // the entry is the section the id names or the next one; show_doc's [source] link comes just before it
            let sec = a.tagName === 'SECTION' ? a : (a.closest('p') || a);
            while (sec && sec.tagName !== 'SECTION') sec = sec.nextElementSibling;
            if (!sec) return null;
            let src = null;
            for (let e = sec.previousElementSibling; e && e.tagName !== 'SECTION' && !src; e = e.previousElementSibling)
                src = e.querySelector('a.nbdev-source, span.nbdev-source');
            return {heading: sec.querySelector('h1,h2,h3,h4,h5,h6').textContent,
                    signature: (sec.querySelector('pre') || {}).textContent,
                    text: sec.textContent, source: src ? src.getAttribute('href') : null,
                    typeset: sec.querySelectorAll('mjx-container').length};
        }""", anchor)
        assert entry is not None, f"{target}: no API entry with id {anchor!r}"
        assert entry['heading'].rstrip('¶').strip() == name
        obj = getattr(additive_pos_attn, name)
        params = [p for p in inspect.signature(obj).parameters if p != 'self']
        assert f'{name}(' in entry['signature'] and all(p in entry['signature'] for p in params), entry['signature']
        norm = lambda s: ' '.join(s.replace('`', '').replace('*', '').split())
        first = norm(inspect.getdoc(obj).splitlines()[0])
        assert first in norm(entry['text']), (first, entry['text'][:500])
        assert entry['source'] and entry['source'].startswith('_source/'), entry['source']
        assert page.request.get(server + entry['source'].split('#')[0]).ok
        if '$' in inspect.getdoc(obj): assert entry['typeset'] > 0, f"{name}: maths in the docstring not typeset"
        if name == 'AdditivePosMultiheadAttention':
            page.set_viewport_size({'width': 1280, 'height': 1100})
            page.goto(server + target, wait_until='load')
            _wait_for_mathjax(page)
            # typesetting moves the page after the browser scrolled to the anchor: scroll again
            page.evaluate("id => document.getElementById(id).scrollIntoView({behavior: 'instant'})",
                          target.split('#')[1])
            page.screenshot(path=str(docs / 'additive_screenshot.png'))
            print(f"screenshot of the entry: {docs / 'additive_screenshot.png'}")
    page.close()


# ------------------------------------------------------------------------------------------------
# The API entries read as docs: docstring sections, signatures, nothing clipped
# ------------------------------------------------------------------------------------------------

RENDERED = ('base', 'additive', 'decoder', 'derivation')  # pages, by name: notebooks may be renumbered
SECTION = r'^(Args|Arguments|Parameters|Attributes|Shape|Returns|Raises|Examples?)::?$'

# Leaves (text, elements without element children) that stick out of the main column with no ancestor inside it
# that scrolls them: clipped at its edge or spilling over. Invisible ones (headerlinks, MathJax's assistive MathML)
# do not count.
_SPILL_JS = r"""() => {
  const col = document.querySelector('article[role=main]'), box = col.getBoundingClientRect(), out = new Map();
  const up = (e, test) => { for (; e && e !== col; e = e.parentElement) if (test(e, getComputedStyle(e))) return true;
                            return false; };
  const hidden = (e, s) => s.visibility === 'hidden' || s.clip !== 'auto' || s.clipPath !== 'none';
  const scrolls = (e, s) => /auto|scroll/.test(s.overflowX) && e.getBoundingClientRect().right <= box.right + 1;
  const walker = document.createTreeWalker(col, NodeFilter.SHOW_ELEMENT | NodeFilter.SHOW_TEXT);
  for (let n; (n = walker.nextNode());) {
    if (n.nodeType === 1 ? n.firstElementChild : !n.textContent.trim()) continue;
    const e = n.nodeType === 1 ? n : n.parentElement, range = document.createRange();
    range.selectNodeContents(n);
    const r = n.nodeType === 1 ? n.getBoundingClientRect() : range.getBoundingClientRect();
    if (!r.width || (r.right <= box.right + 1 && r.left >= box.left - 1) || up(e, hidden) || up(e, scrolls)) continue;
    const where = e.closest('pre, table, .math, mjx-container, p, li, dd') || e;
    const key = `<${where.tagName.toLowerCase()}> ${where.textContent.trim().slice(0, 60)}`;
    out.set(key, Math.max(out.get(key) || 0, Math.round(Math.max(r.right - box.right, box.left - r.left))));
  }
  return [...out].map(([key, px]) => `${key}: ${px}px past the column, without a scrollbar`);
}"""

_TITLE_JS = """() => [...document.querySelectorAll('.sidebar-brand-text, .mobile-header .header-center a')]
  .filter(e => e.getClientRects().length).map(e => {
    const r = document.createRange(); r.selectNodeContents(e);
    return {text: e.textContent.trim(), lines: new Set([...r.getClientRects()].map(x => Math.round(x.top))).size,
            width: r.getBoundingClientRect().width,
            room: getComputedStyle(e).display === 'inline' ? null : e.clientWidth};  // inline: the header's link
  })"""

_ENTRIES_JS = r"""(section) => {
  const art = document.querySelector('article[role=main]');
  const entries = [...art.querySelectorAll('section')].filter(s => s.querySelector(':scope > h3'));
  const signature = s => (s.querySelector(':scope > div[class^="highlight-"] pre') || {}).textContent || '';
  const entry = name => entries.find(s => s.querySelector(':scope > h3').textContent.replace('¶', '').trim() === name);
  // a docstring section: its name, then a list or table whose items start with the names it documents
  const items = (name, label) => {
    const sec = entry(name);
    const head = sec && [...sec.querySelectorAll('dt, p, th, strong')]
      .find(e => e.textContent.replace(/:/g, '').trim().toLowerCase() === label.toLowerCase());
    const next = head && (head.tagName === 'STRONG' ? head.parentElement : head).nextElementSibling;
    return next ? [next, ...next.querySelectorAll('*')].filter(e => /^(LI|TD)$/.test(e.tagName))
                                                       .map(e => e.textContent.trim()) : null;
  };
  return {
    text: art.textContent,
    signatures: entries.map(signature).filter(t => /^(async )?def /.test(t)),
    headers: [...art.querySelectorAll('p')].map(e => e.textContent.trim()).filter(t => new RegExp(section).test(t)),
    additiveArgs: items('AdditivePosMultiheadAttention', 'Args'),
    prompts: [...art.querySelectorAll('pre')].filter(p => p.textContent.trimStart().startsWith('>>>')).length,
  };
}"""


def _comment_problems(signature: str, source: list) -> list:
    """Comments fastcore shows after a parameter (its docments) that the source does not write on that parameter's
    line: a comment on a decorator line, say, becomes the description of the `def` line's last parameter."""
    problems = []
    for line in signature.splitlines():
        code, sep, comment = line.partition(' # ')
        names = re.findall(r'(?:^|,)\s*\*{0,2}(\w+)', code.strip())
        if not sep or not (names or code.strip().startswith(')')): continue  # no comment, or a comment's next line
        owner = names[-1] if names else '->'  # the return annotation's comment sits on the `)->T:` line
        lines = [s.split('#')[0] for s in source if s.rstrip().endswith('# ' + comment.strip())]
        if not any(re.search(rf'(?<!\w){re.escape(owner)}(?!\w)', s) for s in lines):
            problems.append(f"{owner!r} is described by the comment {comment.strip()!r}, which the source writes on "
                            f"{'no line' if not lines else 'another line: ' + repr(lines[0].strip())}")
    return problems


@pytest.mark.slow
def test_api_rendering(site, server, browser):
    """The API entries read as docs on the base, additive, decoder and derivation pages: docstring sections as lists
    (no RST double backticks, `Example::` as code), signatures with the annotations the source writes and no comment
    taken for a parameter's description, nothing wider than the column without a scrollbar, the site's title on one
    line with room to spare (other systems' fonts are wider)."""
    import additive_pos_attn
    names = {p.docname for p in site[1]}
    assert set(RENDERED) <= names, f"pages missing from the site: {set(RENDERED) - names}"
    source = [s for f in sorted((ROOT / 'additive_pos_attn').glob('*.py')) for s in f.read_text().splitlines()]
    page, problems, widest = browser.new_page(viewport={'width': 1280, 'height': 1000}), [], {}
    for name in RENDERED:
        for width in (1280, 400):  # furo's desktop layout, and a phone's
            page.set_viewport_size({'width': width, 'height': 1000})
            page.goto(f'{server}{name}.html', wait_until='load')
            _wait_for_mathjax(page)
            problems += [f"{name}.html at {width}px: {s}" for s in page.evaluate(_SPILL_JS)]
            for t in page.evaluate(_TITLE_JS):
                if t['lines'] != 1 or (t['room'] and t['width'] > 0.85 * t['room']):
                    problems.append(f"{name}.html at {width}px: the title {t['text']!r} takes {t['lines']} line(s), "
                                    f"{t['width']:.0f}px of its {t['room']}px (wider fonts wrap it)")
        widest[name] = page.evaluate("() => Math.max(0, ...[...document.querySelectorAll('article pre')]"
                                     ".map(p => p.scrollWidth - p.clientWidth))")
        info = page.evaluate(_ENTRIES_JS, SECTION)
        if '``' in info['text']:
            i = info['text'].index('``')
            problems.append(f"{name}.html: RST double backticks: {info['text'][max(0, i - 60):i + 40]!r}")
        problems += [f"{name}.html: a docstring section rendered as text: {h[:60]!r}" for h in info['headers']]
        for sig in info['signatures']:
            head = sig.split('(')[0]
            if 'NoneType' in sig: problems.append(f"{name}.html: NoneType in the signature of {head}: {sig!r}")
            if (m := re.search(r'\b(Optional|Union)\b(?!\[)', sig)):
                problems.append(f"{name}.html: {m.group(1)} without its arguments in the signature of {head}: {sig!r}")
            problems += [f"{name}.html, {head}: {p}" for p in _comment_problems(sig, source)]
        if name == 'additive':
            args = info['additiveArgs']
            params = inspect.signature(additive_pos_attn.AdditivePosMultiheadAttention).parameters
            if not args or not any(a.split()[0] in params for a in args if a):
                problems.append(f"additive.html: AdditivePosMultiheadAttention's Args are not a list or table with an "
                                f"item per parameter: {args}")
            if not info['prompts']: problems.append("additive.html: no `Example::` (>>>) rendered as a code block")
    assert not problems, '\n'.join(problems)

    # The spill check sees clipping: with no scrollbar on the widest code block, it reports that block.
    name = max(widest, key=widest.get)
    assert widest[name] > 0, "no code block wider than the column: the spill check checked nothing"
    page.goto(f'{server}{name}.html', wait_until='load')
    page.add_style_tag(content='pre { overflow: hidden !important; }')
    assert page.evaluate(_SPILL_JS), f"{name}.html: a clipped code block went unnoticed"
    page.close()
