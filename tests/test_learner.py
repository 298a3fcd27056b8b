"Integration tests of the multi-task learner: training lowers every task's loss, weighting, export, fastai tools"
import numpy as np, pandas as pd, pytest, torch
import fastcore.test as fct
from fastai.vision.all import load_learner, set_seed
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.tasks import *
from mtlrobust.learner import mtl_learner, MTLLearner

@pytest.fixture(scope='module')
def cells():
    t = synth_wbc(96, size=48, domain='A', seed=0)
    return t.assign(split=['train']*64 + ['valid']*32)

def _learner(cells, tasks, **kwargs):
    set_seed(0, reproducible=True)
    dls = mtl_dataloaders(cells, tasks=tasks, size=48, bs=16, num_workers=0, seed=0)
    return mtl_learner(dls, arch='resnet18', emb_sizes=(64,), **kwargs)

def _valid_task_losses(learn):
    "Mean validation loss of each task, from the loss's per-batch record"
    sums = {}
    for xb, *yb in learn.dls.valid:
        with torch.no_grad(): learn.loss_func(learn.model.eval()(xb), *yb)
        for k, v in learn.loss_func.last_losses.items(): sums[k] = sums.get(k, 0) + float(v)
    return sums

def test_short_training_lowers_every_task_loss(cells):
    learn = _learner(cells, ['label', 'mask'])
    before = _valid_task_losses(learn)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(4, 3e-3)
    after = _valid_task_losses(learn)
    for k in before: assert after[k] < before[k], (k, before[k], after[k])

def test_concept_and_adversarial_heads_train(cells):
    t = add_random_target(cells.assign(area=np.linspace(-1, 1, len(cells)), site=['x', 'y']*(len(cells)//2)), seed=1)
    learn = _learner(t, [classification_task(), concept_task('area'), adversarial_task('site'), random_task()])
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 2e-3)
    fct.test_eq(len(learn.model.reversals), 1)
    fct.test_eq(list(learn.task_history.columns[:1]), ['epoch'])
    assert {'concepts_weight', 'site_weight', 'random_weight', 'site_loss'} <= set(learn.task_history.columns)
    assert 0 < learn.model.reversals[0].lambda_ < 1  # Ganin's ramp, not yet at full strength

def test_uncertainty_weights_are_learned(cells):
    learn = _learner(cells, ['label', 'mask'], weighting='uncertainty')
    s0 = learn.loss_func.task_weights()
    with learn.no_bar(), learn.no_logging(): learn.fit(2, 1e-2)
    s1 = learn.loss_func.task_weights()
    assert all(s0[k] != s1[k] for k in s0), (s0, s1)
    fct.test_eq(len(learn.task_history), 2)

def test_gradnorm_learner_trains_and_keeps_weight_sum(cells):
    learn = _learner(cells, ['label', 'mask'], weighting='gradnorm')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    fct.test_close(sum(learn.loss_func.task_weights().values()), 2., eps=1e-4)

def test_export_load_identical_predictions(cells, tmp_path):
    learn = _learner(cells, ['label', 'mask'])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    p, t = learn.get_preds()
    learn.export(tmp_path/'m.pkl')
    learn2 = load_learner(tmp_path/'m.pkl')
    assert isinstance(learn2, MTLLearner)
    dl = learn2.dls.test_dl(cells[cells.split == 'valid'].reset_index(drop=True), with_labels=True, num_workers=0)
    p2, t2 = learn2.get_preds(dl=dl)
    for k in p: fct.test_close(p2[k], p[k], eps=1e-5)

def test_lr_find_and_confusion_matrix(cells):
    learn = _learner(cells, ['label', 'mask'])
    with learn.no_bar(), learn.no_logging(): res = learn.lr_find(num_it=6, show_plot=False)
    assert res.valley > 0
    cm = learn.interpret('label').confusion_matrix()
    fct.test_eq(cm.sum(), 32)
