"Tests of the robustness measures: hand-computed ROI and vulnerabilities, the report sweep on a trained model, the CLI"
import warnings
import numpy as np, pandas as pd, pytest, torch
import torch.nn.functional as F
import fastcore.test as fct
from fastai.vision.all import set_seed
from mtlrobust.synth import synth_wbc
from mtlrobust.data import mtl_dataloaders
from mtlrobust.learner import mtl_learner
from mtlrobust.tasks import classification_task, segmentation_task, concept_task
from mtlrobust.attacks import MultiTaskPGD
from mtlrobust.robustness import *
from mtlrobust.cli import mtlrobust_attack

class _FGSM:
    "A protocol attack written here: one signed-gradient step on the summed losses of `tasks`"
    def __init__(self, tasks, eps): self.tasks, self.eps = list(tasks), eps
    def __call__(self, model, x, *y):
        x = x.detach().clone().requires_grad_()
        out = model(x)
        loss = sum(t.loss(out[t.name], yt) for t, yt in zip(model.tasks, y) if t.name in self.tasks)
        g, = torch.autograd.grad(loss, x)
        return (x + self.eps*g.sign()).clamp(0, 1).detach(), y

@pytest.fixture(scope='module')
def learn():
    "A briefly trained model: two classes of synthetic cells at 32 px, class and segmentation"
    cells = synth_wbc(96, size=32, domain='A', seed=0, classes=['neutrophil', 'lymphocyte']).assign(split=['train']*64 + ['valid']*32)
    set_seed(0, reproducible=True)
    dls = mtl_dataloaders(cells, tasks=['label', 'mask'], size=32, bs=16, num_workers=0, seed=0, aug=False)
    learn = mtl_learner(dls, arch='resnet10t', emb_sizes=(32,), decoder_channels=(16, 16, 8, 8))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 1e-2)
    assert learn.evaluate()['label_acc'] > 0.8
    return learn

# ---- hand-computed measures

def test_rate_of_invariance_counts_unchanged_predicted_labels():
    clean = torch.tensor([[3., 1., 0.], [0., 2., 1.], [0., 0., 5.], [1., 4., 0.], [0., 1., 0.]])
    adv = torch.tensor([[2., 1., 0.], [0., 1., 3.], [1., 0., 2.], [3., 2., 0.], [0., 9., 0.]])
    fct.test_eq(rate_of_invariance(clean, adv), 3/5)  # images 1, 3 and 5 keep their class
    fct.test_eq(rate_of_invariance(torch.tensor([0, 1, 2, 1, 1]), torch.tensor([0, 2, 2, 0, 1])), 3/5)

def test_relative_vulnerability_of_errors_skips_unlabelled_and_zero_errors():
    fct.test_close(relative_vulnerability(torch.tensor([.5, 1., float('nan'), 2.]), torch.tensor([1., 1.5, 3., 2.])), (1 + .5 + 0)/3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        fct.test_close(relative_vulnerability(torch.tensor([0., .25]), torch.tensor([1., 1.])), 3.)
    assert any('clean error of 0' in str(x.message) for x in w)

def test_relative_task_vulnerability_by_hand():
    ct, rt, st = classification_task(vocab=['a', 'b']), concept_task('area'), segmentation_task()
    # classification: error 1 - p(true): 0.2 -> 0.6 (+2), 0.5 -> 0.25 (-0.5); the unlabelled third sample is ignored
    pc, pa = torch.tensor([[.8, .2], [.5, .5], [.5, .5]]), torch.tensor([[.4, .6], [.25, .75], [1., 0.]])
    # regression: squared error 1 -> 4 (+3), 4 -> 4 (0)
    rc, ra = torch.tensor([[1.], [2.], [0.]]), torch.tensor([[2.], [-2.], [0.]])
    # segmentation: 1 - foreground IoU 1/2 -> 5/6 (+2/3) on the one image with a mask
    truth = torch.tensor([[[0, 1], [1, 1]], [[255, 255], [255, 255]], [[255, 255], [255, 255]]])
    oh = lambda m: F.one_hot(torch.tensor(m), 3).permute(0, 3, 1, 2).float()
    sc, sa = oh([[[1, 0], [0, 0]]]*3), oh([[[0, 1], [0, 2]]]*3)
    y = (torch.tensor([0, 1, -1]), torch.tensor([[0.], [0.], [float('nan')]]), truth)
    v = relative_task_vulnerability([ct, rt, st], dict(label=pc, concepts=rc, mask=sc), dict(label=pa, concepts=ra, mask=sa), y)
    fct.test_close(v['label'], (2 - .5)/2)
    fct.test_close(v['concepts'], (3 + 0)/2)
    fct.test_close(v['mask'], 2/3)

def test_adversarial_vulnerability_by_hand():
    ct, rt = classification_task(vocab=['a', 'b']), concept_task('area', weight=0.5)
    pc = dict(label=torch.tensor([[.5, .5], [.75, .25], [.9, .1]]).log(), concepts=torch.tensor([[1.], [2.], [0.]]))
    pa = dict(label=torch.tensor([[.25, .75], [.5, .5], [.1, .9]]).log(), concepts=torch.tensor([[2.], [1.], [0.]]))
    y = (torch.tensor([0, 1, -1]), torch.tensor([[0.], [0.], [float('nan')]]))
    # cross-entropy changes by +ln2 and -ln2; squared error by +3 and -3 (weight 1/2)
    fct.test_close(adversarial_vulnerability([ct, rt], pc, pa, y, task_set='label'), np.log(2))
    fct.test_close(adversarial_vulnerability([ct, rt], pc, pa, y, task_set='concepts'), 1.5)
    fct.test_close(adversarial_vulnerability([ct, rt], pc, pa, y), np.log(2) + 1.5)
    fct.test_close(adversarial_vulnerability([ct, rt], pc, pa, y, weights={'concepts': 1.}), np.log(2) + 3)

# ---- on a trained model

def test_report_columns_clean_rows_and_monotone_accuracy(learn):
    eps = (1/255, 2/255, 4/255, 8/255)
    rep = robustness_report(learn, attacks=('pgd',), eps=eps, tasks=(('label',), ('label', 'mask')), steps=3, progress=False)
    fct.test_eq(list(rep.columns), ['attack', 'norm', 'eps', 'attacked', 'task', 'metric', 'value'])
    fct.test_eq(sorted(rep.eps.unique()), [0., *eps])
    fct.test_eq(set(rep.attacked), {'label', 'label,mask'})
    assert {'acc', 'auc', 'dice_nucleus', 'roi', 'vulnerability', 'rel_vulnerability'} <= set(rep.metric)
    # eps = 0 rows are the clean metrics, for every attacked set
    ev = learn.evaluate()
    for attacked, g in rep[rep.eps == 0].groupby('attacked'):
        v = g.set_index(['task', 'metric']).value
        for k, val in ev.items():
            task, metric = k.split('_', 1)
            fct.test_close(v[task, metric], val, eps=1e-6)
        fct.test_eq([v['label', 'roi'], v['label', 'vulnerability'], v['joint', 'vulnerability']], [1., 0., 0.])
    # accuracy does not increase with the budget (one sample of slack)
    for attacked in ('label', 'label,mask'):
        acc = rep[(rep.metric == 'acc') & (rep.task == 'label') & (rep.attacked == attacked)].sort_values('eps').value.to_numpy()
        assert (np.diff(acc) <= 1/32 + 1e-9).all(), (attacked, acc)
        assert acc[-1] < acc[0], (attacked, acc)
        vul = rep[(rep.metric == 'vulnerability') & (rep.task == 'label') & (rep.attacked == attacked)].sort_values('eps').value.to_numpy()
        assert vul[-1] > vul[1] > 0, vul

def test_report_skips_task_sets_the_model_lacks(learn):
    with pytest.warns(UserWarning, match='skipping attacked task sets'):
        rep = robustness_report(learn, attacks=('fgsm',), eps=(4/255,), tasks=(('label',), ('concepts',)), progress=False)
    fct.test_eq(set(rep.attacked), {'label'})
    with pytest.raises(ValueError, match='none of the attacked task sets'):
        robustness_report(learn, tasks=(('concepts',),), progress=False)
    with pytest.raises(ValueError, match='unknown attacks'):
        robustness_report(learn, attacks=('deepfool',), progress=False)

def test_marginal_vulnerability_is_the_difference_of_joint_vulnerabilities(learn):
    atk = lambda ts: MultiTaskPGD(list(ts), eps=4/255, steps=2)
    mv = marginal_vulnerability(learn, learn.dls.valid, ('mask', 'label'), atk, seed=3)
    fct.test_eq(mv.tasks.tolist(), ['mask', 'mask,label'])
    fct.test_eq(mv.models.unique().tolist(), ['one model'])
    fct.test_close(mv.marginal[1], mv.vulnerability[1] - mv.vulnerability[0])
    torch.manual_seed(3)
    res = attacked_predictions(learn, learn.dls.valid, atk(('mask', 'label')))
    fct.test_close(mv.vulnerability[1], adversarial_vulnerability(learn.tasks, *res), eps=1e-5)
    # per-task-set models: a dict keyed by task tuples (in any order), the DataLoader carrying all targets
    mv2 = marginal_vulnerability({('label', 'mask'): learn, ('mask',): learn}, learn.dls.valid, ('mask', 'label'), atk,
                                 dl_tasks=['label', 'mask'], seed=3)
    fct.test_eq(mv2.models.unique().tolist(), ['per task set'])
    fct.test_close(mv2.vulnerability, mv.vulnerability)

def test_report_takes_attack_factories_and_wgd(learn):
    rep = robustness_report(learn, attacks={'fgsm_here': lambda ts, eps, norm, steps: _FGSM(ts, eps)}, eps=(8/255,),
                            tasks=(('label',),), progress=False)
    fct.test_eq(set(rep.attack), {'fgsm_here'})
    acc = rep[(rep.metric == 'acc') & (rep.task == 'label')].set_index('eps').value
    assert acc[8/255] < acc[0.], acc
    rep = robustness_report(learn, attacks=('wgd',), eps=(8/255,), tasks=(('label', 'mask'),), steps=2, progress=False)
    joint = rep[(rep.task == 'joint')].set_index('eps').value
    assert joint[8/255] > joint[0.] == 0., joint

# ---- the command

def test_cli_writes_report_and_refuses_existing_folder(learn, tmp_path):
    learn.export(tmp_path/'model.pkl')
    out = tmp_path/'attack'
    rep = mtlrobust_attack(str(tmp_path/'model.pkl'), 'synthetic', trust_pickle=True, eps='2/255,8/255', tasks='label', steps=2,
                           n_synthetic=16, out=str(out))
    fct.test_eq(sorted(p.name for p in out.iterdir()), ['report.csv', 'report.png'])
    csv = pd.read_csv(out/'report.csv')
    fct.test_eq(list(csv.columns), ['attack', 'norm', 'eps', 'attacked', 'task', 'metric', 'value'])
    fct.test_eq(len(csv), len(rep))
    fct.test_close(sorted(csv.eps.unique()), [0., 2/255, 8/255])
    before = (out/'report.csv').read_bytes()
    with pytest.raises(FileExistsError, match='already holds files'):
        mtlrobust_attack(str(tmp_path/'model.pkl'), 'synthetic', trust_pickle=True, n_synthetic=16, out=str(out))
    fct.test_eq((out/'report.csv').read_bytes(), before)

def test_cli_attacks_a_mixbn_model_through_the_chosen_branch(learn, tmp_path):
    "--bn clean evaluates a MixBN model as it is deployed (the clean statistics); --bn adv through its adversarial ones"
    from fastai.learner import load_learner
    from mtlrobust.callback.adversarial import convert_to_mixbn, dual_bns
    learn.export(tmp_path/'plain.pkl')
    mixed = load_learner(tmp_path/'plain.pkl')
    convert_to_mixbn(mixed.model)
    for d in dual_bns(mixed.model): d.adv.running_mean.add_(3.)  # adversarial statistics far from the clean ones
    mixed.export(tmp_path/'mixbn.pkl')
    def clean_rows(model, bn):
        r = mtlrobust_attack(str(tmp_path/model), 'synthetic', trust_pickle=True, attack='fgsm', eps='2/255', tasks='label', n_synthetic=16, out=str(tmp_path/f'{model}-{bn}'), bn=bn)
        return r[r.eps == 0].value.to_numpy()
    plain = clean_rows('plain.pkl', 'clean')
    fct.test_close(clean_rows('mixbn.pkl', 'clean'), plain)
    assert not np.allclose(clean_rows('mixbn.pkl', 'adv'), plain)
    with pytest.raises(ValueError, match="--bn 'robust'"):
        mtlrobust_attack(str(tmp_path/'mixbn.pkl'), 'synthetic', n_synthetic=16, out=str(tmp_path/'bad'), bn='robust')
    assert not (tmp_path/'bad').exists()

def test_cli_arguments_through_the_parser():
    from fastcore.script import anno_parser
    args = anno_parser(mtlrobust_attack).parse_args(['m.pkl', 'synthetic', '--eps', '1/255', '--tasks', 'label;label,mask', '--steps', '3'])
    fct.test_eq((args.eps, args.tasks, args.steps, args.norm, args.attack), ('1/255', 'label;label,mask', 3, 'Linf', 'pgd'))

# ---- real data

def test_pgd_report_on_real_segmentation_wbc(segwbc):
    "On real Dataset 1 cells, a briefly trained model's accuracy and Dice fall as the PGD budget grows"
    from mtlrobust.cli import train_model
    from mtlrobust.data import split_stratified
    t = segwbc[segwbc.domain.str.endswith('Dataset 1')].reset_index(drop=True)
    t['split'] = split_stratified(t, valid_pct=0., test_pct=0.2, seed=0)
    learn = train_model(t, [classification_task(), segmentation_task()], arch='resnet10t', size=64, epochs=4, lr=5e-3, progress=False)
    rep = robustness_report(learn, learn.labelled_dl(t[t.split == 'test']), eps=(2/255, 16/255), steps=3, progress=False)
    def curve(attacked, task, metric): return rep.query("attacked == @attacked and task == @task and metric == @metric").sort_values('eps').value.to_numpy()
    acc, dice = curve('label', 'label', 'acc'), curve('mask', 'mask', 'dice_nucleus')
    assert acc[0] > 0.5 and acc[2] < acc[0] - 0.3, acc
    assert dice[0] > 0.5 and (np.diff(dice) < 0).all(), dice
    fct.test_eq(curve('label', 'label', 'roi')[0], 1.)
