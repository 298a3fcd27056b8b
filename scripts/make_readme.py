"""Write README.md from the documentation's home page, nbs/index.ipynb, so that the two say the same things.

Markdown cells are copied as they are; the code cells of the page (hidden ones excepted) become one ```python block
per run of consecutive code cells. `python scripts/make_readme.py --check` exits 1, naming the first difference,
when README.md is not what the home page gives."""
import json, sys, difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _shown(cell): return not any(l.strip() in ('#| hide', '#|hide', '#| include: false') for l in cell['source'][:3])

def readme_text(index=ROOT/'nbs'/'index.ipynb')->str:
    "The README generated from the home page notebook"
    parts, code = [], []
    for cell in json.loads(Path(index).read_text(encoding='utf-8'))['cells']:
        src = ''.join(cell['source']).strip('\n')
        if cell['cell_type'] == 'code':
            if _shown(cell): code.append('\n'.join(l for l in src.split('\n') if not l.startswith('#|')))
            continue
        if code: parts.append('```python\n' + '\n'.join(code) + '\n```'); code = []
        parts.append(src)
    if code: parts.append('```python\n' + '\n'.join(code) + '\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    new, readme = readme_text(), ROOT/'README.md'
    if '--check' in sys.argv:
        old = readme.read_text(encoding='utf-8')
        if old != new:
            diff = list(difflib.unified_diff(old.splitlines(), new.splitlines(), 'README.md', 'from nbs/index.ipynb', lineterm='', n=1))
            sys.exit("README.md differs from what nbs/index.ipynb gives; run `python scripts/make_readme.py`:\n" + '\n'.join(diff[:40]))
    else: readme.write_text(new, encoding='utf-8'); print(f"wrote {readme}")
