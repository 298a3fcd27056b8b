"Property and integration tests of mtlrobust.metrics: hand-computed scores, missing labels, batch accumulation, a real fastai Learner"
import warnings
from types import SimpleNamespace
import numpy as np, pytest, torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, r2_score, balanced_accuracy_score
import fastcore.test as fct
from mtlrobust.core import MASK_IGNORE
from mtlrobust.tasks import classification_task, segmentation_task, concept_task, adversarial_task
from mtlrobust.metrics import *
from mtlrobust.tasks import task_metrics, compute_task_metrics

nan = float('nan')

# 3-class example: y_pred's per-class recalls 3/4, 1/2, 1/2; precisions 1, 1/3, 1/2; two unlabelled samples
Y_TRUE = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, -1, -1])
Y_PRED = torch.tensor([0, 0, 0, 1, 1, 2, 2, 1, 0, 0])

def _logits(y_pred, seed=0):
    "Logits whose argmax is `y_pred`, with random margins so AUC is not trivial"
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(y_pred, 3).float() * 3 + torch.rand(len(y_pred), 3, generator=g)

def test_classification_scores_by_hand():
    s = classification_scores(_logits(Y_PRED), Y_TRUE)
    fct.test_close(s['acc'], 5/8)
    fct.test_close(s['bacc'], (3/4 + 1/2 + 1/2) / 3)
    fct.test_close(s['f1'], (2*1*3/4/(1+3/4) + 2*(1/3)*(1/2)/(1/3+1/2) + 1/2) / 3)
    fct.test_close(s['gmean'], (3/4 * 1/2 * 1/2) ** (1/3))

def test_unlabelled_samples_are_skipped():
    "Changing the predictions of -1 samples changes nothing; the -1 rows never reach sklearn"
    a = classification_scores(_logits(Y_PRED), Y_TRUE)
    b = classification_scores(_logits(torch.cat([Y_PRED[:8], torch.tensor([2, 1])]), seed=0), Y_TRUE)
    c = classification_scores(_logits(Y_PRED)[:8], Y_TRUE[:8])
    fct.test_close(list(a.values()), list(b.values())); fct.test_close(list(a.values()), list(c.values()))
    assert all(np.isnan(v) for v in classification_scores(_logits(Y_PRED), torch.full((10,), -1)).values())

def test_auc_equals_sklearn_ovr_and_accepts_probabilities():
    logits = _logits(Y_PRED)
    expected = roc_auc_score(Y_TRUE[:8], logits[:8].softmax(1), multi_class='ovr')
    fct.test_close(classification_scores(logits, Y_TRUE, ['auc'])['auc'], expected)
    fct.test_close(classification_scores(logits.softmax(1), Y_TRUE, ['auc'])['auc'], expected)

def test_auc_over_present_classes_only():
    "Class 2 absent: macro mean of the one-vs-rest AUCs of classes 0 and 1 on the raw probabilities"
    y, logits = Y_TRUE[:6], _logits(Y_PRED)[:6]
    probs = logits.softmax(1).numpy()
    expected = (roc_auc_score(y == 0, probs[:, 0]) + roc_auc_score(y == 1, probs[:, 1])) / 2
    fct.test_close(ovr_auc_score(y.numpy(), probs), expected)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        assert np.isnan(ovr_auc_score(np.array([1, 1]), probs[:2]))
    assert 'only class [1]' in str(w[0].message)

def test_gmean_collapses_when_a_class_is_missed():
    y, p = np.array([0, 0, 1, 2]), np.array([0, 0, 0, 2])
    fct.test_eq(gmean_score(y, p), 0.)
    fct.test_close(balanced_accuracy_score(y, p), 2/3)

def test_chance_is_majority_rate():
    fct.test_eq(chance_accuracy(np.array([1, 1, 1, 0])), 3/4)
    assert np.isnan(chance_accuracy(np.array([], dtype=int)))

# Hand-drawn 4x4 masks; image 2 has no nucleus and is predicted exactly; image 3 has no mask
TRUTH = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1], [0, 2, 2, 1], [0, 0, 1, MASK_IGNORE]],
                      [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
                      [[MASK_IGNORE] * 4] * 4])
PRED = torch.tensor([[[0, 1, 1, 1], [0, 2, 2, 2], [0, 2, 1, 1], [0, 0, 0, 2]],
                     [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
                     [[2] * 4] * 4])

def test_dice_iou_by_hand():
    # image 1, 15 labelled pixels: nucleus |T|=4 |P|=4 (the ignored pixel predicted 2 not counted), overlap 3;
    # cytoplasm |T|=5 |P|=5 overlap 3; background |T|=6 |P|=6 overlap 5
    dice, iou = segmentation_overlaps(F.one_hot(PRED, 3).permute(0, 3, 1, 2).float(), TRUTH, [0, 1, 2])
    fct.test_eq(dice.shape, (2, 3))  # the unmasked image is skipped
    fct.test_close(dice[0], torch.tensor([2*5/12, 2*3/10, 2*3/8]))
    fct.test_close(iou[0], torch.tensor([5/7, 3/7, 3/5]))
    fct.test_close(dice[1], torch.ones(3))  # nucleus absent in both: Dice 1 by convention
    s = segmentation_scores(PRED, TRUTH, classes=['background', 'cytoplasm', 'nucleus'])
    fct.test_close(s['dice_nucleus'], (3/4 + 1) / 2)
    fct.test_close(s['iou_cytoplasm'], (3/7 + 1) / 2)
    fct.test_close(s['iou_background'], (5/7 + 1) / 2)

def test_ignored_pixels_do_not_count():
    "Whatever is predicted where the truth is MASK_IGNORE, the scores are the same"
    other = PRED.clone(); other[0, 3, 3] = 1; other[2] = 0
    fct.test_eq(segmentation_scores(PRED, TRUTH), segmentation_scores(other, TRUTH))

def test_class_present_in_one_only_scores_zero():
    truth, pred = torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)
    pred[0, 0, 0] = 2
    s = segmentation_scores(pred, truth)
    fct.test_eq(s['dice_nucleus'], 0.); fct.test_eq(s['dice_cytoplasm'], 1.)
    assert all(np.isnan(v) for v in segmentation_scores(pred, torch.full_like(truth, MASK_IGNORE)).values())

def test_r2_with_nan_targets():
    y = torch.tensor([[1., nan], [2., 1.], [3., 2.], [nan, 3.]])
    p = torch.tensor([[1.5, 100.], [2., 1.], [2.5, 2.], [-100., 4.]])
    s = regression_scores(p, y, ['nucleus_area', 'nucleus_lobes'])
    fct.test_close(s['r2_nucleus_area'], 1 - 0.5/2)
    fct.test_close(s['r2_nucleus_lobes'], 1 - 1/2)
    fct.test_close(s['r2_nucleus_area'], r2_score([1, 2, 3], [1.5, 2, 2.5]))

TASKS = [classification_task(vocab=['a', 'b', 'c']), segmentation_task(),
         concept_task(['nucleus_area', 'nucleus_lobes']), adversarial_task('domain')]

def _dataset(n=12, seed=0):
    "Whole-dataset predictions and targets of TASKS, with missing labels of every kind"
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, 3, (n,), generator=g); lab[::5] = -1
    mask = torch.randint(0, 3, (n, 6, 6), generator=g); mask[3] = MASK_IGNORE; mask[:, 0, :2] = MASK_IGNORE
    conc = torch.randn(n, 2, generator=g); conc[::4, 0] = nan; conc[1::3, 1] = nan
    dom = torch.randint(0, 2, (n,), generator=g); dom[2] = -1
    preds = dict(label=torch.randn(n, 3, generator=g), mask=torch.randn(n, 3, 6, 6, generator=g) + F.one_hot(mask.clamp(0, 2), 3).permute(0, 3, 1, 2),
                 concepts=conc.nan_to_num(0.) + torch.randn(n, 2, generator=g) * .5, domain=torch.randn(n, 2, generator=g))
    return preds, (lab, mask, conc, dom)

def test_metric_names():
    fct.test_eq(task_metrics(TASKS).attrgot('name'),
                ['label_acc', 'label_bacc', 'label_f1', 'label_auc', 'label_gmean',
                 'mask_dice_cytoplasm', 'mask_dice_nucleus', 'mask_iou_cytoplasm', 'mask_iou_nucleus',
                 'concepts_r2_nucleus_area', 'concepts_r2_nucleus_lobes', 'domain_acc', 'domain_chance'])
    fct.test_eq(task_metrics(TASKS[1:2], segmentation=['dice'], seg_classes=['nucleus']).attrgot('name'), ['mask_dice_nucleus'])

def test_fastai_accumulation_over_two_batches_equals_whole_dataset():
    preds, targs = _dataset()
    metrics = task_metrics(TASKS)
    for m in metrics: m.reset()
    for sl in (slice(0, 5), slice(5, 12)):
        learn = SimpleNamespace(pred={k: v[sl] for k, v in preds.items()}, yb=tuple(t[sl] for t in targs))
        for m in metrics: m.accumulate(learn)
    whole = compute_task_metrics(TASKS, preds, targs)
    fct.test_eq([m.name for m in metrics], list(whole))
    fct.test_close([m.value for m in metrics], list(whole.values()))
    # and the per-kind functions on the concatenation agree
    fct.test_close(whole['label_bacc'], classification_scores(preds['label'], targs[0])['bacc'])
    fct.test_close(whole['mask_iou_nucleus'], segmentation_scores(preds['mask'], targs[1])['iou_nucleus'])
    fct.test_close(whole['concepts_r2_nucleus_lobes'], regression_scores(preds['concepts'], targs[2], TASKS[2].cols)['r2_nucleus_lobes'])
    fct.test_close(compute_task_metrics(TASKS, preds, targs, bs=1)['mask_dice_cytoplasm'], whole['mask_dice_cytoplasm'])

def test_compute_task_metrics_input_errors():
    preds, targs = _dataset()
    with pytest.raises(ValueError, match="no prediction for task 'label'"): compute_task_metrics(TASKS, {}, targs)
    with pytest.raises(ValueError, match='3 targets for 4 tasks'): compute_task_metrics(TASKS, preds, targs[:3])
    one = compute_task_metrics(TASKS[:1], preds, targs[0])  # get_preds gives a bare tensor for a single task
    fct.test_eq(list(one), ['label_acc', 'label_bacc', 'label_f1', 'label_auc', 'label_gmean'])

class _TinyMTL(torch.nn.Module):
    "A dict-output model: one linear map per head from the mean colour"
    def __init__(self):
        super().__init__()
        self.label, self.domain, self.concepts, self.mask = torch.nn.Linear(3, 3), torch.nn.Linear(3, 2), torch.nn.Linear(3, 2), torch.nn.Conv2d(3, 3, 1)
    def forward(self, x):
        f = x.mean((2, 3))
        return dict(label=self.label(f), mask=self.mask(x), concepts=self.concepts(f), domain=self.domain(f))

def _tiny_loss(pred, lab, mask, conc, dom):
    return (F.cross_entropy(pred['label'], lab, ignore_index=-1) + F.cross_entropy(pred['mask'], mask, ignore_index=MASK_IGNORE)
            + F.cross_entropy(pred['domain'], dom, ignore_index=-1)
            + F.mse_loss(pred['concepts'][~conc.isnan()], conc[~conc.isnan()]))

def test_metrics_inside_a_fastai_learner():
    "Learner.validate reports, by name, the same numbers as compute_task_metrics on get_preds"
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    preds, targs = _dataset(n=20)
    x = torch.rand(20, 3, 6, 6)
    ds = [(x[i], *(t[i] for t in targs)) for i in range(20)]
    dls = DataLoaders(DataLoader(ds, bs=7), DataLoader(ds, bs=7))
    dls.n_inp = 1
    learn = Learner(dls, _TinyMTL(), loss_func=_tiny_loss, metrics=task_metrics(TASKS))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        vals = learn.validate()
        p, t = learn.get_preds(reorder=False)  # fastai 2.8 nested_reorder cannot reorder dict predictions
    fct.test_eq(learn.recorder.metric_names[-len(learn.metrics)-1:-1], task_metrics(TASKS).attrgot('name'))
    fct.test_close(list(vals[1:]), list(compute_task_metrics(TASKS, p, t).values()))
