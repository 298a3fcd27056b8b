"Property tests of the synthetic white-cell generator: determinism, balance, table layout, argument checks"
import numpy as np, pandas as pd, pytest
import fastcore.test as fct
from pathlib import Path
from PIL import Image
from mtlrobust.core import WBC_CLASSES, TABLE_COLUMNS, read_mask
from mtlrobust.synth import synth_wbc, draw_cell, SynthDomain, SYNTH_DOMAINS


def _bytes(table): return [Path(p).read_bytes() for p in table.image.tolist() + table['mask'].tolist()]


def test_same_parameters_give_same_files_in_different_folders(tmp_path):
    a, b = synth_wbc(25, domain='B', seed=3, path=tmp_path/'a'), synth_wbc(25, domain='B', seed=3, path=tmp_path/'b')
    assert _bytes(a) == _bytes(b)
    fct.test_eq(a.label.tolist(), b.label.tolist())


def test_files_hold_what_draw_cell_draws(tmp_path):
    t = synth_wbc(12, size=64, domain='C', seed=5, path=tmp_path)
    for i in (0, 6, 11):
        im, m = draw_cell(t.label[i], 64, np.random.default_rng([5, i]), 'C')
        fct.test_eq(np.asarray(Image.open(t.image[i])), im)
        fct.test_eq(read_mask(t['mask'][i]), m)


def test_classes_are_balanced_and_cycled(tmp_path):
    t = synth_wbc(23, path=tmp_path)
    counts = t.label.value_counts()
    fct.test_eq(set(counts.index), set(WBC_CLASSES))
    assert counts.max() - counts.min() <= 1
    fct.test_eq(t.label.tolist()[:5], WBC_CLASSES)
    two = synth_wbc(6, classes=['Lymphocytes', 'basophil'], path=tmp_path)
    fct.test_eq(two.label.tolist(), ['lymphocyte', 'basophil']*3)


def test_table_columns_and_dtypes(tmp_path):
    t = synth_wbc(7, domain=SYNTH_DOMAINS['B'], path=tmp_path)
    fct.test_eq(list(t.columns), TABLE_COLUMNS)
    assert all(t[c].dtype == object for c in TABLE_COLUMNS)
    fct.test_eq((set(t.domain), set(t.dataset)), ({'B'}, {'synthetic'}))
    assert all(Path(p).is_file() and Path(p).suffix == '.png' for p in t.image.tolist() + t['mask'].tolist())
    fct.test_eq(Image.open(t.image[0]).size, (96, 96))
    fct.test_eq(Image.open(t.image[0]).mode, 'RGB')


def test_masks_are_exact_codes_with_nucleus_and_cytoplasm(tmp_path):
    t = synth_wbc(20, size=80, domain='C', path=tmp_path)
    for p in t['mask']:
        fct.test_eq(set(np.unique(np.asarray(Image.open(p)))), {0, 128, 255})   # no stray grey
        fct.test_eq(set(np.unique(read_mask(p))), {0, 1, 2})


def test_cell_i_does_not_depend_on_n_and_seed_changes_cells(tmp_path):
    small, large = synth_wbc(5, path=tmp_path), synth_wbc(30, path=tmp_path)
    assert _bytes(small)[:5] == [Path(p).read_bytes() for p in large.image[:5]]
    other = synth_wbc(5, seed=1, path=tmp_path)
    assert not set(_bytes(other)[:5]) & set(_bytes(small)[:5])


def test_second_call_reuses_files(tmp_path):
    t = synth_wbc(10, path=tmp_path)
    stamps = [Path(p).stat().st_mtime_ns for p in t.image.tolist() + t['mask'].tolist()]
    pd.testing.assert_frame_equal(synth_wbc(10, path=tmp_path), t)
    fct.test_eq([Path(p).stat().st_mtime_ns for p in t.image.tolist() + t['mask'].tolist()], stamps)


def test_foreign_folder_is_never_written(tmp_path):
    t = synth_wbc(5, path=tmp_path)
    folder = Path(t.image[0]).parent
    (folder/'synth.json').unlink()
    Path(t.image[1]).unlink()
    with pytest.raises(FileExistsError, match='without a manifest'): synth_wbc(5, path=tmp_path)
    assert not Path(t.image[1]).exists()


def test_domains_change_colour_not_masks():
    a = [draw_cell(WBC_CLASSES[i % 5], 96, [9, i], 'A') for i in range(20)]
    b = [draw_cell(WBC_CLASSES[i % 5], 96, [9, i], 'B') for i in range(20)]
    for (_, ma), (_, mb) in zip(a, b): fct.test_eq(ma, mb)
    mean = lambda res: np.mean([im.reshape(-1, 3).mean(0) for im, _ in res], 0)
    assert np.linalg.norm(mean(a) - mean(b)) > 20


@pytest.mark.parametrize('kwargs, message', [
    (dict(n=0), 'n must be an integer >= 1, got 0'),
    (dict(n=-3), 'n must be an integer >= 1'),
    (dict(n=2.5), 'n must be an integer >= 1'),
    (dict(n=5, size=8), 'size must be an integer >= 32'),
    (dict(n=5, seed=-1), 'seed must be an integer >= 0'),
    (dict(n=5, domain='D'), "domain must be one of ['A', 'B', 'C'] or a SynthDomain, got 'D'"),
    (dict(n=5, classes=['neutrophil', 'platelet']), 'classes must be a non-empty list of names among'),
    (dict(n=5, classes=[]), 'classes must be a non-empty list'),
])
def test_invalid_arguments_name_the_argument(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as e: synth_wbc(path=tmp_path, **kwargs)
    assert message in str(e.value), str(e.value)
    assert not any(tmp_path.iterdir())      # nothing written


def test_draw_cell_rejects_unknown_class():
    with pytest.raises(ValueError, match='label must be one of'): draw_cell('platelet')
