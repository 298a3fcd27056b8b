"The interpret module on real cells: the out-of-distribution score of a model trained on one camera flags another's cells"
import pandas as pd
from mtlrobust.data import split_stratified
from mtlrobust.tasks import classification_task
from mtlrobust.workflow import train_model
from mtlrobust.interpret import fit_ood, ood_scores, ood_auroc, layer_activations, domain_probe

def _dataset(segwbc, name):
    return segwbc[segwbc.domain.str.endswith(name)].reset_index(drop=True)

def test_ood_score_flags_another_camera(segwbc):
    d1, d2 = _dataset(segwbc, 'Dataset 1'), _dataset(segwbc, 'Dataset 2')
    t = d1.assign(split=split_stratified(d1, valid_pct=0., test_pct=0.2, seed=0))
    learn = train_model(t, [classification_task()], arch='resnet10t', size=32, epochs=2, progress=False, emb_sizes=(32,))
    fit_ood(learn, t[t.split == 'train'], progress=False)
    inside, outside = ood_scores(learn, t[t.split == 'test'], progress=False), ood_scores(learn, d2, progress=False)
    auc, low, high = ood_auroc(inside.ood_score, outside.ood_score)
    assert auc > 0.9 and low <= auc <= high, (auc, low, high)
    assert outside.ood_flagged.mean() > 0.5 > inside.ood_flagged.mean()
    # and the embedding knows the camera: a linear probe tells the two datasets apart
    cells = pd.concat([t[t.split == 'test'].drop(columns='split'), d2.iloc[:60]], ignore_index=True)
    probe = domain_probe(layer_activations(learn, cells, ['dense1'], progress=False)['dense1'], cells.domain).set_index('metric')
    assert probe.loc['balanced_accuracy', 'low'] > probe.loc['balanced_accuracy', 'chance']
