"The package's modules import one way (a notebook's module only imports modules of lower-numbered notebooks) and no kind switches live outside the task classes"
import ast, re
from pathlib import Path
import pytest

PKG = Path(__file__).parent.parent/'mtlrobust'
SRC = re.compile(r"File to edit: \.\./(?:\.\./)?nbs/(\d+)([a-z]?)_[^/]+\.ipynb")  # 13a comes after 13, before 14

def _modules():
    "Module name -> (notebook number, source) of every exported module"
    res = {}
    for f in sorted(PKG.rglob('*.py')):
        text = f.read_text()
        if m := SRC.search(text):
            res['.'.join(f.relative_to(PKG.parent).with_suffix('').parts)] = ((int(m.group(1)), m.group(2)), text)
    return res

MODULES = _modules()

def _imported(name, text):
    "mtlrobust modules imported by module `name`, absolute or relative, anywhere in it"
    pkg, res = name.rsplit('.', 1)[0], set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level: base = '.'.join(pkg.split('.')[:len(pkg.split('.')) - node.level + 1] + ([base] if base else []))
            if base.startswith('mtlrobust'):
                res.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
        elif isinstance(node, ast.Import): res.update(a.name for a in node.names if a.name.startswith('mtlrobust'))
    return res - {'mtlrobust', name}

def test_every_module_is_exported_from_a_numbered_notebook():
    assert len(MODULES) >= 15 and 'mtlrobust.tasks' in MODULES and 'mtlrobust.cli' in MODULES
    assert MODULES['mtlrobust.robustness'][0] < MODULES['mtlrobust.interpret'][0] < MODULES['mtlrobust.workflow'][0]

@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_run_one_way(name):
    num, text = MODULES[name]
    later = {m: MODULES[m][0] for m in _imported(name, text) if m in MODULES and MODULES[m][0] >= num}
    assert not later, f"{name} (notebook {num}) imports later or same-numbered modules {later}"
    assert 'importlib' not in text, f"{name} imports through importlib"

def test_no_kind_switches_outside_the_task_classes():
    hits = [(n, l.strip()) for n, (_, text) in MODULES.items() for l in text.splitlines()
            if re.search(r"\.kind\s*(==|!=|in\b)|kind\s*==\s*'", l)]
    assert not hits, hits
