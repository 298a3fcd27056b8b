"Property tests of the multi-task losses: indicator masking, all-missing batches, task weightings, GradNorm"
import math, pytest, torch
import torch.nn as nn, torch.nn.functional as F
import fastcore.test as fct
from fastai.basics import DataLoader, DataLoaders, Learner
from mtlrobust.core import MASK_IGNORE, WBC_CLASSES
from mtlrobust.tasks import RegressionTask, classification_task, segmentation_task, concept_task
from mtlrobust.losses import masked_mean, classification_loss, segmentation_loss, regression_loss
from mtlrobust.weighting import MultiTaskLoss, UncertaintyWeighting, GradNormWeighting
from mtlrobust.callback.training import GradNorm, last_shared_param

NAN = float('nan')
TASKS = [classification_task(vocab=WBC_CLASSES), segmentation_task(), concept_task(['area', 'lobes'])]


def _batch(n=6, size=8, seed=0):
    "Predictions (with grad) and targets of a batch where each task is labelled on a different subset"
    g = torch.Generator().manual_seed(seed)
    preds = dict(label=torch.randn(n, 5, generator=g), mask=torch.randn(n, 3, size, size, generator=g),
                 concepts=torch.randn(n, 2, generator=g))
    preds = {k: v.requires_grad_() for k, v in preds.items()}
    lab = torch.randint(0, 5, (n,), generator=g); lab[[1, 4]] = -1
    msk = torch.randint(0, 3, (n, size, size), generator=g); msk[[0, 3, 5]] = MASK_IGNORE
    msk[1, :2] = MASK_IGNORE  # a partly labelled mask
    con = torch.randn(n, 2, generator=g); con[2] = NAN; con[4, 1] = NAN
    return preds, (lab, msk, con)


def _missing(targets):
    "The same targets with every label missing"
    lab, msk, con = targets
    return torch.full_like(lab, -1), torch.full_like(msk, MASK_IGNORE), torch.full_like(con, NAN)


# --- indicator masking equals the loss on the labelled subset

@pytest.mark.parametrize('class_weights', [None, [1., 2., .5, 3., 0.]])
def test_classification_masking_equals_labelled_subset(class_weights):
    preds, (lab, _, _) = _batch()
    keep = lab >= 0
    fct.test_close(classification_loss(preds['label'], lab, class_weights),
                   classification_loss(preds['label'][keep], lab[keep], class_weights))
    w = None if class_weights is None else torch.tensor(class_weights)
    fct.test_close(classification_loss(preds['label'], lab, class_weights), F.cross_entropy(preds['label'][keep], lab[keep], weight=w))


@pytest.mark.parametrize('dice_weight', [0., 1., 2.5])
def test_segmentation_masking_equals_labelled_subset(dice_weight):
    preds, (_, msk, _) = _batch()
    keep = TASKS[1].has_label(msk)
    fct.test_eq(keep.tolist(), [False, True, True, False, True, False])
    fct.test_close(segmentation_loss(preds['mask'], msk, dice_weight), segmentation_loss(preds['mask'][keep], msk[keep], dice_weight))


def test_segmentation_cross_entropy_part_is_torch_ignore_index():
    preds, (_, msk, _) = _batch()
    fct.test_close(segmentation_loss(preds['mask'], msk, dice_weight=0.), F.cross_entropy(preds['mask'], msk, ignore_index=MASK_IGNORE))


def test_segmentation_dice_of_perfect_prediction_is_one():
    _, (_, msk, _) = _batch()
    keep = TASKS[1].has_label(msk)
    perfect = F.one_hot(msk[keep].clamp(max=2), 3).movedim(-1, 1).float() * 100
    fct.test_close(segmentation_loss(perfect, msk[keep], dice_weight=1.), 0., eps=1e-3)


def test_regression_masking_equals_measured_entries():
    preds, (_, _, con) = _batch()
    ok = ~con.isnan()
    fct.test_close(regression_loss(preds['concepts'], con), F.mse_loss(preds['concepts'][ok], con[ok]))
    rows = TASKS[2].has_label(con)
    fct.test_close(regression_loss(preds['concepts'], con), regression_loss(preds['concepts'][rows], con[rows]))


def test_multitask_loss_equals_sum_of_subset_losses():
    preds, (lab, msk, con) = _batch()
    ok_l, ok_m, ok_c = lab >= 0, TASKS[1].has_label(msk), TASKS[2].has_label(con)
    expected = (F.cross_entropy(preds['label'][ok_l], lab[ok_l]) + segmentation_loss(preds['mask'][ok_m], msk[ok_m])
                + regression_loss(preds['concepts'][ok_c], con[ok_c]))
    fct.test_close(MultiTaskLoss(TASKS)(preds, lab, msk, con), expected)


# --- all-missing batches: exactly 0, zero and finite gradients

@pytest.mark.parametrize('i', [0, 1, 2])
def test_all_missing_task_loss_is_exactly_zero_with_zero_gradient(i):
    preds, targets = _batch()
    t, p = TASKS[i], preds[TASKS[i].name]
    loss = t.loss(p, _missing(targets)[i])
    assert loss.item() == 0. and loss.requires_grad
    loss.backward()
    assert torch.isfinite(p.grad).all() and (p.grad == 0).all()


def test_all_missing_classification_with_class_weights_is_zero_not_nan():
    preds, (lab, _, _) = _batch()
    loss = classification_loss(preds['label'], torch.full_like(lab, -1), [1., 2., 3., 4., 5.])
    assert loss.item() == 0.
    # labels present only for classes of weight 0: torch gives NaN, the masked loss 0
    assert classification_loss(preds['label'], torch.zeros_like(lab), [0., 1., 1., 1., 1.]).item() == 0.


@pytest.mark.parametrize('weighting', ['vanilla', 'uncertainty', 'gradnorm'])
def test_all_missing_batch_gives_zero_loss_and_zero_gradients(weighting):
    preds, targets = _batch()
    mtl = MultiTaskLoss(TASKS, weighting)
    loss = mtl(preds, *_missing(targets))
    assert loss.item() == 0.
    loss.backward()
    for p in list(preds.values()) + list(mtl.parameters()):
        assert p.grad is None or (torch.isfinite(p.grad).all() and (p.grad == 0).all())
    fct.test_eq({k: v.item() for k, v in mtl.last_counts.items()}, dict(label=0, mask=0, concepts=0))


@pytest.mark.parametrize('weighting', ['vanilla', 'uncertainty', 'gradnorm'])
@pytest.mark.parametrize('absent', [0, 1, 2])
def test_one_task_without_labels_gives_no_nan(weighting, absent):
    preds, targets = _batch()
    targets = tuple(m if i == absent else t for i, (t, m) in enumerate(zip(targets, _missing(targets))))
    mtl = MultiTaskLoss(TASKS, weighting)
    loss = mtl(preds, *targets)
    assert torch.isfinite(loss)
    loss.backward()
    for p in preds.values(): assert torch.isfinite(p.grad).all()
    assert (preds[TASKS[absent].name].grad == 0).all()
    assert mtl.last_losses[TASKS[absent].name].item() == 0.
    assert torch.isfinite(mtl(preds, *targets, reduction='none')).all()


# --- weightings

def test_vanilla_weights_2_1_give_2L1_plus_L2():
    preds, (lab, _, con) = _batch()
    tasks = [classification_task(vocab=WBC_CLASSES, weight=2.), concept_task(['area', 'lobes'], weight=1.)]
    mtl = MultiTaskLoss(tasks)
    fct.test_close(mtl(preds, lab, con), 2*classification_loss(preds['label'], lab) + regression_loss(preds['concepts'], con))
    fct.test_eq(mtl.task_weights(), dict(label=2., concepts=1.))


def test_uncertainty_gradient_wrt_log_variance_is_analytic():
    preds, targets = _batch()
    mtl = MultiTaskLoss(TASKS, 'uncertainty')
    s = torch.tensor([.3, -.7, 1.2])
    with torch.no_grad(): mtl.weighting.log_vars.copy_(s)
    loss = mtl(preds, *targets)
    L = torch.stack([mtl.last_losses[n] for n in mtl.names])
    c = torch.tensor([1., 1., .5])  # softmax likelihood for classification and segmentation, Gaussian (1/2) for regression
    fct.test_close(loss, (c * torch.exp(-s) * L + s/2).sum())
    loss.backward()
    fct.test_close(mtl.weighting.log_vars.grad, -c * torch.exp(-s) * L + .5)
    fct.test_close(torch.tensor(list(mtl.task_weights().values())), c * torch.exp(-s))
    fct.test_eq(len(mtl.optim_params()), 1)


def test_uncertainty_absent_task_leaves_its_log_variance_alone():
    w = UncertaintyWeighting(TASKS)
    w(torch.tensor([1., 2., 3.]), torch.tensor([1., 0., 1.])).backward()
    assert w.log_vars.grad[1] == 0 and w.log_vars.grad[0] != 0


def test_gradnorm_weights_get_no_gradient_from_main_loss():
    preds, targets = _batch()
    mtl = MultiTaskLoss(TASKS, 'gradnorm')
    mtl(preds, *targets).backward()
    assert mtl.weighting.w.grad is None
    fct.test_eq(len(mtl.optim_params()), 0)


def test_weighting_accepted_as_object_or_callable_and_unknown_name_rejected():
    w = UncertaintyWeighting(TASKS)
    assert MultiTaskLoss(TASKS, w).weighting is w
    assert isinstance(MultiTaskLoss(TASKS, GradNormWeighting).weighting, GradNormWeighting)
    fct.test_fail(lambda: MultiTaskLoss(TASKS, 'dwa'), contains="'dwa'")


# --- activation and decodes

def test_activation_and_decodes_shapes_and_values():
    preds, targets = _batch()
    mtl = MultiTaskLoss(TASKS)
    act = mtl.activation(preds)
    fct.test_eq({k: v.shape for k, v in act.items()}, {k: v.shape for k, v in preds.items()})
    fct.test_close(act['label'].sum(1), torch.ones(6))
    fct.test_close(act['mask'].sum(1), torch.ones(6, 8, 8))
    dec = mtl.decodes(act)
    assert isinstance(dec, tuple)
    fct.test_eq([d.shape for d in dec], [t.shape for t in targets])
    fct.test_eq(dec[0], preds['label'].argmax(1))
    fct.test_eq(dec[1], preds['mask'].argmax(1))
    fct.test_eq(mtl.decodes(tuple(preds[n] for n in mtl.names))[1], dec[1])


def test_per_sample_losses_average_to_the_batch_loss_when_all_labelled():
    preds, (lab, _, _) = _batch()
    lab = lab.clamp_min(0)
    mtl = MultiTaskLoss(TASKS[:1])
    fct.test_close(mtl(preds, lab, reduction='none').mean(), mtl(preds, lab))


# --- GradNorm

class TwoHeads(nn.Module):
    def __init__(self): super().__init__(); self.backbone, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 1)
    def forward(self, x): h = F.relu(self.backbone(x)); return dict(a=self.a(h), b=self.b(h))


def _toy_learner(yb_fn, shared=None, n=512, bs=32, shuffle=True):
    torch.manual_seed(0)
    x = torch.randn(n, 4); y = x.sum(1, keepdim=True)
    ds = list(zip(x, y, yb_fn(y)))
    dls = DataLoaders(DataLoader(ds, bs=bs, shuffle=shuffle), DataLoader(ds[:64], bs=bs))
    dls.train.n_inp = dls.valid.n_inp = 1
    tasks = [RegressionTask('a', ['a']), RegressionTask('b', ['b'])]
    return Learner(dls, TwoHeads(), loss_func=MultiTaskLoss(tasks, 'gradnorm'), cbs=GradNorm(shared=shared), lr=1e-2)


def test_gradnorm_lowers_the_weight_of_a_task_with_10x_loss_and_keeps_sum():
    learn = _toy_learner(lambda y: y * math.sqrt(10))
    with learn.no_bar(), learn.no_logging(): learn.fit(2)
    w = learn.loss_func.task_weights()
    assert w['b'] < 0.8 and w['a'] > 1.2, w
    fct.test_close(sum(w.values()), 2.)
    init = learn.loss_func.weighting.initial_losses
    assert 5 < (init[1] / init[0]).item() < 20  # L_b(0) is about 10 L_a(0)


def test_gradnorm_with_explicit_shared_layer_and_batches_missing_a_task():
    def yb(y):  # task b unlabelled on the first half: whole batches without it (no shuffling)
        y = y.clone(); y[:256] = NAN; return y
    learn = _toy_learner(lambda y: yb(y * math.sqrt(10)), shared=lambda m: [m.backbone.weight, m.backbone.bias], shuffle=False)
    with learn.no_bar(), learn.no_logging(): learn.fit(1)
    w = learn.loss_func.weighting.w
    assert torch.isfinite(w).all() and all(torch.isfinite(p).all() for p in learn.model.parameters())
    fct.test_close(w.sum(), 2.)
    assert w[1] < 1


def test_gradnorm_rejects_other_weightings_and_models_without_backbone():
    learn = _toy_learner(lambda y: y)
    learn.loss_func = MultiTaskLoss(learn.loss_func.tasks, 'vanilla')
    with learn.no_bar(), learn.no_logging(): fct.test_fail(lambda: learn.fit(1), contains="weighting='gradnorm'")
    fct.test_fail(lambda: last_shared_param(nn.Linear(2, 2)), contains='shared=')
    fct.test_eq(last_shared_param(TwoHeads())[0].shape, (8, 4))
