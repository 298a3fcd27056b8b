"The safe model format: weights (safetensors) + JSON description rebuild a learner that predicts like the pickled one; pickles are refused unless trusted"
import io, json, pickle, shutil, sys, dataclasses
import numpy as np, pandas as pd, pytest, torch
import fastcore.test as fct
from fastai.vision.all import load_learner, set_seed
from mtlrobust.core import read_mask
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.tasks import *
from mtlrobust.learner import mtl_learner, MTLLearner
from mtlrobust.attacks import MultiTaskPGD
from mtlrobust.callback.adversarial import AdversarialTraining, MixBN, DualBatchNorm, bn_branch, dual_bns
from mtlrobust.export import *

@pytest.fixture(scope='module')
def cells():
    t = pd.concat([synth_wbc(24, size=32, domain=d, seed=0) for d in 'AB'], ignore_index=True)
    t['nucleus'] = [float((read_mask(m) == 2).mean()) for m in t['mask']]
    return t.assign(split=(['train']*16 + ['valid']*8)*2)

def _fit(learn):
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    return learn

@pytest.fixture(scope='module')
def saved(cells, tmp_path_factory):
    "A 4-task model (class, mask, concept, adversarial domain) trained one epoch, pickled and saved in the safe format"
    set_seed(0, reproducible=True)
    tasks = [classification_task(), segmentation_task(), concept_task('nucleus'), adversarial_task('domain')]
    dls = mtl_dataloaders(cells, tasks=tasks, size=32, bs=16, num_workers=0)
    learn = _fit(mtl_learner(dls, arch='resnet10t', emb_sizes=(32,), decoder_channels=(16, 8), weighting='uncertainty'))
    folder = tmp_path_factory.mktemp('run')
    learn.export(folder/'model.pkl')
    save_model(learn, folder)
    return learn, folder

def _preds(learn, table):
    with learn.no_bar(): return learn.get_preds(dl=learn.labelled_dl(table), with_decoded=True)

def _same_preds(a, b, table):
    "Probabilities equal to float precision, decoded classes and masks identical, same targets"
    (p1, y1, d1), (p2, y2, d2) = _preds(a, table), _preds(b, table)
    fct.test_eq(set(p2), set(p1))
    for k in p1: fct.test_close(p2[k], p1[k], eps=1e-5)
    for t, x1, x2 in zip(a.tasks, d1, d2):
        if t.vocab is None: fct.test_close(x2, x1, eps=1e-5)
        else: fct.test_eq(x2, x1)
    for x1, x2 in zip(y1, y2): fct.test_eq(x2, x1)

def test_description_records_what_rebuilds_the_model(saved):
    learn, folder = saved
    d = json.loads((folder/'model.json').read_text())
    fct.test_eq((d['format'], d['format_version']), ('mtlrobust-model', 1))
    fct.test_eq(d['model'], dict(arch='resnet10t', emb_sizes=[32], dropout=0.2, decoder_channels=[16, 8], in_chans=3))
    fct.test_eq([(t['kind'], t['fields']['name']) for t in d['tasks']],
                [('classification', 'label'), ('segmentation', 'mask'), ('regression', 'concepts'), ('classification', 'domain')])
    fct.test_eq(d['tasks'][0]['fields']['vocab'], list(learn.tasks[0].vocab))
    fct.test_eq(d['tasks'][3]['fields']['adversarial'], True)
    fct.test_eq(d['tasks'][1]['fields']['dice_weight'], 1.)
    fct.test_eq(d['input'], dict(size=[32, 32], resize_method='squash', pad_mode='reflection', channels=3))
    fct.test_close(d['normalize']['mean'], learn.model.normalize.mean.flatten().tolist())
    fct.test_eq(d['mixbn'], False)
    fct.test_eq(d['weighting']['name'], 'uncertainty')
    fct.test_close(list(d['weighting']['task_weights'].values()), list(learn.loss_func.task_weights().values()))

def test_safe_model_predicts_like_the_pickle(saved, cells):
    learn, folder = saved
    pickled, safe = load_learner(folder/'model.pkl'), load_model(folder, device='cpu')
    assert isinstance(safe, MTLLearner)
    fct.test_eq(safe.tasks, learn.tasks)
    for k, v in learn.model.state_dict().items(): fct.test_eq(safe.model.state_dict()[k], v)
    _same_preds(pickled, safe, cells[cells.split == 'valid'])
    img = cells.image[cells.split == 'valid'].iloc[1]
    with pickled.no_bar(), safe.no_bar(): r1, r2 = pickled.predict(img), safe.predict(img)
    fct.test_eq(r2['label'][0], r1['label'][0])
    fct.test_close(r2['label'][1], r1['label'][1], eps=1e-5)
    fct.test_eq(r2['mask'].shape, (32, 32)); fct.test_eq(r2['mask'], r1['mask'])
    fct.test_close(r2['concepts'], r1['concepts'], eps=1e-5)
    fct.test_close(safe.loss_func.task_weights()['concepts'], learn.loss_func.task_weights()['concepts'])

def test_either_file_or_the_folder_loads(saved, cells):
    _, folder = saved
    a, b = load_model(folder/'model.json', device='cpu'), load_model(folder/'model.safetensors', device='cpu')
    _same_preds(a, b, cells.iloc[:4])

def test_mixbn_model_keeps_both_branches(cells, tmp_path):
    set_seed(0, reproducible=True)
    dls = mtl_dataloaders(cells, tasks=['label', 'mask'], size=32, bs=16, num_workers=0)
    learn = _fit(mtl_learner(dls, arch='resnet10t', emb_sizes=(32,), decoder_channels=(16, 8),
                             cbs=[AdversarialTraining(MultiTaskPGD('label', eps=4/255, steps=1)), MixBN()]))
    n = len(dual_bns(learn.model)); assert n > 10
    learn.export(tmp_path/'model.pkl')
    save_model(learn, tmp_path)
    fct.test_eq(json.loads((tmp_path/'model.json').read_text())['mixbn'], True)
    pickled, safe = load_learner(tmp_path/'model.pkl'), load_model(tmp_path, device='cpu')
    fct.test_eq(len(dual_bns(safe.model)), n)
    valid = cells[cells.split == 'valid']
    for branch in ('clean', 'adv'):
        with bn_branch(pickled.model, branch), bn_branch(safe.model, branch): _same_preds(pickled, safe, valid)
    with bn_branch(safe.model, 'clean'): clean = _preds(safe, valid)[0]['label']
    with bn_branch(safe.model, 'adv'): adv = _preds(safe, valid)[0]['label']
    assert (clean - adv).abs().max() > 1e-4  # the two branches are really different BatchNorms

class _Payload:
    "Unpickling this object calls io.open(marker, 'w'): a file appears"
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (io.open, (self.marker, 'w'))

def test_crafted_pickle_is_refused_without_running(tmp_path):
    marker, evil = tmp_path/'payload-ran.txt', tmp_path/'model.pkl'
    evil.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError) as e: load_model(evil)
    assert 'trust_pickle=True' in str(e.value) and str(evil) in str(e.value) and 'docs.python.org/3/library/pickle' in str(e.value)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match='trust_pickle=True'): load_model(tmp_path)  # a folder holding only the pickle
    assert not marker.exists()
    with pytest.raises(Exception): load_model(evil, trust_pickle=True)  # the user opted in: the payload runs, then fastai fails
    assert marker.exists()

def test_trusted_pickle_loads_with_load_learner(saved, cells):
    learn, folder = saved
    old = load_model(folder/'model.pkl', trust_pickle=True, device=learn.dls.device)  # compared on the device it trained on
    assert isinstance(old, MTLLearner)
    _same_preds(learn, old, cells.iloc[:4])

def test_old_pickle_without_config_converts(saved, cells, tmp_path):
    _, folder = saved
    old = load_model(folder/'model.pkl', trust_pickle=True, device='cpu')
    del old.model.config  # a model pickled before MultiTaskModel recorded its settings
    save_model(old, tmp_path)
    _same_preds(old, load_model(tmp_path, device='cpu'), cells.iloc[:4])

def test_overwrite_is_refused(saved, tmp_path):
    learn, _ = saved
    jf, wf = save_model(learn, tmp_path, name='m')
    before = wf.read_bytes()
    with pytest.raises(FileExistsError, match='m.json'): save_model(learn, tmp_path, name='m')
    jf.unlink()
    with pytest.raises(FileExistsError, match='m.safetensors'): save_model(learn, tmp_path, name='m')
    assert wf.read_bytes() == before  # (fct.test_eq walks bytes one by one: slow on 20 MB)
    fct.test_eq(sorted(p.name for p in tmp_path.iterdir()), ['m.safetensors'])  # no temporary file left behind

def _copy(folder, dest):
    dest.mkdir()
    for f in ('model.json', 'model.safetensors'): shutil.copy(folder/f, dest/f)
    return dest

def _edit(jf, **changes):
    d = json.loads(jf.read_text()); d.update(changes); jf.write_text(json.dumps(d))
    return d

def test_unknown_kind_is_a_clear_error_and_imports_nothing(saved, tmp_path):
    _, folder = saved
    m = _copy(folder, tmp_path/'m')
    d = json.loads((m/'model.json').read_text())
    d['tasks'][2] = dict(d['tasks'][2], kind='ordinal', **{'class': 'evil_mtl_module.OrdinalTask'})
    _edit(m/'model.json', tasks=d['tasks'])
    with pytest.raises(ValueError, match="kind 'ordinal'") as e: load_model(m)
    assert str(m/'model.json') in str(e.value) and 'import the module' in str(e.value)
    assert 'evil_mtl_module' not in sys.modules

def test_user_kind_loads_once_its_class_is_defined(cells, tmp_path):
    @dataclasses.dataclass
    class ShapeTask(RegressionTask): kind = 'test_export_shape'
    dls = mtl_dataloaders(cells, tasks=[classification_task(), ShapeTask('shape', ['nucleus'])], size=32, bs=16, num_workers=0)
    learn = mtl_learner(dls, arch='resnet10t', emb_sizes=(16,))
    save_model(learn, tmp_path)
    back = load_model(tmp_path, device=learn.dls.device)
    fct.test_eq(type(back.tasks[1]), ShapeTask)
    _same_preds(learn, back, cells.iloc[:4])

def test_weights_that_do_not_match_are_clear_errors(saved, cells, tmp_path):
    learn, folder = saved
    other = mtl_learner(mtl_dataloaders(cells, tasks=['label'], size=32, bs=16, num_workers=0), arch='resnet10t', emb_sizes=(32,))
    save_model(other, tmp_path/'other')
    m = _copy(folder, tmp_path/'m')
    shutil.copy(tmp_path/'other'/'model.safetensors', m/'model.safetensors')
    with pytest.raises(ValueError, match='is not the weights') as e: load_model(m)
    assert str(m/'model.safetensors') in str(e.value) and str(m/'model.json') in str(e.value)
    d = json.loads((tmp_path/'other'/'model.json').read_text())  # a description edited to claim the other weights
    _edit(m/'model.json', weights=d['weights'])
    with pytest.raises(ValueError, match='does not fit the model') as e: load_model(m)
    assert 'model.safetensors' in str(e.value) and 'model.json' in str(e.value)

def test_bad_files_are_clear_errors(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match='model not found'): load_model(tmp_path/'nowhere.json')
    m = _copy(folder, tmp_path/'m')
    _edit(m/'model.json', format_version=2)
    with pytest.raises(ValueError, match='format version 2') as e: load_model(m)
    assert str(m/'model.json') in str(e.value)
    _edit(m/'model.json', format_version=1, format='something-else')
    with pytest.raises(ValueError, match="'format' is 'something-else'"): load_model(m)
    (m/'model.json').write_text('not json')
    with pytest.raises(ValueError, match='is not a JSON model description'): load_model(m/'model.json')
    (m/'model.safetensors').unlink()
    with pytest.raises(FileNotFoundError, match='model.safetensors not found'): load_model(m/'model.json')

def test_description_cannot_make_timm_fetch_files(saved, tmp_path):
    _, folder = saved
    m = _copy(folder, tmp_path/'m')
    d = _edit(m/'model.json')
    _edit(m/'model.json', model=dict(d['model'], checkpoint_path=str(tmp_path/'x.pth')))
    with pytest.raises(ValueError, match='checkpoint_path'): load_model(m)
    _edit(m/'model.json', model=dict(d['model'], arch='hf-hub:someone/model'))
    with pytest.raises(ValueError, match="timm's registry"): load_model(m)
