"Property and integration tests of adversarial training: mixed batches, dual BatchNorm routing, MixBN learners, HPAT"
import copy
import pytest, torch, torch.nn as nn
import fastcore.test as fct
from fastai.vision.all import Callback, load_learner, set_seed, Adam
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.weighting import MultiTaskLoss
from mtlrobust.models import MultiTaskModel
from mtlrobust.tasks import classification_task, segmentation_task
from mtlrobust.learner import mtl_learner
from mtlrobust.attacks import MultiTaskPGD, SpatialAttack, HybridAttack, spatial_transform
from mtlrobust.callback.adversarial import *

def FGSM(eps=8/255):
    "FGSM on the summed task losses: one PGD step from the clean image"
    return MultiTaskPGD(eps=eps, steps=1, random_start=False)

# --- stand-in attacks of the protocol `x_adv, ys_adv = attack(model, x, *ys)`, for exact checks and misbehaviour ---

class QuarterTurn:
    "Rotate images and masks by 90 degrees"
    def __call__(self, model, x, *ys): return x.rot90(1, (2, 3)), tuple(y.rot90(1, (1, 2)) if y.ndim == 3 else y for y in ys)

class LeakyFGSM:
    "FGSM that computes its gradient with `backward`, leaving gradients on the parameters"
    eps = 8/255
    def __call__(self, model, x, *ys):
        mode, x = model.training, x.detach().clone().requires_grad_()
        MultiTaskLoss(model.tasks)(model.eval()(x), *ys).backward()
        model.train(mode)
        return (x + self.eps*x.grad.sign()).clamp(0, 1).detach(), ys

class KeepBatches(Callback):
    "Record (training, xb, yb, adv_rows) of every batch as the step sees it"
    order = AdversarialTraining.order + 2
    def before_fit(self): self.batches = []
    def before_batch(self): self.batches.append((self.training, self.xb[0].clone(), [y.clone() for y in self.yb], self.learn.adv_rows))

# --- fixtures ---

@pytest.fixture(scope='module')
def cells():
    t = synth_wbc(24, size=48, domain='A', seed=0)
    return t.assign(split=['train']*16 + ['valid']*8)

@pytest.fixture(scope='module')
def dls(cells): return mtl_dataloaders(cells, tasks=['label', 'mask'], size=32, bs=8, aug=False, num_workers=0, seed=0)

def _learner(dls, cbs=None):
    set_seed(0, reproducible=True)
    return mtl_learner(dls, emb_sizes=(32,), decoder_channels=(16, 8, 8, 8), dropout=0., opt_func=Adam, cbs=cbs)

def _fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging(): learn.fit(*args, **kwargs)

def _bn_types(): return nn.modules.batchnorm._BatchNorm

def _branch_copy(model, branch):
    "A plain copy of a MixBN model whose dual BatchNorms are replaced by their `branch` BatchNorm"
    m = copy.deepcopy(model)
    for mod in list(m.modules()):
        for name, child in mod.named_children():
            if isinstance(child, DualBatchNorm): setattr(mod, name, getattr(child, branch))
    return m

def _randomize_bns(model):
    "Give every BatchNorm non-default weights and running statistics, as after pretraining"
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _bn_types()):
            for t in (m.weight, m.bias, m.running_mean): t.data.copy_(torch.randn(t.shape, generator=g)*0.1 + t.data)
            m.running_var.data.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)

# --- DualBatchNorm ---

@pytest.mark.parametrize('bn_cls, shape', [(nn.BatchNorm2d, (6, 3, 4, 4)), (nn.BatchNorm1d, (6, 5))])
@pytest.mark.parametrize('adv', [[0, 0, 0, 1, 1, 1], [1, 0, 1, 0, 0, 1]])
def test_each_branch_is_a_plain_bn_fed_its_own_rows(bn_cls, shape, adv):
    torch.manual_seed(0)
    bn = bn_cls(shape[1])
    ref_c, ref_a = copy.deepcopy(bn), copy.deepcopy(bn)
    dual, rows = DualBatchNorm(bn).train(), torch.tensor(adv).bool()
    x = torch.randn(shape); x[rows] = 4*x[rows] - 1
    x.requires_grad_()
    dual.route = row_route(rows)
    out = dual(x)
    fct.test_close(out[~rows], ref_c(x[~rows])); fct.test_close(out[rows], ref_a(x[rows]))
    for b, ref in ((dual.clean, ref_c), (dual.adv, ref_a)):
        for k, v in ref.named_buffers(): fct.test_close(dict(b.named_buffers())[k], v)
    (out[rows]**2).sum().backward()  # adversarial rows only: no gradient reaches the clean affine parameters
    assert dual.adv.weight.grad.abs().sum() > 0
    fct.test_eq(dual.clean.weight.grad.abs().sum(), 0.)

def test_clean_branch_unchanged_by_adversarial_only_batch():
    dual = DualBatchNorm(nn.BatchNorm2d(3)).train()
    before = copy.deepcopy(dual.clean.state_dict())
    dual.route = row_route(torch.ones(4, dtype=torch.bool))
    dual(torch.randn(4, 3, 5, 5)*3 + 1).sum().backward()
    for k, v in dual.clean.state_dict().items(): fct.test_eq(v, before[k])
    assert dual.clean.weight.grad is None and dual.adv.num_batches_tracked == 1

def test_stale_route_is_refused():
    dual = DualBatchNorm(nn.BatchNorm2d(3))
    dual.route = row_route(torch.tensor([False, True]))
    fct.test_fail(lambda: dual(torch.randn(3, 3, 2, 2)), contains='stale')

def test_conversion_is_idempotent_and_keeps_bn_weights_in_both_branches():
    model = MultiTaskModel('resnet18', [classification_task(vocab=['a', 'b']), segmentation_task()],
                           emb_sizes=(16,), decoder_channels=(8, 8, 8, 8))
    _randomize_bns(model)
    bns = [m for m in model.modules() if isinstance(m, _bn_types())]
    states = [copy.deepcopy(b.state_dict()) for b in bns]
    fct.test_eq(convert_to_mixbn(model), len(bns))
    fct.test_eq(convert_to_mixbn(model), 0)
    duals = dual_bns(model)
    fct.test_eq(len(duals), len(bns))
    for d, b, s in zip(duals, bns, states):
        assert d.clean is b and d.adv is not b
        for branch in (d.clean, d.adv):
            for k, v in branch.state_dict().items(): fct.test_eq(v, s[k])
    assert {type(d.clean) for d in duals} == {nn.BatchNorm1d, nn.BatchNorm2d}

def test_eval_uses_clean_branch_by_default_and_adv_when_asked():
    model = MultiTaskModel('resnet18', [classification_task(vocab=['a', 'b']), segmentation_task()],
                           emb_sizes=(16,), decoder_channels=(8, 8, 8, 8))
    convert_to_mixbn(model)
    for d in dual_bns(model): d.adv.running_mean.add_(0.3); d.adv.weight.data.mul_(1.5)
    model.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, ref_clean, ref_adv = model(x), _branch_copy(model, 'clean')(x), _branch_copy(model, 'adv')(x)
        with bn_branch(model, 'adv'): out_adv = model(x)
        out_after = model(x)
    for k in out:
        fct.test_close(out[k], ref_clean[k]); fct.test_close(out_adv[k], ref_adv[k]); fct.test_close(out_after[k], out[k])
    assert (out_adv['label'] - out['label']).abs().max() > 1e-3

# --- mixed batches ---

def test_replace_layout_keeps_batch_size_and_rotates_masks_with_images(dls):
    model = _learner(dls).model
    x, lab, msk = dls.train.one_batch()
    xb, (lb, mb), rows = adversarial_batch(QuarterTurn(), model, x, lab, msk, ratio=0.25)
    fct.test_eq(xb.shape, x.shape); fct.test_eq(rows.tolist(), [False]*6 + [True]*2)
    fct.test_eq(xb[:6], x[:6]); fct.test_eq(xb[6:], x[6:].rot90(1, (2, 3)))
    fct.test_eq(mb[6:], msk[6:].rot90(1, (1, 2))); fct.test_eq(mb[:6], msk[:6]); fct.test_eq(lb, lab)
    assert (mb[6:] != msk[6:]).any()

def test_concat_layout_appends_adversarial_copies(dls):
    model = _learner(dls).model
    x, lab, msk = dls.train.one_batch()
    xb, (lb, mb), rows = adversarial_batch(FGSM(), model, x, lab, msk, ratio=0.5, concat=True)
    fct.test_eq(xb.shape, (16, 3, 32, 32)); fct.test_eq(rows.sum(), 8); fct.test_eq(xb[:8], x)
    fct.test_close((xb[8:] - x).abs().max(), 8/255, eps=1e-5)
    fct.test_eq(lb, torch.cat([lab, lab])); fct.test_eq(mb, torch.cat([msk, msk]))
    fct.test_eq(adversarial_batch(FGSM(), model, x, lab, msk, ratio=0.2, concat=True)[0].shape[0], 10)
    fct.test_fail(lambda: adversarial_batch(FGSM(), model, x, lab, msk, ratio=0.6, concat=True), contains='[0, 0.5]')

def test_attack_gradients_do_not_leak_into_training(dls):
    model = _learner(dls).model.train()
    x, lab, msk = dls.train.one_batch()
    adversarial_batch(LeakyFGSM(), model, x, lab, msk, ratio=0.5)
    assert all(p.grad is None for p in model.parameters())
    assert model.training

def test_callback_replaces_training_batches_only(dls):
    keep = KeepBatches()
    learn = _learner(dls, cbs=[AdversarialTraining(QuarterTurn(), ratio=0.5)])
    dls.train.shuffle = False
    try:
        _fit(learn, 1, 1e-3, cbs=keep)
        train_batches = list(dls.train)
    finally: dls.train.shuffle = True
    valid_batches = list(dls.valid)
    tr = [b for b in keep.batches if b[0]]; va = [b for b in keep.batches if not b[0]]
    fct.test_eq(len(tr), 2); fct.test_eq(len(va), 1)
    for (_, xa, (la, ma), rows), (x, lab, msk) in zip(tr, train_batches):
        fct.test_eq(rows.tolist(), [False]*4 + [True]*4)
        fct.test_eq(xa[4:], x[4:].rot90(1, (2, 3))); fct.test_eq(ma[4:], msk[4:].rot90(1, (1, 2))); fct.test_eq(la, lab)
    (_, xv, (lv, mv), rows_v), (x, lab, msk) = va[0], valid_batches[0]
    fct.test_eq(xv, x); fct.test_eq(lv, lab); fct.test_eq(mv, msk); assert rows_v is None

# --- MixBN in a learner ---

def test_mixbn_learner_routes_each_half_to_its_own_statistics(dls):
    learn = _learner(dls, cbs=[AdversarialTraining(FGSM(), ratio=0.5, concat=True), MixBN()])
    learn.create_opt()
    bb, seen = learn.model.backbone, []
    start = copy.deepcopy(bb.bn1)
    h = bb.conv1.register_forward_hook(lambda m, i, o: seen.append((o.detach(), getattr(bb.bn1, 'route', None))))
    _fit(learn, 1, 1e-3)
    h.remove()
    train_seen = [(i, r) for i, r in seen if r is not None]
    fct.test_eq([r for _, r in train_seen], [RowRoute(16, 8)]*2)
    ref_c, ref_a = copy.deepcopy(start).train(), copy.deepcopy(start).train()
    for i, r in train_seen: ref_c(i[:r.split]); ref_a(i[r.split:])
    for branch, ref in ((bb.bn1.clean, ref_c), (bb.bn1.adv, ref_a)):
        for k, v in ref.named_buffers(): fct.test_close(dict(branch.named_buffers())[k], v)
    ids = set(map(id, learn.opt.all_params().itemgot(0)))
    assert all(id(p) in ids for p in learn.model.parameters())
    fct.test_eq(learn.opt.hypers[-1]['lr'], 1e-3)
    assert all(d.route is None and d.branch == 'clean' for d in dual_bns(learn.model))

def test_mixbn_keeps_frozen_groups_and_converts_once(dls):
    learn = _learner(dls, cbs=MixBN())
    learn.freeze()
    _fit(learn, 1, 1e-3)
    fct.test_eq(learn.opt.frozen_idx, 1)
    assert not any(p.requires_grad for n, p in learn.model.backbone.named_parameters() if 'conv' in n)
    n = len(dual_bns(learn.model))
    _fit(learn, 1, 1e-3)
    fct.test_eq(len(dual_bns(learn.model)), n)
    assert not any(isinstance(d.clean, DualBatchNorm) for d in dual_bns(learn.model))

def test_adversarial_only_training_leaves_clean_statistics(dls):
    learn = _learner(dls, cbs=[AdversarialTraining(FGSM(), ratio=1.), MixBN()])
    convert_to_mixbn(learn.model)
    stats = [{k: v.clone() for k, v in d.clean.named_buffers()} for d in dual_bns(learn.model)]
    _fit(learn, 1, 1e-3)
    for d, s in zip(dual_bns(learn.model), stats):
        for k, v in d.clean.named_buffers(): fct.test_eq(v, s[k])
        fct.test_eq(d.adv.num_batches_tracked, s['num_batches_tracked'] + 2)

def _routed_loss(learn, x, *ys, adv_rows=None):
    "Training-mode loss of a copy of the model on a routed batch"
    m = copy.deepcopy(learn.model).train()
    mark_adv_rows(m, adv_rows)
    with torch.no_grad(): return float(learn.loss_func(m(x), *ys))

def test_short_fit_with_adversarial_training_and_mixbn_lowers_training_loss(dls):
    learn = _learner(dls, cbs=[AdversarialTraining(FGSM(), concat=True), MixBN()])
    convert_to_mixbn(learn.model)
    set_seed(1); x, *ys = dls.train.one_batch()
    xm, ym, rows = adversarial_batch(FGSM(), learn.model, x, *ys, concat=True)
    before = _routed_loss(learn, xm, *ym, adv_rows=rows)
    _fit(learn, 4, 3e-3)
    after = _routed_loss(learn, xm, *ym, adv_rows=rows)
    assert after < 0.9*before, (before, after)

def test_export_load_round_trip_with_mixbn(dls, cells, tmp_path):
    learn = _learner(dls, cbs=[AdversarialTraining(FGSM(), concat=True), MixBN()])
    _fit(learn, 1, 1e-3)
    for d in dual_bns(learn.model): d.adv.running_mean.add_(1.)  # the clean branch must be the one predicting
    p, _ = learn.get_preds()
    learn.export(tmp_path/'mixbn.pkl')
    learn2 = load_learner(tmp_path/'mixbn.pkl')
    fct.test_eq(len(dual_bns(learn2.model)), len(dual_bns(learn.model)))
    dl = learn2.dls.test_dl(cells[cells.split == 'valid'].reset_index(drop=True), with_labels=True, num_workers=0)
    p2, _ = learn2.get_preds(dl=dl)
    for k in p: fct.test_close(p2[k], p[k], eps=1e-5)
    pred = learn2.predict(cells.image.iloc[-1])
    fct.test_eq(pred['mask'].shape, (48, 48))

# --- the real attacks of mtlrobust.attacks, and the HPAT recipe ---

def test_spatial_attack_moves_each_mask_with_its_image(dls):
    model = _learner(dls).model
    x, lab, msk = dls.train.one_batch()
    spatial = SpatialAttack('label', search='grid', max_angle=90, max_shift=4, budget=9)
    xb, (lb, mb), rows = adversarial_batch(spatial, model, x, lab, msk, ratio=0.5, concat=True)
    a, dx, dy = spatial.last_params.T
    fct.test_eq(xb.shape, (16, 3, 32, 32)); fct.test_eq(rows.tolist(), [False]*8 + [True]*8)
    fct.test_close(xb[8:], spatial_transform(x, a, dx, dy)); fct.test_eq(mb[8:], spatial_transform(msk, a, dx, dy))
    fct.test_eq(lb, torch.cat([lab, lab])); fct.test_eq(xb[:8], x); fct.test_eq(mb[:8], msk)
    assert (a != 0).any()

def test_hybrid_attack_runs_through_the_adversarial_branch(dls):
    "With `attack_bn='adv'` the attack sees the adversarial statistics: shifting them changes the attack's result"
    learn = _learner(dls)
    convert_to_mixbn(learn.model)
    x, lab, msk = dls.train.one_batch()
    atk = lambda: HybridAttack(MultiTaskPGD('label', eps=6/255, alpha=1/255, steps=2, random_start=False),
                               SpatialAttack('label', 'grid', max_angle=90, max_shift=3, budget=5))
    same = [adversarial_batch(atk(), learn.model, x, lab, msk, concat=True, attack_bn=b)[0] for b in ('adv', 'clean')]
    fct.test_close(same[0], same[1])  # identical branches at conversion
    for d in dual_bns(learn.model): d.adv.running_mean.add_(2.)
    xa = adversarial_batch(atk(), learn.model, x, lab, msk, concat=True)[0]
    xc = adversarial_batch(atk(), learn.model, x, lab, msk, concat=True, attack_bn='clean')[0]
    fct.test_close(xc, same[1]); assert (xa - xc).abs().max() > 1e-3
    assert all(d.branch == 'clean' for d in dual_bns(learn.model))

def test_hpat_recipe_trains_on_clean_and_hybrid_rows(dls):
    keep = KeepBatches()
    learn = hpat(_learner(dls), steps=2, max_shift=2, search='grid', budget=5)
    atk = learn.adversarial_training.attack
    assert isinstance(atk, HybridAttack) and learn.adversarial_training.concat and learn.adversarial_training.ratio == 0.5
    fct.test_eq((atk.pixel.eps, atk.pixel.step_size, atk.spatial.max_angle), (6/255, 1/255, 180.))
    _fit(learn, 1, 1e-3, cbs=keep)
    fct.test_eq([b[3].tolist() for b in keep.batches if b[0]], [[False]*8 + [True]*8]*2)
    d = dual_bns(learn.model)[0]
    fct.test_eq((int(d.clean.num_batches_tracked), int(d.adv.num_batches_tracked)), (2, 2))
    assert not any(isinstance(cb, MixBN) for cb in hpat(_learner(dls), mixbn=False).cbs)

def test_hpat_on_real_segmentation_wbc(segwbc):
    "A short HPAT fit on real images and masks of both acquisition domains: runs, routes, keeps clean predictions"
    t = segwbc.groupby('domain').head(12).reset_index(drop=True)
    t['split'] = ['train', 'train', 'valid']*(len(t)//3)
    dls = mtl_dataloaders(t, tasks=['label', 'mask'], size=48, bs=8, num_workers=0, seed=0)
    learn = hpat(_learner(dls), steps=2, max_shift=48*12/300, search='grid', budget=5)
    _fit(learn, 1, 1e-3)
    assert len(dual_bns(learn.model)) > 20 and all(d.route is None for d in dual_bns(learn.model))
    p, _ = learn.get_preds()
    assert p['label'].isfinite().all() and p['mask'].shape[1:] == (3, 48, 48)
