"Property tests of the multi-task model: output shapes per timm family, gradient reversal, in-model normalisation, heads and splitter"
import copy
import pytest, torch, timm
import fastcore.test as fct
from mtlrobust.core import WBC_CLASSES
from mtlrobust.tasks import classification_task, segmentation_task, concept_task, adversarial_task, RegressionTask, SegmentationTask
from mtlrobust.models import (GradientReversal, PixelNormalize, Normalize, MultiTaskModel, UNetDecoder, mtl_splitter,
                              classifier_model, unet_model)

SMALL = dict(emb_sizes=(32, 16), decoder_channels=(16, 16, 8, 8))


def _tasks(lambda_=1., adversarial=True):
    dom = adversarial_task('domain', lambda_=lambda_)
    dom.vocab, dom.adversarial = ['A', 'B', 'C'], adversarial
    return [classification_task(vocab=WBC_CLASSES), concept_task(['nucleus_area', 'nucleus_lobes']), dom, segmentation_task()]


def _shapes(out): return {k: tuple(v.shape) for k, v in out.items()}


# timm families: (arch, timm kwargs, input height, width)
FAMILIES = [('resnet18', {}, 64, 64), ('convnext_atto', {}, 64, 64), ('efficientnet_b0', {}, 64, 64),
            ('regnetx_002', {}, 64, 64), ('mobilenetv3_small_050', {}, 64, 64),
            ('vit_tiny_patch16_224', dict(img_size=64), 64, 64),
            ('vit_tiny_patch16_224', dict(dynamic_img_size=True), 96, 128),
            ('deit_tiny_patch16_224', dict(img_size=(96, 128)), 96, 128),
            ('swin_tiny_patch4_window7_224', dict(img_size=64, window_size=2), 64, 64)]


@pytest.mark.parametrize('arch,kw,h,w', FAMILIES, ids=[f'{a}-{h}x{w}' for a, _, h, w in FAMILIES])
def test_every_family_gives_every_task_its_shape(arch, kw, h, w):
    m = MultiTaskModel(arch, _tasks(), **SMALL, **kw).eval()
    with torch.no_grad(): out = m(torch.rand(2, 3, h, w))
    fct.test_eq(_shapes(out), {'label': (2, 5), 'concepts': (2, 2), 'domain': (2, 3), 'mask': (2, 3, h, w)})
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize('arch,kw', [('resnet18', {}), ('convnext_atto', {}), ('efficientnet_b0', {}),
                                     ('vit_tiny_patch16_224', dict(dynamic_img_size=True, dynamic_img_pad=True))])
@pytest.mark.parametrize('hw', [(96, 128), (65, 99), (128, 72)])
def test_segmentation_logits_have_the_input_size(arch, kw, hw):
    m = unet_model(arch, decoder_channels=(16, 8, 8, 8), **kw).eval()
    with torch.no_grad(): fct.test_eq(m(torch.rand(1, 3, *hw))['mask'].shape, (1, 3, *hw))


def test_decoder_handles_equal_strides_and_fewer_maps_than_blocks():
    dec = UNetDecoder([192]*3, (32, 16, 8))
    fct.test_eq(dec([torch.rand(2, 192, 5, 7)]*3).shape, (2, 8, 10, 14))
    fct.test_eq(UNetDecoder([8, 16], ())([torch.rand(1, 8, 4, 4), torch.rand(1, 16, 2, 2)]).shape, (1, 16, 2, 2))


@pytest.mark.parametrize('lam', [1., 0.25, 0., 3.])
def test_gradient_reversal_multiplies_the_gradient_by_minus_lambda(lam):
    torch.manual_seed(0)
    x, w = torch.randn(5, 7), torch.randn(7)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    (torch.tanh(GradientReversal(lam)(a)) @ w).sum().backward()
    (torch.tanh(b) @ w).sum().backward()
    fct.test_close(a.grad, -lam*b.grad)
    fct.test_eq(GradientReversal(lam)(x), x)


def test_lambda_is_read_at_every_forward_so_a_schedule_can_change_it():
    grl, x = GradientReversal(1.), torch.ones(3, requires_grad=True)
    grl.lambda_ = 0.1
    grl(x).sum().backward()
    fct.test_close(x.grad, torch.full((3,), -0.1))


def _grads(model, x, task):
    "Gradient of `task`'s summed output w.r.t. the shared embedding and the backbone parameters"
    embs = []
    def keep(mod, inp, out): out.retain_grad(); embs.append(out)
    h = model.embedding.register_forward_hook(keep)
    model.zero_grad()
    model(x)[task].sum().backward(); h.remove()
    return embs[0].grad, torch.cat([p.grad.flatten() for p in model.backbone.parameters()])


@pytest.mark.parametrize('lam', [1., 0.5])
def test_adversarial_head_sends_the_opposite_gradient_to_the_shared_features(lam):
    torch.manual_seed(1); adv = MultiTaskModel('resnet18', _tasks(lam), **SMALL).eval()
    torch.manual_seed(1); plain = MultiTaskModel('resnet18', _tasks(lam, adversarial=False), **SMALL).eval()
    fct.test_eq(adv.heads['domain'][1].weight, plain.heads['domain'].weight)
    x = torch.rand(2, 3, 64, 64)
    (ea, ba), (ep, bp) = _grads(adv, x, 'domain'), _grads(plain, x, 'domain')
    assert ep.abs().sum() > 0 and bp.abs().sum() > 0
    fct.test_close(ea, -lam*ep)
    fct.test_close(ba, -lam*bp, eps=1e-5)
    assert (ea*ep <= 0).all()
    # the head itself still descends its own loss: same gradient on its weights
    fct.test_close(adv.heads['domain'][1].weight.grad, plain.heads['domain'].weight.grad)


def test_reversals_lists_one_layer_per_adversarial_task_and_setting_lambda_takes_effect():
    tasks = _tasks(0.5) + [RegressionTask('stain', ['stain'], adversarial=True, lambda_=2.)]
    m = MultiTaskModel('resnet18', tasks, **SMALL).eval()
    fct.test_eq(m.reversals.attrgot('lambda_'), [0.5, 2.])
    for g in m.reversals: g.lambda_ = 0.
    x = torch.rand(2, 3, 64, 64)
    fct.test_eq(_grads(m, x, 'domain')[0].abs().sum().item(), 0.)
    fct.test_eq(MultiTaskModel('resnet18', _tasks(adversarial=False), **SMALL).reversals, [])


def test_normalize_uses_the_backbone_statistics_as_buffers():
    m = MultiTaskModel('resnet18', [segmentation_task()], decoder_channels=(8,))
    x = torch.rand(2, 3, 16, 16)
    fct.test_close(m.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    fct.test_close(m.normalize(x), (x - m.normalize.mean)/m.normalize.std)
    assert {'normalize.mean', 'normalize.std'} <= set(m.state_dict())
    assert Normalize is PixelNormalize
    vit = MultiTaskModel('vit_tiny_patch16_224', [segmentation_task()], decoder_channels=(8,), img_size=32)
    fct.test_close(vit.normalize.mean.flatten(), torch.full((3,), 0.5))
    fct.test_close(vit.normalize(x[..., :16, :16].repeat(1, 1, 2, 2)), x.repeat(1, 1, 2, 2)*2 - 1)


def test_the_model_sees_pixels_through_its_normalisation():
    torch.manual_seed(0)
    a = MultiTaskModel('resnet18', _tasks(), **SMALL).eval()
    b = copy.deepcopy(a)
    b.normalize.mean.zero_(); b.normalize.std.fill_(1.)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad(): oa, ob = a(x), b((x - a.normalize.mean)/a.normalize.std)
    for k in oa: fct.test_close(oa[k], ob[k], eps=1e-4)
    with torch.no_grad(): assert not torch.allclose(a(x)['label'], b(x)['label'])


def test_one_input_channel():
    m = MultiTaskModel('resnet18', _tasks(), in_chans=1, **SMALL).eval()
    fct.test_eq(m.normalize.mean.shape, (1, 1, 1, 1))
    with torch.no_grad(): fct.test_eq(m(torch.rand(2, 1, 64, 64))['mask'].shape, (2, 3, 64, 64))


def test_pretrained_and_timm_kwargs_pass_straight_to_timm(monkeypatch):
    create, calls = timm.create_model, []
    def recording(*args, **kwargs):
        calls.append((args, kwargs)); return create(*args, **{**kwargs, 'pretrained': False})
    monkeypatch.setattr(timm, 'create_model', recording)
    classifier_model('resnet18', 3, pretrained=True, drop_path_rate=0.1)
    unet_model('resnet18')
    (args, kw), (_, kw2) = calls
    fct.test_eq(args, ('resnet18',))
    fct.test_eq((kw['pretrained'], kw['features_only'], kw['drop_path_rate'], kw['in_chans']), (True, True, 0.1, 3))
    fct.test_eq(kw2['pretrained'], False)


def test_unet_model_predicts_only_the_mask_and_has_no_embedding():
    m = unet_model('resnet18', decoder_channels=(16, 8)).eval()
    with torch.no_grad(): fct.test_eq(_shapes(m(torch.rand(2, 3, 64, 64))), {'mask': (2, 3, 64, 64)})
    assert m.embedding is None and not any(n.startswith('embedding') for n, _ in m.named_parameters())
    with pytest.raises(ValueError, match='no embedding'): m.embed(torch.rand(2, 3, 64, 64))


def test_a_model_without_segmentation_has_no_decoder():
    for m in [classifier_model('resnet18', WBC_CLASSES), MultiTaskModel('resnet18', _tasks()[:3])]:
        assert m.decoder is None and not any('decoder' in n for n, _ in m.named_parameters())
        fct.test_eq([type(h).__name__ for h in m.heads.values()][:1], ['Linear'])
    fct.test_eq(classifier_model('resnet18', ['a', 'b'], col='stain').tasks.attrgot('name'), ['stain'])


def test_embedding_sizes():
    x = torch.rand(2, 3, 64, 64)
    fct.test_eq(classifier_model('resnet18', 5, emb_sizes=()).eval().embed(x).shape, (2, 512))
    m = classifier_model('resnet18', 5, emb_sizes=(64, 32, 8))
    fct.test_eq((m.emb_size, m.heads['label'].in_features), (8, 8))
    fct.test_eq(sum(isinstance(l, torch.nn.BatchNorm1d) for l in m.embedding), 3)


@pytest.mark.parametrize('make', [lambda: MultiTaskModel('resnet18', _tasks(), **SMALL),
                                  lambda: classifier_model('convnext_atto', 5), lambda: unet_model('efficientnet_b0')])
def test_splitter_groups_cover_every_parameter_once(make):
    m = make()
    body, rest = mtl_splitter(m)
    ids = [id(p) for p in body + rest]
    fct.test_eq(len(ids), len(set(ids)))
    fct.test_eq(set(ids), {id(p) for p in m.parameters()})
    fct.test_eq({id(p) for p in body}, {id(p) for p in m.backbone.parameters()})
    assert rest


def test_every_parameter_gets_a_gradient_from_the_joint_loss():
    m = MultiTaskModel('resnet18', _tasks(), **SMALL).train()
    out = m(torch.rand(4, 3, 64, 64))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    fct.test_eq([n for n, p in m.named_parameters() if p.grad is None], [])


def test_invalid_tasks_are_refused_with_the_task_named():
    with pytest.raises(ValueError, match='no vocab'): MultiTaskModel('resnet18', [classification_task()])
    with pytest.raises(ValueError, match=r"\['mask'\]"): MultiTaskModel('resnet18', [segmentation_task()]*2)
    with pytest.raises(ValueError, match='at least one'): MultiTaskModel('resnet18', [])
    with pytest.raises(ValueError, match='cannot be adversarial'):
        MultiTaskModel('resnet18', [SegmentationTask('mask', ['mask'], ['a', 'b', 'c'], adversarial=True)])
    with pytest.raises(ValueError, match="'keys'"): MultiTaskModel('resnet18', [RegressionTask('keys', ['k'])])
    with pytest.raises(TypeError, match='must be `Task`s'): MultiTaskModel('resnet18', ['x'])
