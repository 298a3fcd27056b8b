"The README's quick example must run as written (on the synthetic cells, no download)"
import re, os
from pathlib import Path
import matplotlib
matplotlib.use('Agg')

def test_readme_quick_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv('MTLROBUST_CACHE', str(tmp_path))
    readme = (Path(__file__).parent.parent/'README.md').read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    ns = {}
    exec(compile(code, 'README.md', 'exec'), ns)
    xb, label, mask, concepts = ns['xb'], ns['label'], ns['mask'], ns['concepts']
    assert xb.shape[1:] == (3, 96, 96) and 0 <= xb.min() and xb.max() <= 1
    assert concepts.shape[1] == 2 and mask.shape[1:] == (96, 96)
    assert set(ns['cells'].split) == {'train', 'valid', 'test'}


def test_readme_is_the_home_page():
    "README.md is what scripts/make_readme.py writes from nbs/index.ipynb, so the repository and the site say the same"
    import importlib.util
    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location('make_readme', root/'scripts'/'make_readme.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert (root/'README.md').read_text() == mod.readme_text(), "README.md is stale: run `python scripts/make_readme.py`"
