"""A user's mistake in a `mtlrobust` command is one line `mtlrobust <command>: error: ...` on stderr, exit status 2,
and nothing written; a bug keeps its traceback; an interrupted run leaves no file and no folder behind"""
import os, re, sys, json, time, subprocess
from pathlib import Path
import pytest
import numpy as np, pandas as pd
import fastcore.test as fct
import matplotlib
matplotlib.use('Agg')
import mtlrobust.cli as cli
import mtlrobust.workflow as workflow
from mtlrobust.cli import main
from mtlrobust.data import save_manifest
from mtlrobust.synth import synth_wbc
from mtlrobust.tasks import classification_task, segmentation_task, task_spec

SMALL = ['--n-synthetic', '40', '--size', '48', '--bs', '16', '--epochs', '1']

def files_under(p:Path)->list:
    "Every file and folder under `p`, hidden ones included, relative to it"
    return sorted(str(f.relative_to(p)) for f in Path(p).rglob('*'))

def run(argv, capsys)->tuple:
    "(exit status, stdout, stderr) of `main(argv)`"
    with pytest.raises(SystemExit) as e: main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err

def user_error(argv, capsys, where:Path)->str:
    "Run a command that must fail as the user's mistake: the message of its one error line (after any warning lines)"
    before = files_under(where)
    code, out, err = run(argv, capsys)
    cmd = argv[0]
    fct.test_eq(code, 2)
    assert 'Traceback' not in err + out, err
    lines = err.splitlines()
    assert all(l.startswith(f"mtlrobust {cmd}: warning: ") for l in lines[:-1]), err
    m = re.fullmatch(rf"mtlrobust {cmd}: error: (\S[^\n]*)\n", lines[-1] + '\n' if lines else '')
    assert m and err.endswith('\n'), f"not one error line: {err!r}"
    fct.test_eq(files_under(where), before)  # nothing written: no output folder, no partial file
    return m[1]

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A model trained for one epoch on 40 synthetic cells (label and mask), with its split.csv"
    out = tmp_path_factory.mktemp('trained')/'run'
    cli.mtlrobust_train('synthetic', tasks='label,mask', size=48, bs=16, epochs=1, n_synthetic=40, out=str(out))
    return out

@pytest.fixture
def work(tmp_path, monkeypatch):
    "An empty working folder as the current directory (a default runs/ folder would appear in it)"
    monkeypatch.chdir(tmp_path)
    return tmp_path

# 1. one line, exit 2, nothing written --------------------------------------------------------------------------------

TRAIN_ERRORS = [
    (['--epochs', '0'], "--epochs 0: train for at least 1 epoch"),
    (['--epochs', '-3'], "--epochs -3: train for at least 1 epoch"),
    (['--size', '0'], "--size 0: an image side must be at least 1 pixel"),
    (['--bs', '0'], "--bs 0: a training batch needs at least 2 images (BatchNorm normalises with the batch's statistics)"),
    (['--bs', '1'], "--bs 1: a training batch needs at least 2 images (BatchNorm normalises with the batch's statistics)"),
    (['--test-pct', '1.0'], "--test-pct 1.0: expected a share of the rows, at least 0 and below 1"),
    (['--valid-pct', '-0.1'], "--valid-pct -0.1: expected a share of the rows, at least 0 and below 1"),
    (['--valid-pct', '.6', '--test-pct', '.6'], "--valid-pct 0.6 and --test-pct 0.6 add up to 1.2, leaving no row for training; they must add up to less than 1"),
    (['--lr', '0'], "--lr 0.0: the learning rate must be positive"),
    (['--arch', 'resnet81'], "--arch 'resnet81' is not a timm architecture; did you mean resnet18, resnet61q, resnet51q?"),
    (['--weighting', 'equal'], "--weighting 'equal': expected one of vanilla, uncertainty, gradnorm"),
    (['--n-synthetic', '0'], "--n-synthetic 0: draw at least 1 synthetic image"),
    (['--bs', '64'], "--bs 64: only 30 training rows, fewer than one batch (fastai drops an incomplete batch, so nothing would be trained); use a smaller --bs or more data"),
    (['--test-pct', '0'], "no test rows: --valid-pct 0.0 and --test-pct 0.0 of 40 rows leave none in any class; a train run reports test metrics, so give --test-pct above 0"),
    (['--tasks', 'label,stain'], "--tasks: unknown task 'stain'"),
]

@pytest.mark.parametrize('opts,msg', TRAIN_ERRORS, ids=[' '.join(o) for o, _ in TRAIN_ERRORS])
def test_train_option_errors_are_one_line(opts, msg, work, capsys):
    got = user_error(['train', 'synthetic', *SMALL, *opts, '--out', str(work/'out')], capsys, work)
    assert got.startswith(msg), got

def test_default_run_folder_is_not_left_behind(work, capsys):
    "Without --out the command would write runs/train-<time>: a failure after it is made (bad data) leaves neither it nor runs/"
    (work/'empty').mkdir()
    got = user_error(['train', str(work/'empty')], capsys, work)
    fct.test_eq(got, f"{work/'empty'} has no class sub-folders; expected one folder of images per class, e.g. {work/'empty'/'neutrophil'}")
    assert not (work/'runs').exists()

def test_missing_data_and_bad_out(work, capsys):
    got = user_error(['train', str(work/'nowhere'), '--out', str(work/'o')], capsys, work)
    fct.test_eq(got, f"DATA {str(work/'nowhere')!r} is neither a folder, a manifest CSV, nor 'synthetic'")
    (work/'o').mkdir(); (work/'o'/'model.pkl').write_text('mine')
    fct.test_eq(user_error(['train', 'synthetic', '--out', str(work/'o')], capsys, work), f"output folder {work/'o'} already holds files; choose another --out")
    fct.test_eq(user_error(['train', 'synthetic', '--out', str(work/'o'/'model.pkl')], capsys, work), f"--out {work/'o'/'model.pkl'} is a file; give a new or an empty folder")
    fct.test_eq((work/'o'/'model.pkl').read_text(), 'mine')

# 2. empty data ------------------------------------------------------------------------------------------------------

def test_empty_folder_and_empty_manifest(work, capsys):
    (work/'data'/'neutrophil').mkdir(parents=True)
    got = user_error(['train', str(work/'data'), '--out', str(work/'out')], capsys, work)
    assert "hold no files; expected images in each" in got, got
    (work/'m.csv').write_text('image,label\n')
    got = user_error(['train', str(work/'m.csv'), '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, f"{work/'m.csv'} has a header but no rows; expected a row per image")

def test_read_data_never_returns_an_empty_table(work, monkeypatch):
    "Whatever a reader returns, `read_data` refuses an empty table, naming the data"
    monkeypatch.setattr(workflow, 'load_pbc', lambda p, **kw: synth_wbc(3, size=32).iloc[:0])
    (work/'pbc').mkdir()
    with pytest.raises(ValueError, match=r"DATA '.*pbc' has no readable image"): workflow.read_data(str(work/'pbc'))

# 3. epochs, empty label columns, tasks without labelled training rows ----------------------------------------------

def _manifest(work, n=40, **cols):
    "A manifest of `n` synthetic cells with some columns replaced"
    t = synth_wbc(n, size=48, seed=0)
    for k, v in cols.items(): t[k] = pd.Series(v(t) if callable(v) else [v]*n if v is None else v, index=t.index, dtype=object)
    return str(save_manifest(t, work/'cells'/'m.csv'))

def test_empty_label_column_is_refused_before_training(work, capsys, monkeypatch):
    csv = _manifest(work, label=None)
    monkeypatch.setattr(workflow, 'mtl_dataloaders', lambda *a, **k: pytest.fail('training started'))
    got = user_error(['train', csv, '--tasks', 'label,mask', *SMALL, '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, "task 'label' has no labelled training row (its column(s) ['label'] are empty in all 40 rows); "
                     "remove it from --tasks or label some training images")

def test_task_labelled_only_outside_training_is_refused(work, capsys):
    "Masks only on the test rows of a manifest's own split: the mask task has nothing to learn from"
    split = ['train']*30 + ['test']*10
    csv = _manifest(work, split=split, mask=lambda t: [m if s == 'test' else None for m, s in zip(t['mask'], split)])
    got = user_error(['train', csv, '--tasks', 'label,mask', *SMALL, '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, "task 'mask' has no labelled training row (its 10 labelled rows are all in the valid or test split); "
                     "remove it from --tasks or label some training images")

def test_pbc_images_have_no_masks(pbc_path, work, capsys):
    "Real PBC cells (no masks) trained with the default tasks label,mask: the mask task is refused before training"
    for c in ('neutrophil', 'lymphocyte'):
        (work/'pbc'/c).mkdir(parents=True)
        for f in sorted((pbc_path/c).iterdir())[:12]: os.symlink(f, work/'pbc'/c/f.name)
    got = user_error(['train', str(work/'pbc'), '--bs', '8', '--epochs', '1', '--size', '48', '--out', str(work/'out')], capsys, work)
    assert got.startswith("task 'mask' has no labelled training row (its column(s) ['mask'] are empty in all 24 rows)"), got

def test_train_model_refuses_too(capsys):
    "The paper notebooks call `workflow.train_model` directly: it checks as the command does, before building anything"
    cells = synth_wbc(40, size=48, seed=0).assign(split=['train']*32 + ['test']*8)
    tasks = [classification_task(), segmentation_task()]
    for kw, msg in ((dict(epochs=0), '--epochs 0'), (dict(epochs=-1), '--epochs -1'), (dict(bs=1), '--bs 1'), (dict(size=0), '--size 0')):
        with pytest.raises(ValueError, match=re.escape(msg)): workflow.train_model(cells, tasks, **{**dict(size=48, bs=16, epochs=1), **kw})
    with pytest.raises(ValueError, match="task 'label' has no labelled training row"):
        workflow.train_model(cells.assign(label=None), tasks, size=48, bs=16, epochs=1)
    with pytest.raises(ValueError, match="task 'mask' has no labelled training row"):
        workflow.train_model(cells.assign(mask=cells['mask'].where(cells.split == 'test')), tasks, size=48, bs=16, epochs=1)

# 4. memory and implausible sizes ------------------------------------------------------------------------------------

def test_batch_that_does_not_fit_is_refused_before_allocation(work, capsys, monkeypatch):
    monkeypatch.setattr(workflow, 'available_memory', lambda device=None: 2**30)
    monkeypatch.setattr(workflow, 'mtl_dataloaders', lambda *a, **k: pytest.fail('batches were allocated'))
    got = user_error(['train', 'synthetic', '--n-synthetic', '40', '--size', '512', '--bs', '16', '--out', str(work/'out')], capsys, work)
    m = re.fullmatch(r"--size 512 --bs 16: training resnet18 needs about ([\d.]+) GiB \((\d+) MiB per image, (\d+) MiB for weights, "
                     r"gradients and optimiser state\) but 1\.0 GiB of memory is available; --bs (\d+) would fit", got)
    assert m, got
    need, per, fixed, fit = float(m[1]), int(m[2]), int(m[3]), int(m[4])
    fct.test_close(need*1024, 16*per + fixed, eps=2*16)
    assert fit*per + fixed <= 1024 < (fit+1)*per + fixed

def test_absurd_size_warns_and_is_refused_with_the_real_memory(work, capsys):
    "16384 px: warned as implausible, and refused for memory whatever the machine (CPU RAM or GPU)"
    got = user_error(['train', 'synthetic', '--n-synthetic', '40', '--size', '16384', '--bs', '16', '--out', str(work/'out')], capsys, work)
    assert re.fullmatch(r"--size 16384 --bs 16: training resnet18 needs about [\d.]+ GiB .* of memory is available; "
                        r"even --bs 2 does not fit; --size \d+ with --bs 2 would", got), got
    # the warning line was checked by user_error's shape; its text through a direct call:
    with pytest.warns(UserWarning, match="--size 16384 is implausibly large for resnet18"):
        with pytest.raises(ValueError): workflow.check_memory([task_spec(synth_wbc(4, size=32), 'label')], 'resnet18', 16384, 16)

def test_size_below_the_stride_is_a_warning_line(work, capsys, monkeypatch):
    monkeypatch.setattr(workflow, 'available_memory', lambda device=None: 2**20)  # then refuse, so that nothing trains
    code, out, err = run(['train', 'synthetic', *SMALL, '--size', '16', '--out', str(work/'out')], capsys)
    fct.test_eq(code, 2)
    lines = err.splitlines()
    fct.test_eq(lines[0], "mtlrobust train: warning: --size 16 is smaller than resnet18's total stride 32: its deepest features see less than one pixel; use --size 32 or more")
    assert lines[1].startswith("mtlrobust train: error: --size 16 --bs 16: training resnet18 needs about") and lines[1].endswith(
        "the model alone does not fit; choose a smaller --arch"), lines[1]
    fct.test_eq(len(lines), 2); assert not (work/'out').exists()

def test_memory_probe_is_fast_and_counts_what_training_saves():
    specs = [task_spec(synth_wbc(4, size=32), t) for t in (classification_task(), segmentation_task())]
    workflow.training_memory(specs, 'resnet18', 64)  # first call imports and builds lazily
    start = time.time(); m = workflow.training_memory(specs, 'resnet18', 256)
    assert time.time() - start < 2, time.time() - start
    fct.test_eq(m['stride'], 32)
    fct.test_close(m['fixed']/2**20, 4*49.03, eps=0.5)  # weights, gradients and Adam's two moments: 4 x 12.85M float32 parameters
    fct.test_close(m['per_image']/2**20, 45.1, eps=0.5)  # the bytes a CPU forward pass saves for backward at 256 px

# 5. attack options ---------------------------------------------------------------------------------------------------

ATTACK_ERRORS = [
    (['--eps=-1/255'], "--eps '-1/255': a budget must be at least 0, got -0.00392157"),
    (['--eps', '1/0'], "--eps: expected comma-separated numbers or fractions like '1/255,8/255', got '1/0'"),
    (['--eps', ','], "--eps ',': no budget given; expected numbers or fractions like '1/255,8/255'"),
    (['--steps', '0'], "--steps 0: an attack takes at least 1 step"),
    (['--attack', 'pgd,cw'], "--attack 'pgd,cw': unknown 'cw'; expected some of pgd, fgsm, wgd"),
    (['--norm', 'L1'], "--norm 'L1': unknown 'L1'; expected some of Linf, L2"),
    (['--tasks', ';'], "--tasks ';': expected task sets like 'label;mask;label,mask' (';' between sets, ',' within one)"),
    (['--split', 'tset'], "--split 'tset': expected one of train, valid, test"),
    (['--bn', 'robust'], "--bn 'robust'"),
]

@pytest.mark.parametrize('opts,msg', ATTACK_ERRORS, ids=[' '.join(o) for o, _ in ATTACK_ERRORS])
def test_attack_options_are_checked_before_the_model_is_loaded(opts, msg, work, capsys):
    "The model does not even exist: the option is refused first"
    got = user_error(['attack', str(work/'no-model.pkl'), 'synthetic', *opts, '--out', str(work/'out')], capsys, work)
    assert got.startswith(msg), got

def test_absurd_eps_is_warned_about(work, capsys):
    got = user_error(['attack', str(work/'no-model.pkl'), 'synthetic', '--eps', '300', '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, f"MODEL {str(work/'no-model.pkl')!r}: no such file or folder; give the folder of a train run or its model.json")
    code, out, err = run(['attack', str(work/'no-model.pkl'), 'synthetic', '--eps', '300', '--out', str(work/'out')], capsys)
    fct.test_eq(err.splitlines()[0], "mtlrobust attack: warning: --eps '300': an Linf budget of 300 exceeds 1, the whole range of an "
                                     "image's pixels (images are in [0, 1]); did you mean 300/255?")
    code, out, err = run(['attack', str(work/'no-model.pkl'), 'synthetic', '--eps', '3', '--norm', 'L2', '--out', str(work/'out')], capsys)
    assert 'warning' not in err, err  # an L2 budget is the norm of the whole perturbation: above 1 is ordinary

def test_attacked_tasks_must_be_the_models(trained, work, capsys):
    got = user_error(['attack', str(trained), 'synthetic', '--tasks', 'domain;concepts', '--n-synthetic', '8', '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, "--tasks: none of the task sets ['domain', 'concepts'] is made of the model's tasks label, mask")

# models and evaluate -------------------------------------------------------------------------------------------------

def test_bad_model_files(trained, work, capsys):
    (work/'trunc.pkl').write_bytes((trained/'model.pkl').read_bytes()[:668])  # what an interrupted save used to leave
    for model, msg, opts in ((work/'trunc.pkl', "is not a model saved by mtlrobust train, or it is damaged (PytorchStreamReader failed", ['--trust-pickle']),
                             (work/'trunc.pkl', "is a pickle: unpickling runs whatever code the file names", []),
                             (trained/'split.csv', "a saved model is NAME.json + NAME.safetensors or their folder, not a .csv file", []),
                             (work/'none.pkl', "no such file or folder; give the folder of a train run or its model.json", [])):
        got = user_error(['evaluate', str(model), 'synthetic', *opts, '--out', str(work/'e.json')], capsys, work)
        assert msg in got, got

def test_evaluate_refuses_existing_json_before_loading(trained, work, capsys, monkeypatch):
    (work/'e.json').write_text('{}')
    monkeypatch.setattr(cli, 'load_model', lambda *a, **k: pytest.fail('model loaded'))
    fct.test_eq(user_error(['evaluate', str(trained), 'synthetic', '--out', str(work/'e.json')], capsys, work),
                f"{work/'e.json'} already exists; choose another --out")
    fct.test_eq((work/'e.json').read_text(), '{}')

def test_demo_epochs(work, capsys):
    fct.test_eq(user_error(['demo', '--epochs', '0'], capsys, work), "--epochs 0: train for at least 1 epoch")

# 1. bugs keep their traceback; --debug shows it always ---------------------------------------------------------------

def test_debug_raises_the_exception_itself(work):
    with pytest.raises(ValueError, match='--epochs 0'): main(['train', 'synthetic', '--epochs', '0', '--debug', '--out', str(work/'o')])
    with pytest.raises(ValueError, match='--epochs 0'): main(['--debug', 'train', 'synthetic', '--epochs', '0', '--out', str(work/'o')])
    fct.test_eq(files_under(work), [])

def test_a_bug_is_not_a_user_error(work, monkeypatch):
    "A TypeError from inside is a bug: it propagates with its traceback, and the run still leaves nothing"
    def broken(*a, **k): raise TypeError("'NoneType' object is not iterable")
    monkeypatch.setattr(cli, 'parse_tasks', broken)
    with pytest.raises(TypeError, match='NoneType'): main(['train', 'synthetic', *SMALL])
    fct.test_eq(files_under(work), [])

def test_console_one_line_and_traceback_with_debug(tmp_path):
    "The real console script (python -m mtlrobust): exactly one line on stderr and status 2; --debug: the traceback, status 1"
    cmd = [sys.executable, '-m', 'mtlrobust', 'train', 'synthetic', '--epochs', '0', '--out', str(tmp_path/'o')]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    fct.test_eq((r.returncode, r.stderr), (2, "mtlrobust train: error: --epochs 0: train for at least 1 epoch\n"))
    r = subprocess.run(cmd + ['--debug'], capture_output=True, text=True, cwd=tmp_path)
    fct.test_eq(r.returncode, 1)
    assert r.stderr.startswith('Traceback') and r.stderr.rstrip().endswith('ValueError: --epochs 0: train for at least 1 epoch'), r.stderr[-500:]
    fct.test_eq(files_under(tmp_path), [])

# 6. interrupted or failed runs leave nothing --------------------------------------------------------------------------

def _interrupt_after_writing(path, *a, **k):
    "A saver killed half-way: some bytes written, then Ctrl-C"
    Path(path).write_text('image,mask,lab'); raise KeyboardInterrupt

def test_interrupted_train_leaves_no_model(work, capsys, monkeypatch):
    "Ctrl-C while saving split.csv, after model.pkl was written: neither file, nor the folder, nor runs/ remains"
    monkeypatch.setattr(cli, 'save_manifest', lambda table, csv: _interrupt_after_writing(csv))
    code, out, err = run(['train', 'synthetic', *SMALL], capsys)
    fct.test_eq((code, err.splitlines()[-1]), (130, "mtlrobust train: interrupted"))
    fct.test_eq(files_under(work), [])

def test_interrupted_train_in_a_users_empty_folder(work, capsys, monkeypatch):
    "The user's own (empty) --out folder is kept; only what the run wrote goes"
    (work/'mine').mkdir()
    monkeypatch.setattr(cli, 'save_manifest', lambda table, csv: _interrupt_after_writing(csv))
    fct.test_eq(run(['train', 'synthetic', *SMALL, '--out', str(work/'mine')], capsys)[0], 130)
    fct.test_eq(files_under(work), ['mine'])

def test_interrupted_evaluate_and_attack_and_demo(trained, work, capsys, monkeypatch):
    before = files_under(trained)
    monkeypatch.setattr(cli, 'evaluate_table', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    fct.test_eq(run(['evaluate', str(trained), 'synthetic', '--n-synthetic', '8'], capsys)[0], 130)
    fct.test_eq(files_under(trained), before)  # no evaluate-synthetic.json beside the model
    def interrupt(report): # report.csv is written (under its temporary name) when the figure is drawn
        assert len(list((work/'attack').glob('.report.partial-*.csv'))) == 1; raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'plot_robustness', interrupt)
    code, out, err = run(['attack', str(trained), 'synthetic', '--attack', 'fgsm', '--eps', '4/255', '--tasks', 'label',
                          '--n-synthetic', '8', '--out', str(work/'attack')], capsys)
    fct.test_eq(code, 130); fct.test_eq(files_under(work), [])
    monkeypatch.setattr(cli, 'run_demo', lambda **k: pd.DataFrame({'accuracy': [0.5]}))
    monkeypatch.setattr(cli, 'plot_demo', lambda res, fname: _interrupt_after_writing(fname))
    fct.test_eq(run(['demo'], capsys)[0], 130)
    fct.test_eq(files_under(work), [])

def test_failed_save_leaves_nothing(work, capsys, monkeypatch):
    "A full disk while writing metrics.json: an OSError, reported in one line; the model already written is removed too"
    def disk_full(self, *a, **k): raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Path, 'write_text', disk_full)
    got = user_error(['train', 'synthetic', *SMALL, '--out', str(work/'out')], capsys, work)
    fct.test_eq(got, "[Errno 28] No space left on device")

def test_successful_run_has_only_its_files(trained):
    fct.test_eq(files_under(trained), ['metrics.json', 'model.json', 'model.pkl', 'model.safetensors', 'split.csv'])
    fct.test_eq(json.loads((trained/'metrics.json').read_text())['epochs'], 1)
