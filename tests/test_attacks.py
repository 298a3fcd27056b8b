"Property tests of the attacks: budgets, restored model state, torchattacks equivalence, spatial alignment, Bayesian optimisation"
import numpy as np, pandas as pd, pytest, torch
import torch.nn as nn, torch.nn.functional as F
import torchattacks
import fastcore.test as fct
from mtlrobust.core import MASK_IGNORE, WBC_CLASSES
from mtlrobust.tasks import classification_task, segmentation_task, concept_task, adversarial_task
from mtlrobust.models import MultiTaskModel
from mtlrobust.data import dominant_channel_agreement
from mtlrobust.attacks import (attack_mode, task_outputs, TaskView, attacked_tasks, torchattack, random_init, ascent_step,
                               perturbation_norm, MultiTaskPGD, WGD, spatial_transform, expected_improvement,
                               bayes_opt_maximise, grid_points, SpatialAttack, HybridAttack, move_targets)

NAN = float('nan')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    "Tiny tensors: one intra-op thread is faster, and immune to OpenMP spin contention on a shared 2-core machine"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tasks():
    dom = adversarial_task('domain', lambda_=0.5); dom.vocab = ['A', 'B']
    return [classification_task(vocab=WBC_CLASSES), segmentation_task(), concept_task(['area', 'lobes']), dom]


def _batch(n=6, size=32, seed=0):
    "Images in [0, 1] and targets (class, mask, concepts, domain), each task missing on some samples"
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    lab = torch.randint(0, 5, (n,), generator=g); lab[1] = -1
    msk = torch.randint(0, 3, (n, size, size), generator=g); msk[2] = MASK_IGNORE
    con = torch.randn(n, 2, generator=g); con[3] = NAN
    dom = torch.randint(0, 2, (n,), generator=g)
    return x, (lab, msk, con, dom)


@pytest.fixture(scope='module')
def trained():
    "A multi-task model briefly trained on its own random batches (so that gradients are informative), in eval mode"
    torch.manual_seed(0)
    model = MultiTaskModel('resnet18', _tasks(), emb_sizes=(32,), decoder_channels=(16, 16, 8, 8))
    from mtlrobust.weighting import MultiTaskLoss
    loss_func, opt = MultiTaskLoss(model.tasks), torch.optim.Adam(model.parameters(), 3e-3)
    batches = [_batch(16, seed=s) for s in range(3)]
    model.train()
    for _ in range(3):
        for x, y in batches:
            loss_func(model(x), *y).backward(); opt.step(); opt.zero_grad()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():  # settle the BatchNorm statistics, which a few steps leave far from the data's
        for m in bns: m.reset_running_stats(); m.momentum = None
        for x, _ in batches: model(x)
        for m in bns: m.momentum = 0.1
    return model.eval()


def _losses(model, x, y):
    "Task name -> indicator-masked loss of the model on (x, y)"
    with torch.no_grad(): out = model(x)
    return {t.name: t.loss(out[t.name], yt).item() for t, yt in zip(model.tasks, y)}


PIXEL_ATTACKS = [
    ('pgd-linf', lambda: MultiTaskPGD(eps=8/255, steps=3, seed=0), 'Linf', 8/255),
    ('pgd-l2', lambda: MultiTaskPGD(eps=0.5, steps=3, norm='L2', seed=0), 'L2', 0.5),
    ('wgd-linf', lambda: WGD(eps=8/255, steps=3, seed=0), 'Linf', 8/255),
    ('wgd-l2', lambda: WGD(eps=0.5, steps=3, norm='L2', seed=0), 'L2', 0.5),
    ('ta-pgd', lambda: torchattack(torchattacks.PGD, 'label', eps=8/255, alpha=2/255, steps=3), 'Linf', 8/255),
    ('ta-pgdl2', lambda: torchattack(torchattacks.PGDL2, 'label', eps=0.5, alpha=0.2, steps=3), 'L2', 0.5),
    ('ta-apgd', lambda: torchattack(torchattacks.APGD, 'label', eps=8/255, steps=3), 'Linf', 8/255),
    ('ta-fgsm', lambda: torchattack(torchattacks.FGSM, 'label', eps=8/255), 'Linf', 8/255),
]


# --- budgets

@pytest.mark.parametrize('name,make,norm,eps', PIXEL_ATTACKS, ids=[a[0] for a in PIXEL_ATTACKS])
def test_pixel_attacks_stay_in_ball_and_box(trained, name, make, norm, eps):
    x, y = _batch()
    x[0, :, :4] = 0.; x[0, :, 4:8] = 1.  # saturated pixels: the [0, 1] clip must hold there too
    x_adv, y_adv = make()(trained, x, *y)
    assert (perturbation_norm(x_adv, x, norm) <= eps*(1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(a is b for a, b in zip(y_adv, y)), "pixel attacks return the targets unchanged"


def test_spatial_and_hybrid_budgets(trained):
    x, y = _batch()
    xs, _ = SpatialAttack(search='grid', budget=10, max_shift=4)(trained, x, *y)
    assert xs.min() >= 0 and xs.max() <= 1
    hyb = HybridAttack(MultiTaskPGD('label', eps=6/255, steps=2, seed=0), SpatialAttack(budget=6, n_init=3, max_shift=4, seed=0))
    xh, _ = hyb(trained, x, *y)
    a, dx, dy = hyb.spatial.last_params.T
    assert (perturbation_norm(xh, spatial_transform(x, a, dx, dy)) <= 6/255 + 1e-5).all()
    assert xh.min() >= 0 and xh.max() <= 1


def test_ascent_step_projects_on_the_sphere():
    x = torch.full((3, 3, 8, 8), 0.5)
    for norm, eps in [('Linf', 8/255), ('L2', 0.3)]:
        x1 = ascent_step(x, random_init(x, eps, norm), torch.randn_like(x), 5., eps, norm)
        fct.test_close(perturbation_norm(x1, x, norm), torch.full((3,), eps), eps=1e-5)


# --- the attacked loss goes up

@pytest.mark.parametrize('tasks', [['label'], ['mask'], ['concepts'], ['domain'], ['label', 'mask', 'concepts']])
@pytest.mark.parametrize('cls', [MultiTaskPGD, WGD])
def test_attack_raises_each_attacked_loss(trained, cls, tasks):
    x, y = _batch()
    clean = _losses(trained, x, y)
    x_adv, _ = cls(tasks, steps=5, seed=0)(trained, x, *y)
    adv = _losses(trained, x_adv, y)
    for t in tasks: assert adv[t] > clean[t], (t, clean[t], adv[t])


def test_adversarial_head_is_climbed_not_reversed(trained):
    "The domain head sits behind a gradient reversal; the attack must still raise its loss"
    x, y = _batch()
    x_adv, _ = MultiTaskPGD('domain', steps=5, random_start=False)(trained, x, *y)
    assert _losses(trained, x_adv, y)['domain'] > _losses(trained, x, y)['domain']


@pytest.mark.parametrize('search', ['grid', 'bo'])
def test_spatial_attack_never_lowers_the_loss(trained, search):
    x, y = _batch()
    atk = SpatialAttack('label', search, budget=12, n_init=4, max_shift=6, seed=0)
    xs, ys = atk(trained, x, *y)
    lab = y[0] >= 0
    with torch.no_grad():
        clean = trained.tasks[0].loss(trained(x)['label'], y[0], reduction='none')
        adv = trained.tasks[0].loss(trained(xs)['label'], ys[0], reduction='none')
    assert (adv[lab] >= clean[lab] - 1e-5).all() and adv[lab].mean() > clean[lab].mean()
    fct.test_close(adv[lab], torch.from_numpy(atk.last_values.max(1)).float(), eps=1e-4)


def test_default_attack_skips_adversarial_tasks(trained):
    fct.test_eq([t.name for _, t in attacked_tasks(trained)], ['label', 'mask', 'concepts'])
    atk = MultiTaskPGD(steps=1, seed=0); atk(trained, *_batch()[:1], *_batch()[1])
    fct.test_eq(atk.last_losses.shape, (1, 3))


# --- unlabelled samples

def test_samples_without_labels_are_left_alone(trained):
    x, (lab, msk, con, dom) = _batch()
    lab = lab.clone(); lab[:3] = -1
    msk = msk.clone(); msk[:3] = MASK_IGNORE
    y = (lab, msk, con, dom)
    for atk in [MultiTaskPGD(['label', 'mask'], steps=2, seed=0), torchattack(torchattacks.PGD, 'label', steps=2)]:
        xa, _ = atk(trained, x, *y)
        fct.test_eq(xa[:3], x[:3])
        assert (xa[3:] != x[3:]).flatten(1).any(1).all(), atk
    atk = SpatialAttack(['label', 'mask'], 'grid', budget=8, max_shift=4)
    xa, ya = atk(trained, x, *y)
    fct.test_eq(xa[:3], x[:3]); fct.test_eq(ya[1][:3], msk[:3]); fct.test_eq(atk.last_params[:3], torch.zeros(3, 3))
    xa, _ = MultiTaskPGD('label', steps=2)(trained, x, torch.full_like(lab, -1), msk, con, dom)
    fct.test_eq(xa, x)


def test_regression_targets_with_nan_give_finite_gradients(trained):
    x, (lab, msk, con, dom) = _batch()
    con = con.clone(); con[:, 1] = NAN
    x_adv, _ = MultiTaskPGD('concepts', steps=3, seed=0)(trained, x, lab, msk, con, dom)
    assert torch.isfinite(x_adv).all() and (x_adv != x).any()


# --- model state

def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()], [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [r.lambda_ for r in model.reversals])

def _same_state(a, b):
    fct.test_eq(a[0], b[0]); fct.test_eq(a[1], b[1]); fct.test_eq(a[4], b[4])
    assert all(torch.equal(u, v) for u, v in zip(a[2], b[2])), "buffers changed"
    assert all((u is None and v is None) or (u is not None and v is not None and torch.equal(u, v)) for u, v in zip(a[3], b[3])), "gradients changed"

STATE_ATTACKS = [
    lambda: MultiTaskPGD(steps=2), lambda: WGD(steps=2, norm='L2', eps=0.5), lambda: torchattack(torchattacks.APGD, steps=2),
    lambda: torchattack(torchattacks.CW, steps=2), lambda: torchattack(torchattacks.DeepFool, steps=2),
    lambda: SpatialAttack(search='grid', budget=6), lambda: SpatialAttack(budget=4, n_init=2),
    lambda: HybridAttack(MultiTaskPGD(steps=1), SpatialAttack(search='grid', budget=4)),
]

@pytest.mark.parametrize('make', STATE_ATTACKS, ids=['pgd', 'wgd', 'apgd', 'cw', 'deepfool', 'grid', 'bo', 'hybrid'])
@pytest.mark.parametrize('mode', ['train', 'eval', 'frozen-bn'])
@pytest.mark.parametrize('grads', ['none', 'zeros'])
def test_model_state_is_restored(trained, make, mode, grads):
    "Mode of every submodule, BN statistics, requires_grad, parameter gradients and reversal strength are untouched"
    model = trained
    try:
        model.train(mode != 'eval')
        if mode == 'frozen-bn': model.backbone.bn1.eval(); model.backbone.conv1.weight.requires_grad_(False)
        for p in model.parameters(): p.grad = None if grads == 'none' else torch.zeros_like(p)
        before = _state(model)
        make()(model, *_batch()[:1], *_batch()[1])
        _same_state(before, _state(model))
    finally:
        model.eval(); model.zero_grad(set_to_none=True); model.backbone.conv1.weight.requires_grad_(True)


def test_attack_mode_restores_even_after_an_error(trained):
    before = _state(trained)
    with pytest.raises(RuntimeError):
        with attack_mode(trained):
            trained.backbone.bn1.train(); trained(torch.rand(4, 3, 32, 32))
            raise RuntimeError('boom')
    _same_state(before, _state(trained))


def test_attacks_work_under_no_grad(trained):
    "fastai's validation loop runs callbacks under torch.no_grad"
    x, y = _batch()
    with torch.no_grad(): x_adv, _ = MultiTaskPGD('label', steps=2, seed=0)(trained, x, *y)
    assert (x_adv != x).any()


# --- torchattacks

def test_taskview_runs_torchattacks_pgd_and_apgd(trained):
    x, _ = _batch(8)
    view = TaskView(trained, 'label')
    with torch.no_grad(): pred = view(x).argmax(1)
    xa = torchattacks.PGD(view, eps=8/255, alpha=2/255, steps=5)(x, pred)
    with torch.no_grad(): assert F.cross_entropy(view(xa), pred) > F.cross_entropy(view(x), pred)
    xb = torchattacks.APGD(view, eps=16/255, steps=10)(x, pred)
    assert (xb - x).abs().max() <= 16/255 + 1e-6
    with torch.no_grad(): assert (view(xb).argmax(1) != pred).any()
    fct.test_fail(lambda: TaskView(trained, 'concepts'), contains='classification')


@pytest.mark.parametrize('n', [8, 7])
@pytest.mark.parametrize('norm,eps,cls', [('Linf', 8/255, torchattacks.PGD), ('L2', 0.5, torchattacks.PGDL2)])
def test_single_task_pgd_equals_torchattacks(trained, n, norm, eps, cls):
    x, y = _batch(n)
    lab = y[0].clone(); lab[1] = 3  # torchattacks needs every label
    y = (lab,) + y[1:]
    view = TaskView(trained, 'label')
    torch.manual_seed(5); ours, _ = MultiTaskPGD('label', eps=eps, alpha=eps/4, steps=4, norm=norm)(trained, x, *y)
    torch.manual_seed(5); theirs = cls(view, eps=eps, alpha=eps/4, steps=4)(x, lab)
    fct.test_eq(ours, theirs)
    torch.manual_seed(11); theirs = cls(view, eps=eps, alpha=eps/4, steps=4)(x, lab)
    ours, _ = MultiTaskPGD('label', eps=eps, alpha=eps/4, steps=4, norm=norm, seed=11)(trained, x, *y)
    fct.test_eq(ours, theirs)  # a seed gives the same start as seeding torch's global generator
    ours, _ = MultiTaskPGD('label', eps=eps, alpha=eps/4, steps=4, norm=norm, random_start=False)(trained, x, *y)
    theirs = cls(view, eps=eps, alpha=eps/4, steps=4, random_start=False)(x, lab)
    fct.test_eq(ours, theirs)


def test_single_task_linf_pgd_is_per_sample(trained):
    "Without random start, a sample's adversarial image does not depend on its batch mates"
    x, y = _batch(8)
    atk = MultiTaskPGD('label', steps=3, random_start=False)
    full, _ = atk(trained, x, *y)
    part, _ = atk(trained, x[:4], *(t[:4] for t in y))
    fct.test_eq(full[:4], part)


def test_torchattack_keeps_callers_random_stream(trained):
    x, y = _batch()
    state = torch.random.get_rng_state()
    torchattack(torchattacks.APGD, steps=2)(trained, x, *y)
    fct.test_eq(torch.random.get_rng_state(), state)


def test_types_of_inputs_are_kept(trained):
    from fastai.torch_core import TensorImage, TensorCategory, TensorMask
    x, (lab, msk, con, dom) = _batch()
    xa, ya = SpatialAttack(search='grid', budget=4)(trained, TensorImage(x), TensorCategory(lab), TensorMask(msk), con, dom)
    assert isinstance(xa, TensorImage) and isinstance(ya[1], TensorMask) and isinstance(ya[0], TensorCategory)


# --- errors

def test_bad_inputs_are_reported(trained):
    x, y = _batch()
    fct.test_fail(lambda: MultiTaskPGD(norm='L1'), contains="norm must be one of")
    fct.test_fail(lambda: MultiTaskPGD('stain')(trained, x, *y), contains="['stain']")
    fct.test_fail(lambda: MultiTaskPGD()(trained, x*255, *y), contains='[0, 1]')
    fct.test_fail(lambda: MultiTaskPGD()(trained, x, *y[:2]), contains='expected 4 targets')
    fct.test_fail(lambda: MultiTaskPGD('label', weights={'mask': 2.})(trained, x, *y), contains="['mask']")
    fct.test_fail(lambda: SpatialAttack(search='random'), contains="'bo' or 'grid'")


# --- spatial transforms

def _colour_cells(n=4, size=48):
    "Masks of elliptic cells and images whose dominant colour encodes the mask (G background, R cytoplasm, B nucleus)"
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing='ij')
    masks = []
    for i in range(n):
        r = ((xx - size/2 - 2*i)**2 + ((yy - size/2 + i)/1.3)**2).sqrt()
        masks.append(torch.where(r < 7 + i, 2, torch.where(r < 14 + i, 1, 0)))
    masks = torch.stack(masks)
    return torch.eye(3)[torch.tensor([1, 0, 2])[masks]].permute(0, 3, 1, 2), masks


@pytest.mark.parametrize('seed', range(3))
def test_spatial_transform_keeps_image_and_mask_aligned(seed):
    img, msk = _colour_cells()
    g = torch.Generator().manual_seed(seed)
    angle, dx, dy = (torch.rand(4, generator=g)*360 - 180, torch.rand(4, generator=g)*24 - 12, torch.rand(4, generator=g)*24 - 12)
    ti, tm = spatial_transform(img, angle, dx, dy), spatial_transform(msk, angle, dx, dy)
    keep = tm != MASK_IGNORE
    assert keep.float().mean() > 0.4
    agree = dominant_channel_agreement(ti.permute(1, 0, 2, 3)[:, keep][None, :, None], tm[keep][None, None])
    assert agree > 0.96, agree
    _, ym = move_targets([classification_task(vocab=WBC_CLASSES), segmentation_task()], (torch.zeros(4), msk), angle, dx, dy)
    fct.test_eq(ym, tm)


def test_spatial_transform_identity_quarter_turn_and_shift():
    img, msk = torch.rand(3, 3, 12, 20), torch.randint(0, 3, (3, 12, 20), dtype=torch.uint8)
    fct.test_close(spatial_transform(img), img, eps=1e-6); fct.test_eq(spatial_transform(msk), msk)
    sq = torch.rand(2, 3, 10, 10)
    fct.test_close(spatial_transform(sq, 90.), torch.rot90(sq, -1, (-2, -1)), eps=1e-5)
    fct.test_close(spatial_transform(sq, -90.), torch.rot90(sq, 1, (-2, -1)), eps=1e-5)
    moved = spatial_transform(msk, dx=torch.tensor([2., 0., -3.]), dy=torch.tensor([0., 1., 0.]))
    fct.test_eq(moved[0, :, 2:], msk[0, :, :-2]); assert (moved[0, :, :2] == MASK_IGNORE).all()
    fct.test_eq(moved[1, 1:], msk[1, :-1]); fct.test_eq(moved[2, :, :-3], msk[2, :, 3:])
    fct.test_eq(moved.dtype, torch.uint8)
    fct.test_close(spatial_transform(img, dx=2, padding_mode='zeros')[..., 2:], img[..., :-2], eps=1e-5)


def test_rotation_keeps_aspect_of_non_square_images():
    "A half turn of a non-square image is a flip of both axes (no shear from the normalised coordinates)"
    img = torch.rand(2, 3, 12, 20)
    fct.test_close(spatial_transform(img, 180.), img.flip(-1, -2), eps=1e-5)


def test_spatial_transform_is_differentiable_in_its_parameters():
    img = torch.rand(2, 3, 16, 16)
    p = torch.zeros(3, requires_grad=True)
    spatial_transform(img, p[0] + 5, p[1] + 1, p[2]).square().sum().backward()
    assert p.grad.abs().min() > 0


# --- Bayesian optimisation

BOX = [(-180, 180), (-12, 12), (-12, 12)]

def _bump(s, centre=(60, 4, -3), width=(50, 5, 5)):
    return np.exp(-0.5*(((s - np.array(centre))/np.array(width))**2).sum(-1))


def test_expected_improvement_formula():
    from scipy.stats import norm
    mu, sd = np.array([1.5, 0.5, 2.]), np.array([0.5, 1., 0.])
    z = (mu[:2] - 1.)/sd[:2]
    fct.test_close(expected_improvement(mu, sd, 1.), np.r_[(mu[:2] - 1)*norm.cdf(z) + sd[:2]*norm.pdf(z), 1.])


@pytest.mark.parametrize('seed', range(3))
def test_bayes_opt_finds_the_peak(seed):
    centre = np.random.default_rng(seed).uniform([-120, -6, -6], [120, 6, 6])
    res = bayes_opt_maximise(lambda s: _bump(s, centre), BOX, budget=40, n_init=8, seed=seed)
    assert res.y[0] > 0.9, (res.y, res.x, centre)
    assert np.abs(res.x[0] - centre).max() < 25 and (np.abs(res.x[0][1:] - centre[1:]) < 3).all()
    fct.test_eq(res.Y.shape, (1, 40)); fct.test_eq(res.y[0], res.Y.max())


def test_bayes_opt_beats_random_search_on_average():
    rng = np.random.default_rng(0)
    centres = rng.uniform([-120, -6, -6], [120, 6, 6], (6, 3))
    f = lambda s: _bump(s, centres)  # 6 problems side by side, one peak each
    bo = bayes_opt_maximise(f, BOX, budget=30, n_init=8, seed=0, n_problems=6).y
    rand = np.stack([f(rng.uniform(*np.array(BOX).T, (6, 3))) for _ in range(30)]).max(0)
    assert bo.mean() > rand.mean() + 0.1, (bo, rand)


def test_bayes_opt_respects_bounds_and_evaluates_x0_first():
    res = bayes_opt_maximise(lambda s: -np.abs(s).sum(1), BOX, budget=15, n_init=4, seed=0, n_problems=2, x0=np.zeros(3))
    assert (res.X >= np.array(BOX)[:, 0]).all() and (res.X <= np.array(BOX)[:, 1]).all()
    fct.test_eq(res.X[:, 0], np.zeros((2, 3))); fct.test_eq(res.y, [0., 0.])


def test_grid_points_start_with_identity_and_respect_budget():
    for budget in [2, 9, 28, 100, 500]:
        g = grid_points(BOX, budget)
        assert len(g) <= budget and (g[0] == 0).all() and len(np.unique(g, axis=0)) == len(g)
        assert (np.abs(g) <= np.array([180, 12, 12])).all()
        turn = grid_points(BOX, budget, periodic=[True, False, False])
        assert len(turn) <= budget and not (turn[:, 0] == 180).any(), "-180 and 180 degrees are one rotation: the grid spends one point on it"


def test_spatial_attack_holds_an_axis_of_no_width(trained):
    x, y = _batch()
    for search in ('bo', 'grid'):
        atk = SpatialAttack('label', search, max_shift=0, budget=8, n_init=3, seed=0)
        atk(trained, x, *y)
        assert np.isfinite(atk.last_values).all() and (atk.last_params[:, 1:] == 0).all(), search
