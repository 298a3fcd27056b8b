#!/usr/bin/env python
"""Check the documentation site without Quarto: a local stand-in for `nbdev-docs`.

Run from the repository root: `python scripts/check_docs.py [--no-proc]`. Steps:

1. `nbdev-proc-nbs --force` (nbdev's pre-Quarto step: adds `show_doc` cells, runs them, writes `_proc/`).
   It stops at the first notebook that fails, so the notebooks it left are then processed one by one with
   nbdev's own per-notebook function, and every failure is reported. Its "Found cells containing imports
   and other code" warnings are problems too. The outcome is saved in `_proc/_check_docs.json` for `--no-proc`.
2. Every processed page is rendered to HTML with nbconvert (no Quarto) into `_proc/_html/`.
3. The pages are checked for (a) error outputs, (b) names of a module's `__all__` not documented on the
   page, (c) internal links to a missing page or anchor, (d) plotting cells without an image output.

Exits 1 and lists the problems per notebook if there are any. `_proc/` is git-ignored.
"""
import argparse, ast, json, os, posixpath, re, shutil, subprocess, sys, tempfile, time
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit, unquote

import yaml
from nbdev.config import get_config, nbpath2html
from nbdev.doclinks import nbglob

CFG = get_config(Path(__file__).resolve().parent)
ROOT, NBS, LIB = CFG.config_path, CFG.nbs_path, CFG.lib_path
PROC = ROOT/'_proc'
HTML = PROC/'_html'
STATE = PROC/'_check_docs.json'
SITE = (CFG.get('doc_host', '') + CFG.get('doc_baseurl', '')).rstrip('/')
IMPORT_WARNING = 'Found cells containing imports and other code'

problems = {}  # page (source notebook, relative to nbs/) -> list of messages
def problem(page, msg): problems.setdefault(str(page), []).append(msg)

# ---------------------------------------------------------------- notebook helpers
@lru_cache(None)
def read_nb(p): return json.loads(Path(p).read_text(encoding='utf-8'))  # shared: copy before changing
def src(cell): return ''.join(cell.get('source', ''))

def directives(source):
    "The `#| key: value` directives of a code cell"
    return {m[1]: m[2].strip() for m in re.finditer(r'^\s*#\|\s*([\w-]+)\s*:?(.*)$', source, re.M)}

def code_lines(source):
    return [l.rstrip() for l in source.splitlines() if l.strip() and not l.lstrip().startswith('#|')]

def is_subseq(small, big):
    it = iter(big)
    return all(any(x == y for y in it) for x in small)

def locate(source, nbs):
    "(notebook, cell index) of the cells in `nbs` whose code is `source`, as printed by nbdev"
    want = code_lines(source)
    if not want: return []
    return [(nb, i) for nb in nbs for i, c in enumerate(read_nb(NBS/nb)['cells'])
            if c['cell_type'] == 'code' and is_subseq(want, code_lines(src(c)))]

def cell_ref(nb, source, k):
    "Where a cell of `nb` with code `source` (cell `k` of the processed notebook) is in the notebook"
    try: return where(*locate(source, [nb])[0])
    except (IndexError, OSError): return f'processed cell {k}'

def where(nb, i):
    c = read_nb(NBS/nb)['cells'][i]
    first = next(iter(code_lines(src(c))), '')
    return f"cell {i} (id {c.get('id', '?')}: `{first[:60]}`)"

# ---------------------------------------------------------------- 1. nbdev-proc-nbs
def nbdev_proc_nbs(args):
    "Run `nbdev-proc-nbs` with `args`; return (exit code, output)"
    exe = Path(sys.executable).with_name('nbdev-proc-nbs')
    env = dict(os.environ, IN_TEST='1')  # IN_TEST: nbdev leaves mtlrobust/_modidx.py alone
    with tempfile.TemporaryDirectory() as stub:
        if not shutil.which('quarto'):  # stop nbdev from trying to `sudo dpkg -i` Quarto: it is not needed here
            (Path(stub)/'quarto').write_text('#!/bin/sh\necho "quarto stub of check_docs.py" >&2\nexit 1\n')
            (Path(stub)/'quarto').chmod(0o755)
            env['PATH'] = stub + os.pathsep + env['PATH']
        r = subprocess.run([str(exe) if exe.exists() else 'nbdev-proc-nbs', *args], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr

_re_warn = re.compile(re.escape(IMPORT_WARNING) + r'\. See FAQ\.\n---\n(.*?)\n---\n', re.S)
_re_err = re.compile(r'^Exception: Error(?: in notebook: (?P<title>.*?))? in cell (?P<cell>\d+) :$', re.M)
_re_exc = re.compile(r'^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure)\b')

def parse_error(out):
    "(notebook title, failing cell's source, error) from nbdev's last 'Error in notebook' message, or None"
    m = list(_re_err.finditer(out))
    if not m: return None
    m = m[-1]
    body = out[m.end():].strip('\n').splitlines()
    k = max((i for i, l in enumerate(body) if _re_exc.match(l)), default=len(body)-1)
    return m['title'], '\n'.join(body[:k]), '\n'.join(body[k:]).strip()

def proc_one(nb):
    "Process one notebook exactly as `nbdev-proc-nbs`'s workers do; return (nb, error, [warned cell sources])"
    import warnings
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import main as proc_main
    os.chdir(ROOT)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        try: proc_main((NBS/nb, PROC/nb, FilterDefaults)); err = None
        except Exception as e: err = f'Exception: {e}'
    return nb, err, [s for w in ws for s in _re_warn.findall(str(w.message) + '\n')]

def run_proc(nbs):
    "Run `nbdev-proc-nbs`; if it fails, process the notebooks it left one by one; return {nb: error}, warnings"
    def fresh(nb): return (PROC/nb).exists() and (PROC/nb).stat().st_mtime >= (NBS/nb).stat().st_mtime
    t = time.time()
    rc, out = nbdev_proc_nbs(['--force'])
    print(f'nbdev-proc-nbs --force: {time.time()-t:.0f} s, exit {rc}', flush=True)
    srcs, failed = _re_warn.findall(out), {}
    if rc:
        # nbdev stops at the first failing notebook: process the notebooks it did not write with nbdev's
        # own per-notebook function, so that every failure is reported, not only the first one
        from concurrent.futures import ProcessPoolExecutor
        import importlib, multiprocessing as mp
        sys.path.insert(0, str(Path(__file__).parent))  # workers get `check_docs.proc_one`, not `__main__.proc_one`:
        me = importlib.import_module(Path(__file__).stem)  # nbdev's IPython shell replaces a worker's `__main__`
        todo, t = [nb for nb in nbs if not fresh(nb)], time.time()
        with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1) or 1, mp_context=mp.get_context('spawn')) as ex:
            for nb, err, ws in ex.map(me.proc_one, todo):
                srcs += ws
                if err:
                    e = parse_error(err)
                    cell = next((where(n, i) for n, i in locate(e[1], [nb])), 'a cell') if e else 'a cell'
                    failed[nb] = f'nbdev-proc-nbs fails in {cell}: ' + (e[2] if e else err.splitlines()[-1])
        print(f'  then {len(todo)} notebook(s) it left, one by one: {time.time()-t:.0f} s', flush=True)
        if not failed:
            failed['(nbdev-proc-nbs)'] = 'nbdev-proc-nbs failed:\n' + '\n'.join(out.strip().splitlines()[-15:])
    warned = set()
    for w in srcs: warned.update(locate(w, nbs) or [(None, w)])
    warnings = [(nb, (where(nb, i) if nb else f'a cell:\n{i}')) for nb, i in sorted(warned, key=lambda o: (str(o[0]), str(o[1]).zfill(6)))]
    return failed, warnings

# ---------------------------------------------------------------- 2. render with nbconvert
def frontmatter(nb):
    c = nb['cells'][0] if nb['cells'] else {}
    if c.get('cell_type') == 'raw' and src(c).startswith('---'):
        return yaml.safe_load(src(c).strip().strip('-')) or {}
    return {}

def render(nb, dest, folder):
    "Write `nb` (a processed notebook in `folder`) as a standalone HTML page, roughly as Quarto shows it"
    import nbformat
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    nb = json.loads(json.dumps(nb))
    fm = frontmatter(nb)
    if fm:
        title = f"# {fm.get('title', '')}\n\n" + (f"> {fm['description']}\n" if fm.get('description') else '')
        nb['cells'][0] = dict(cell_type='markdown', metadata={}, source=title)
    nb['nbformat_minor'] = max(nb.get('nbformat_minor', 0), 5)
    for k, c in enumerate(nb['cells']):  # nbformat's keys only (nbdev adds `has_sd`, timings), and ids
        keys = {'id', 'cell_type', 'metadata', 'source', 'attachments'} | ({'outputs', 'execution_count'} if c['cell_type'] == 'code' else set())
        nb['cells'][k] = c = {key: v for key, v in c.items() if key in keys} | {'id': c.get('id') or f'cell-{k}', 'metadata': {}}
        if c['cell_type'] != 'code': continue
        d, tags = directives(src(c)), []
        if d.get('include') == 'false': tags.append('remove_cell')
        if d.get('echo') == 'false': tags.append('remove_input')
        if d.get('output') == 'false': tags.append('remove_output')
        c['metadata']['tags'] = tags
        c['source'] = '\n'.join(l for l in src(c).splitlines() if not l.lstrip().startswith('#|'))
        for o in c.get('outputs', []):  # drop Quarto's link attributes, e.g. show_doc's [source](...){target=...}
            md = o.get('data', {}).get('text/markdown')
            if md is not None: o['data']['text/markdown'] = re.sub(r'\]\(([^)\s]*)\)\{[^}\n]*\}', r'](\1)', ''.join(md))
    c = Config()
    c.TagRemovePreprocessor.update(enabled=True, remove_cell_tags={'remove_cell'},
                                   remove_input_tags={'remove_input'}, remove_all_outputs_tags={'remove_output'})
    exp = HTMLExporter(config=c, template_name='lab', embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exp.from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4), resources={'metadata': {'path': str(folder), 'name': fm.get('title', dest.stem)}})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(body, encoding='utf-8')

class Links(HTMLParser):
    "The `href`s of the `a` tags and the ids of a page (except nbconvert's own heading ids)"
    def __init__(self, text):
        super().__init__(); self.hrefs, self.ids = [], set(); self.feed(text)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'a' and a.get('href') and 'anchor-link' not in (a.get('class') or ''): self.hrefs.append(a['href'])
        if a.get('id') and not re.fullmatch(r'h[1-6]', tag): self.ids.add(a['id'])
        if tag == 'a' and a.get('name'): self.ids.add(a['name'])

def pandoc_id(text):
    "The identifier Pandoc (so Quarto) gives a heading"
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)
    text = re.sub(r'<[^>]+>|[`*]', '', text)
    text = ''.join(ch for ch in text if ch.isalnum() or ch in '_-. \n').replace(' ', '-').replace('\n', '-').lower()
    return re.sub(r'^[^a-z]+', '', text) or 'section'

def markdown_texts(nb):
    "Markdown of the page: markdown cells and markdown outputs"
    for c in nb['cells']:
        if c['cell_type'] == 'markdown': yield src(c)
        for o in c.get('outputs', []):
            md = o.get('data', {}).get('text/markdown')
            if md is not None: yield ''.join(md)

def anchors(nb):
    "The heading and label identifiers Quarto would give the page"
    ids, seen = set(), {}
    for md in markdown_texts(nb):
        md = re.sub(r'^```.*?^```', '', md, flags=re.S | re.M)
        for h in re.findall(r'^#{1,6}\s+(.+?)\s*#*\s*$', md, re.M):
            if (m := re.search(r'\{[^}]*#([\w.:-]+)[^}]*\}\s*$', h)): ids.add(m[1]); continue
            i = pandoc_id(re.sub(r'\{[^}]*\}\s*$', '', h))
            n = seen.get(i, 0); seen[i] = n + 1
            ids.add(i if n == 0 else f'{i}-{n}')
        ids.update(re.findall(r'\{#([\w.:-]+)', md))
    for c in nb['cells']:
        if c['cell_type'] == 'code' and directives(src(c)).get('label'): ids.add(directives(src(c))['label'])
    return ids

# ---------------------------------------------------------------- 3. checks
DRAW_MODULES = {'plt', 'sns', 'px', 'pyplot', 'seaborn'}
NOT_DRAWING = {'close', 'ioff', 'ion', 'rc', 'rcdefaults', 'switch_backend', 'get_cmap', 'use', 'style', 'colormaps'}
DRAW_CALLS = {'plot', 'show', 'imshow', 'matshow', 'hist', 'scatter', 'bar', 'barh', 'heatmap', 'relplot', 'catplot',
              'displot', 'lineplot', 'scatterplot', 'boxplot', 'violinplot', 'pairplot', 'subplots', 'figure', 'contour',
              'contourf', 'pcolormesh', 'errorbar', 'fill_between', 'show_batch', 'show_results', 'show_image',
              'show_images', 'plot_top_losses', 'plot_confusion_matrix'}

def _dotted(f):
    parts = []
    while isinstance(f, ast.Attribute): parts.append(f.attr); f = f.value
    if isinstance(f, ast.Name): parts.append(f.id)
    return parts[::-1]

def draws(source):
    "Does a code cell (outside function and class definitions) call something that draws?"
    code = re.sub(r'^\s*[%!].*$', '', source, flags=re.M)
    try: tree = ast.parse(code)
    except SyntaxError:
        return bool(re.search(r'\b(plt|sns)\.(?!close)\w+\(|\.(plot|show|imshow|show_batch|show_results)\(|\bplot_\w+\(', code))
    def calls(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)): return
        if isinstance(node, ast.Call): yield _dotted(node.func)
        for ch in ast.iter_child_nodes(node): yield from calls(ch)
    for parts in calls(tree):
        if not parts: continue
        name = parts[-1]
        if parts[0] in DRAW_MODULES and len(parts) > 1 and not set(parts[1:]) & NOT_DRAWING: return True
        if name in DRAW_CALLS or name.startswith('plot_') or 'plot' in parts[1:-1]: return True
        if name.startswith('show_') and name != 'show_doc': return True
    return False

def has_image(cell):
    for o in cell.get('outputs', []):
        data = o.get('data', {})
        if any(k.startswith('image/') for k in data): return True
        if re.search(r'<img\b|<svg\b', ''.join(data.get('text/html', ''))): return True
    return False

def pending_full_run(page, nb)->bool:
    "A paper notebook (numbered 30 and up) whose `slow` cells have never run (none has an output): its full run is pending"
    if not (page[:2].isdigit() and int(page[:2]) >= 30): return False
    slow = [c for c in nb['cells'] if c['cell_type'] == 'code' and 'slow' in directives(src(c))]
    return bool(slow) and not any(c.get('outputs') for c in slow)

def check_cells(page, nb):
    "(a) error outputs and (d) drawing cells without an image (not the `slow` cells of a notebook whose full run is pending)"
    pending = pending_full_run(page, nb)
    if pending: print(f'note: {page}: full run pending (no `slow` cell has an output); its slow cells are not checked for figures')
    for i, c in enumerate(nb['cells']):
        if c['cell_type'] != 'code': continue
        s, d = src(c), directives(src(c))
        if pending and 'slow' in d: continue
        ref = lambda: cell_ref(page, s, i)
        for o in c.get('outputs', []):
            if o.get('output_type') == 'error':
                problem(page, f"{ref()}: error output {o.get('ename')}: {o.get('evalue', '')[:200]}")
            elif o.get('output_type') == 'stream' and o.get('name') == 'stderr' and 'Traceback' in ''.join(o.get('text', '')):
                problem(page, f"{ref()}: a traceback on stderr")
        skip = d.get('eval') == 'false' or d.get('include') == 'false' or d.get('output') == 'false' or \
               d.keys() & {'hide', 'export', 'exporti'}
        if not skip and draws(s) and not has_image(c):
            problem(page, f"{ref()}: draws a figure but has no image output")

def exported_names():
    "{notebook: [(name, 'def' or 'const', module file)]} for the names in each module's `__all__`"
    res = {}
    for py in sorted(LIB.rglob('*.py')):
        text = py.read_text(encoding='utf-8')
        tree = ast.parse(text)
        names = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and any(getattr(t, 'id', '') == '__all__' for t in n.targets)), None)
        if not names: continue
        lines = text.splitlines()
        def nb_at(lineno):
            "The notebook a line of the module was exported from (nbdev's `# %% ../nbs/x.ipynb` cell markers)"
            m = next((m for l in reversed(lines[:lineno]) if (m := re.match(r'# %% (\S+\.ipynb)', l))), None)
            m = m or re.search(r'File to edit: (\S+\.ipynb)', text)
            try: return (py.parent/m[1]).resolve().relative_to(NBS.resolve()).as_posix()
            except (TypeError, ValueError): return None
        defs = {}
        for n in tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): defs[n.name] = (n.lineno, 'def')
            elif isinstance(n, (ast.Assign, ast.AnnAssign)):
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    for nm in ast.walk(t):
                        if isinstance(nm, ast.Name): defs.setdefault(nm.id, (n.lineno, 'const'))
        for name in names:
            lineno, kind = defs.get(name, (1, 'const'))
            res.setdefault(nb_at(lineno), []).append((name, kind, py.relative_to(ROOT).as_posix()))
    return res

def check_names(page, nb, names):
    "(b) each exported name has a show_doc (or a heading); a constant is at least named in the prose"
    mds = list(markdown_texts(nb))
    heads = {re.sub(r'[`*\\]', '', h).strip() for md in mds for h in re.findall(r'^#{1,6}\s+(.+?)\s*(?:\{.*\})?\s*$', md, re.M)}
    shown = {n for c in nb['cells'] if c['cell_type'] == 'code' and directives(src(c)).get('echo') != 'false'
             for n in re.findall(r'^(\w+)\s*(?::[^=\n]*)?=', src(c), re.M)}
    for name, kind, mod in names:
        if name in heads: continue
        if kind == 'const' and (name in shown or any(re.search(rf'(?<![\w.]){re.escape(name)}(?!\w)', md) for md in mds)): continue
        what = ('no show_doc on the page' if kind == 'def' else
                'a constant not named in the prose nor shown (mention it, or use `#| exports`)')
        problem(page, f'`{name}` (in `{mod}` __all__): {what}')

def check_links(pages, ids, known):
    "(c) links between pages: the page exists and, where the page was rendered, so does the anchor"
    for page, (html, links) in pages.items():
        here = posixpath.dirname(html)
        for href in links:
            rel, base = (href[len(SITE)+1:], '') if SITE and href.startswith(SITE + '/') else (href, here)
            u = urlsplit(rel)
            if u.scheme or u.netloc or rel.startswith(('mailto:', 'javascript:')): continue
            path, frag = unquote(u.path), unquote(u.fragment)
            if not path: target = html
            else:
                path = posixpath.normpath(posixpath.join(base, path))
                if path.endswith('.html.md'): path = path[:-3]
                if path.endswith(('.ipynb', '.md', '.qmd')):
                    if not (NBS/path).exists(): problem(page, f'link `{href}`: no page {path} in nbs/'); continue
                    target = known.get(path)
                else: target = path
                if not target or target not in known.values():
                    if path.endswith('.html') or not target: problem(page, f'link `{href}`: no page {path}')
                    continue
            if frag and target in ids and frag not in ids[target]:
                problem(page, f'link `{href}`: no anchor #{frag} on {target}')

# ---------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--no-proc', action='store_true', help='reuse _proc/ from the last run instead of running nbdev-proc-nbs')
    args = ap.parse_args()
    t0 = time.time()
    nbs = [Path(p).relative_to(NBS).as_posix() for p in nbglob(NBS, as_path=True)]
    if args.no_proc:
        if not STATE.exists(): sys.exit(f'{STATE} not found: run without --no-proc first')
        st = json.loads(STATE.read_text())
        failed, warnings = st['failed'], st['warnings']
        for nb in nbs:
            if nb not in failed and not (PROC/nb).exists(): failed[nb] = 'not in _proc/ (run without --no-proc)'
            elif nb not in failed and (PROC/nb).stat().st_mtime < (NBS/nb).stat().st_mtime: print(f'note: _proc/{nb} is older than nbs/{nb}')
    else:
        failed, warnings = run_proc(nbs)
        STATE.write_text(json.dumps(dict(failed=failed, warnings=warnings), indent=1))
    t1 = time.time()
    for nb, msg in failed.items(): problem(nb, msg)
    for nb, msg in warnings:
        problem(nb or '(notebook not found)', f"nbdev warning '{IMPORT_WARNING}' for {msg}: "
                'nbdev runs such cells to build the docs; put the imports in a cell of their own')

    # pages: html path relative to _html, for each source doc (links may point to pages that failed)
    known = {nb: nbpath2html(nb).as_posix() for nb in nbs}
    known.update({p.relative_to(NBS).as_posix(): p.relative_to(NBS).with_suffix('.html').as_posix()
                  for ext in ('qmd', 'md') for p in NBS.rglob(f'*.{ext}') if not any(q.startswith(('_', '.')) for q in p.relative_to(NBS).parts)})
    names, pages, ids = exported_names(), {}, {}
    if HTML.exists(): shutil.rmtree(HTML)
    for nb in nbs:
        if nb in failed:  # no processed page: check the stored outputs of the notebook itself
            check_cells(nb, read_nb(NBS/nb)); continue
        pnb = read_nb(PROC/nb)
        html = (Path(nb).parent/(frontmatter(pnb).get('output-file') or nbpath2html(nb).name)).as_posix()
        known[nb] = html
        check_cells(nb, pnb)
        check_names(nb, pnb, names.get(nb, []))
        try: render(pnb, HTML/html, (PROC/nb).parent)
        except Exception as e: problem(nb, f'nbconvert cannot render the page: {type(e).__name__}: {e}'); continue
        links = Links((HTML/html).read_text(encoding='utf-8'))
        pages[nb], ids[html] = (html, links.hrefs), anchors(pnb) | links.ids
    for nb in set(names) - set(nbs):
        for name, _, mod in names[nb]: problem(nb or mod, f'`{name}` (in `{mod}` __all__): exported from {nb or "no notebook"}, not in nbs/')
    check_links(pages, ids, known)

    n = sum(map(len, problems.values()))
    print(f'\nRendered {len(pages)} of {len(nbs)} pages to {HTML.relative_to(ROOT)}/ '
          f'(processing {t1-t0:.0f} s, checks and rendering {time.time()-t1:.0f} s)')
    if args.no_proc and warnings: print('(nbdev warnings are from the last run with processing)')
    if not n: print('Docs check passed.'); return 0
    print(f'\n{n} documentation problem(s) in {len(problems)} notebook(s):')
    for page in sorted(problems):
        print(f'\n{page}:')
        for msg in problems[page]: print('  - ' + msg.replace('\n', '\n    '))
    return 1

if __name__ == '__main__': sys.exit(main())
