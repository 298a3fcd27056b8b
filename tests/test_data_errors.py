"Bad input to the data readers: damaged files, masks outside their coding, size mismatches, unknown classes, empty folders"
import os, shutil, warnings
import numpy as np, pandas as pd, pytest
from PIL import Image
import fastcore.test as fct
from mtlrobust.core import KNOWN_CLASSES, WBC_CLASSES, read_mask, snap_to_codes, canonical_class
from mtlrobust.data import *
from mtlrobust.workflow import read_data

STRAY_MASKS = ['034', '035', '047', '050', '076']  # segmentation_WBC Dataset 2 masks with stray greys

def _cell(size=40, r=12):
    "RGB image and grey (0/128/255) mask of a disc-shaped cell"
    yy, xx = np.mgrid[:size, :size]; d = np.hypot(yy - size/2, xx - size/2)
    m = np.where(d < r/2, 255, np.where(d < r, 128, 0)).astype(np.uint8)
    rng = np.random.default_rng(r)
    img = (np.stack([m, 255 - m, m // 2], -1) * 0.8 + rng.integers(0, 50, (size, size, 3))).astype(np.uint8)
    return img, m

def _halve(f):
    "Cut file `f` in half, as an interrupted copy would"
    b = f.read_bytes(); f.write_bytes(b[:len(b)//2])

def _segwbc(root, n=4):
    "A segmentation_WBC-like folder: one `Dataset 1` with n images, masks and labels"
    d = root/'segmentation_WBC'/'Dataset 1'; d.mkdir(parents=True)
    for i in range(1, n+1):
        img, m = _cell(r=8+i); Image.fromarray(img).save(d/f'{i:03d}.bmp'); Image.fromarray(m).save(d/f'{i:03d}.png')
    (d.parent/'Class Labels of Dataset 1.csv').write_text('image ID,class label\n' + ''.join(f'{i},{1+i%5}\n' for i in range(1, n+1)))
    return d.parent

def _pbc(root, classes=('neutrophil', 'ig'), n=3):
    "A PBC-like folder: one folder of n JPEGs per class"
    for c in classes:
        (root/c).mkdir(parents=True)
        for i in range(n): Image.fromarray(_cell(r=8+i)[0]).save(root/c/f'{c}_{i}.jpg')
    return root

def _record(f, *args, **kwargs):
    "(result of f, list of warning messages it raised)"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); res = f(*args, **kwargs)
    return res, [str(o.message) for o in w]

# 1. damaged files -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('ext', ['jpg', 'png', 'bmp'])
def test_file_cut_in_half_is_truncated(tmp_path, ext):
    f = tmp_path/f'cell.{ext}'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(f)
    assert readable_image(f) and image_problem(f) is None
    _halve(f)
    assert image_problem(f).startswith('truncated ('), image_problem(f)
    assert not readable_image(f)

def test_empty_and_non_image_files_named_for_what_they_are(tmp_path):
    (tmp_path/'empty.jpg').write_bytes(b'')
    (tmp_path/'.DS_169665.jpg').write_bytes(b'\x00\x00\x00\x01Bud1 not a jpeg')
    fct.test_eq(image_problem(tmp_path/'empty.jpg'), 'empty file (0 bytes)')
    fct.test_eq(image_problem(tmp_path/'.DS_169665.jpg'), 'not an image (PIL cannot identify its format)')

def test_segwbc_skips_every_bad_file_with_one_warning(tmp_path):
    seg = _segwbc(tmp_path, n=5); d = seg/'Dataset 1'
    (d/'002.bmp').write_bytes(b'')  # 0-byte image
    _halve(d/'003.bmp')  # truncated image
    (d/'004.png').write_bytes(b'GIF89a but not really')  # mask that is not an image
    t, msgs = _record(load_segmentation_wbc, seg)
    fct.test_eq([os.path.basename(p) for p in t.image], ['001.bmp', '005.bmp'])
    fct.test_eq(len(msgs), 1)
    assert msgs[0].startswith(f"{seg}: skipped 3 of 5 row(s)"), msgs[0]
    for line in (f"image {d/'002.bmp'}: empty file (0 bytes)", f"image {d/'003.bmp'}: truncated",
                 f"mask {d/'004.png'}: not an image"):
        assert line in msgs[0], line
    with pytest.raises(ValueError, match=r"3 of 5 row\(s\) have an image or mask that cannot be used") as e:
        load_segmentation_wbc(seg, bad_files='raise')
    for f in ('002.bmp', '003.bmp', '004.png'): assert str(d/f) in str(e.value)

def test_manifest_bad_files_name_their_csv_line(tmp_path):
    for i in range(3): Image.fromarray(_cell(r=8+i)[0]).save(tmp_path/f'{i}.jpg')
    (tmp_path/'0.jpg').write_bytes(b'')
    _halve(tmp_path/'2.jpg')
    csv = tmp_path/'m.csv'; csv.write_text('image,label\n0.jpg,monocyte\n1.jpg,monocyte\n2.jpg,lymphocyte\n')
    t, msgs = _record(load_manifest, csv)
    fct.test_eq(t.image.tolist(), [str(tmp_path/'1.jpg')]); fct.test_eq(t.label.tolist(), ['monocyte'])
    fct.test_eq(len(msgs), 1)
    assert f"line 2: image {tmp_path/'0.jpg'}: empty file" in msgs[0] and f"line 4: image {tmp_path/'2.jpg'}: truncated" in msgs[0]
    with pytest.raises(ValueError, match=r"m\.csv: 2 of 3 row\(s\).*\n  line 2: image .*0\.jpg: empty file.*\n  line 4: image .*2\.jpg: truncated"):
        load_manifest(csv, bad_files='raise')

def test_pbc_bad_files_raise_and_option_checked(tmp_path):
    pbc = _pbc(tmp_path/'PBC')
    _halve(pbc/'ig'/'ig_1.jpg')
    t, msgs = _record(load_pbc, pbc)
    fct.test_eq(len(t), 5); fct.test_eq(len(msgs), 1)
    assert f"{pbc/'ig'/'ig_1.jpg'}: truncated" in msgs[0]
    with pytest.raises(ValueError, match='ig_1.jpg: truncated'): load_pbc(pbc, bad_files='raise')
    with pytest.raises(ValueError, match=r"bad_files='ignore': expected one of \('skip', 'raise'\)"): load_pbc(pbc, bad_files='ignore')

def test_all_files_bad_is_an_error(tmp_path):
    pbc = _pbc(tmp_path/'PBC', classes=['neutrophil'], n=2)
    for f in (pbc/'neutrophil').iterdir(): f.write_bytes(b'')
    with pytest.raises(ValueError, match=r'2 of 2 row\(s\) have an image or mask that cannot be used:'): load_pbc(pbc)

def test_real_pbc_files_with_a_truncated_copy(pbc_path, tmp_path):
    (tmp_path/'basophil').mkdir()
    src = sorted((pbc_path/'basophil').iterdir())[:4]
    for f in src: shutil.copy(f, tmp_path/'basophil'/f.name)
    _halve(tmp_path/'basophil'/src[0].name)
    t, msgs = _record(load_pbc, tmp_path)
    fct.test_eq(len(t), 3); fct.test_eq(len(msgs), 1)
    assert f"{src[0].name}: truncated" in msgs[0]

# 2. masks outside their coding --------------------------------------------------------------------------------------

def test_mask_with_value_outside_codes_is_refused(tmp_path):
    m = np.zeros((20, 20), np.uint8); m[5:15, 5:15] = 1; m[8:12, 8:12] = 2; m[:2, :2] = 3
    Image.fromarray(m).save(tmp_path/'m.png')
    with pytest.raises(ValueError) as e: read_mask(tmp_path/'m.png')
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path/'m.png'}: values 0 (296 px), 1 (84 px), 2 (16 px), 3 (4 px) fit no mask coding"), msg
    for coding in ('class codes 0/1/2', 'grey levels 0/128/255', 'palette PNG with indices 0/1/2'): assert coding in msg

def test_palette_masks(tmp_path):
    for idx, ok in (([[0, 1], [2, 2]], True), ([[0, 1], [2, 3]], False)):
        p = Image.fromarray(np.array(idx, np.uint8), mode='P'); p.putpalette([0,0,0, 90,90,90, 200,200,200, 255,0,0]); p.save(tmp_path/'p.png')
        if ok: fct.test_eq(read_mask(tmp_path/'p.png'), idx)
        else: fct.test_fail(lambda: read_mask(tmp_path/'p.png'), contains='palette indices 0 (1 px), 1 (1 px), 2 (1 px), 3 (1 px) fit no mask coding')

def test_grey_tolerance_and_stray_fraction():
    base = np.full((100, 100), 255, np.uint8); base[:50] = 0; base[50:70] = 128
    ok = base.copy(); ok[0, :90] = 7; ok[1, :5] = 50  # 0.95% strays, at most 50 off: as in the real masks
    fct.test_eq(np.bincount(snap_to_codes(ok).ravel()), [5000, 2000, 3000])
    far = base.copy(); far[0, 0] = 64  # 64 from both 0 and 128
    fct.test_fail(lambda: snap_to_codes(far, src='far.png'), contains='far.png: values 0 (4999 px), 64 (1 px), 128')
    many = base.copy(); many[0, :100] = 7; many[1, :10] = 7  # 1.1% strays
    fct.test_fail(lambda: snap_to_codes(many), contains='7 (110 px)')
    no_grey = np.zeros((100, 100), np.uint8); no_grey[0, 0] = 3  # codes with a stray 3: not a grey mask
    fct.test_fail(lambda: snap_to_codes(no_grey), contains='3 (1 px) fit no mask coding')
    fct.test_eq(snap_to_codes(np.array([[0, 127, 254, 254]])), [[0, 1, 2, 2]])  # codes*127: one main value per level
    codes_ignore = np.zeros((10, 10), np.uint8); codes_ignore[2:8] = 1; codes_ignore[4:6] = 2; codes_ignore[0] = 255
    fct.test_fail(lambda: snap_to_codes(codes_ignore), contains='values 0 (30 px), 1 (40 px), 2 (20 px), 255 (10 px) fit no mask coding')

def test_colour_masks(tmp_path):
    grey = np.array([[0, 128], [255, 128]], np.uint8)
    Image.fromarray(np.stack([grey]*3, -1)).save(tmp_path/'grey_rgb.png')
    fct.test_eq(read_mask(tmp_path/'grey_rgb.png'), [[0, 1], [2, 1]])
    rgb = np.zeros((2, 2, 3), np.uint8); rgb[0, :, 0] = 255; rgb[1, :, 2] = 255  # red cytoplasm, blue nucleus
    Image.fromarray(rgb).save(tmp_path/'colour.png')
    fct.test_fail(lambda: read_mask(tmp_path/'colour.png'), contains='colour.png: a colour mask (its channels differ) fits no mask coding')

def test_segwbc_mask_outside_coding_is_skipped_and_named(tmp_path):
    seg = _segwbc(tmp_path, n=3); d = seg/'Dataset 1'
    m = np.asarray(Image.open(d/'002.png')).copy(); m[m == 128] = 1; m[m == 255] = 2; m[:3, :3] = 3
    Image.fromarray(m).save(d/'002.png')
    t, msgs = _record(load_segmentation_wbc, seg)
    fct.test_eq(len(t), 2); fct.test_eq(len(msgs), 1)
    assert f"mask {d/'002.png'}: values 0 (" in msgs[0] and '3 (9 px) fit no mask coding' in msgs[0], msgs[0]

def test_real_stray_grey_masks_still_snap(segwbc_path):
    for name in STRAY_MASKS:
        f = segwbc_path/'Dataset 2'/f'{name}.png'
        raw = np.asarray(Image.open(f).convert('L'))
        stray = ~np.isin(raw, [0, 128, 255])
        assert stray.any() and raw[stray].max() <= 50, name
        m = read_mask(f)
        assert (m[stray] == 0).all(), name  # every stray of the real masks is a near-black pixel
        for level, code in ((0, 0), (128, 1), (255, 2)): assert (m[raw == level] == code).all(), name

def test_every_real_mask_reads(segwbc_path):
    masks = sorted(segwbc_path.glob('Dataset */*.png'))
    fct.test_eq(len(masks), 400)
    for f in masks: assert set(np.unique(read_mask(f))) <= {0, 1, 2}, f

# 3. mask size in segmentation_WBC -----------------------------------------------------------------------------------

def test_segwbc_mask_size_mismatch_names_both_files(tmp_path):
    seg = _segwbc(tmp_path, n=3); d = seg/'Dataset 1'
    Image.fromarray(np.zeros((30, 36), np.uint8)).save(d/'003.png')
    with pytest.raises(ValueError) as e: load_segmentation_wbc(seg)
    fct.test_eq(str(e.value), f"{seg}: 1 mask(s) differ in size from their image:\n"
                              f"  mask 36x30 differs from image 40x40: {d/'003.png'} vs {d/'003.bmp'}")
    with pytest.raises(ValueError, match='mask 36x30 differs from image 40x40'): load_segmentation_wbc(seg, bad_files='raise')

# 4. unknown class names ---------------------------------------------------------------------------------------------

def test_known_classes_are_canonical():
    assert KNOWN_CLASSES[:5] == WBC_CLASSES and len(set(KNOWN_CLASSES)) == len(KNOWN_CLASSES)
    for c in KNOWN_CLASSES: fct.test_eq(canonical_class(c), c)
    for name, c in (('ig', 'immature_granulocyte'), ('Platelets', 'platelet'), ('Smudge cells', 'smudge_cell'),
                    ('band', 'band_neutrophil'), ('Erythroblasts', 'erythroblast')): fct.test_eq(canonical_class(name), c)

def test_manifest_unknown_classes_warn_raise_ignore(tmp_path):
    Image.fromarray(_cell()[0]).save(tmp_path/'a.png')
    csv = tmp_path/'m.csv'
    csv.write_text('image,label\n' + 'a.png,neutrofil\n'*2 + 'a.png,7\na.png,Neutrophils\na.png,ig\n')
    t, msgs = _record(load_manifest, csv)
    fct.test_eq(t.label.tolist(), ['neutrofil', 'neutrofil', '7', 'neutrophil', 'immature_granulocyte'])
    fct.test_eq(len(msgs), 1)
    assert msgs[0].startswith(f"{csv}: unknown class name(s) '7' (1 rows), 'neutrofil' (2 rows); known classes are {KNOWN_CLASSES}"), msgs[0]
    with pytest.raises(ValueError, match=r"'neutrofil' \(2 rows\)"): load_manifest(csv, unknown_classes='raise')
    t, msgs = _record(load_manifest, csv, unknown_classes='ignore')
    fct.test_eq(len(t), 5); fct.test_eq(msgs, [])
    with pytest.raises(ValueError, match=r"unknown_classes='no': expected one of \('warn', 'raise', 'ignore'\)"):
        load_manifest(csv, unknown_classes='no')

def test_pbc_misspelled_class_folder(tmp_path):
    pbc = _pbc(tmp_path/'PBC', classes=['neutrophil', 'Neutrofils'], n=2)
    t, msgs = _record(load_pbc, pbc)
    fct.test_eq(sorted(t.label.unique()), ['neutrofils', 'neutrophil'])
    fct.test_eq(len(msgs), 1); assert "unknown class name(s) 'neutrofils' (2 rows)" in msgs[0]
    with pytest.raises(ValueError, match='neutrofils'): load_pbc(pbc, unknown_classes='raise')

def test_real_folders_read_without_any_warning(segwbc_path, pbc_path):
    for load, p in ((load_segmentation_wbc, segwbc_path), (load_pbc, pbc_path)):
        t, msgs = _record(load, p, bad_files='raise')
        fct.test_eq(msgs, [])
        fct.test_eq(check_class_names(t.label, 'raise'), {})
    fct.test_eq(len(t), 17092)

# 5. empty folders and manifests -------------------------------------------------------------------------------------

def test_empty_data_folder_is_a_clear_error(tmp_path):
    (tmp_path/'data').mkdir()
    with pytest.raises(FileNotFoundError, match='has no class sub-folders; expected one folder of images per class'):
        read_data(str(tmp_path/'data'))
    (tmp_path/'data'/'neutrophil').mkdir(); (tmp_path/'data'/'.cache').mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folders \['neutrophil'\] hold no files"): load_pbc(tmp_path/'data')

def test_empty_class_folder_and_requested_class_without_images_warn(tmp_path):
    pbc = _pbc(tmp_path/'PBC', classes=['neutrophil', 'monocyte'], n=2)
    (pbc/'basophil').mkdir()
    (pbc/'monocyte'/'monocyte_0.jpg').write_bytes(b''); (pbc/'monocyte'/'monocyte_1.jpg').write_bytes(b'')
    t, msgs = _record(load_pbc, pbc)
    fct.test_eq(t.label.tolist(), ['neutrophil']*2)
    assert msgs[-1] == (f"{pbc}: no readable image in class folder(s) basophil ({pbc/'basophil'}), monocyte ({pbc/'monocyte'}); "
                        "these classes have no rows"), msgs[-1]
    t, msgs = _record(load_pbc, pbc, classes=['basophil', 'neutrophil'])
    fct.test_eq(len(t), 2); fct.test_eq(len(msgs), 1); assert 'class folder(s) basophil' in msgs[0]

def test_manifest_without_rows_is_an_error(tmp_path):
    csv = tmp_path/'m.csv'
    csv.write_text('image,label\n')
    with pytest.raises(ValueError, match='m.csv has a header but no rows'): load_manifest(csv)
    csv.write_text('')
    with pytest.raises(ValueError, match='m.csv is empty; expected a header line'): load_manifest(csv)

def test_segwbc_without_images_is_an_error(tmp_path):
    (tmp_path/'Dataset 1').mkdir(); (tmp_path/'Class Labels of Dataset 1.csv').write_text('image ID,class label\n')
    with pytest.raises(FileNotFoundError, match="no images"): load_segmentation_wbc(tmp_path)
