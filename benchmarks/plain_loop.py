"""A plain PyTorch training loop for a class + mask model, to measure the library's recipe against (issue 11).

No fastai here: a torch `Dataset` over the sample table, a timm resnet18 encoder with a one-block-per-level U-Net
decoder and a linear class head, AdamW with `OneCycleLR`, unweighted cross-entropy of the class plus cross-entropy
of the mask pixels, and light joint augmentation (rotations by multiples of 90 degrees, horizontal flip; brightness
and per-channel contrast jitter on the image only). Written from the description in issue 11, not from the library.

    model = train_plain(table, vocab, size=128, epochs=25, bs=16, lr=3e-3, seed=0)
    probs, masks = predict_plain(model, table[table.split == 'test'], vocab, size=128)

`model(x)` (x: N,3,H,W in [0,1]) returns `{'label': (N, n_classes) logits, 'mask': (N, 3, H, W) logits}`, the
interface of `mtlrobust.models.MultiTaskModel` with tasks label + mask, so the library's metrics can evaluate it.

Choices the description leaves open: upsampling is bilinear; each decoder block outputs as many channels as its
skip connection; brightness is a factor in [0.95, 1.05] on the whole image, contrast a factor in [0.9, 1.1] per
channel about that channel's mean; the training loader drops the last incomplete batch (241 = 15 x 16 + 1: a batch of
one image would make BatchNorm statistics degenerate). The augmentation is drawn per image in the loop from a seeded
generator, so the run is the same whatever `num_workers` is (checked: same weights with 0 and 2 workers).

Check at full size (segmentation_WBC Dataset 1, `split_stratified(valid_pct=0, test_pct=0.2, seed=0)`: 241 train /
59 test, 128 px, the defaults above, CPU, 1496 s on 2 shared cores): test accuracy 0.915, balanced accuracy 0.911,
Dice nucleus 0.955 / cytoplasm 0.923 (through `mtlrobust.metrics`), against the 0.915 / 0.911 / 0.951 / 0.923
reported in issue 11.
"""
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F, timm
from PIL import Image
from mtlrobust.core import read_mask

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

class CellDataset(torch.utils.data.Dataset):
    "Image in [0,1] (3,size,size), class index and mask codes 0/1/2 (size,size) of each row of a sample table"
    def __init__(self, table, vocab, size):
        self.table, self.vocab, self.size = table.reset_index(drop=True), list(vocab), size
        for col in ('image', 'mask', 'label'):
            if col not in self.table or self.table[col].isna().any():
                raise ValueError(f"the plain loop needs an image, a mask and a label on every row; column {col!r} is missing or has empty rows")
        if unknown := sorted(set(self.table['label']) - set(self.vocab)):
            raise ValueError(f"labels {unknown} are not in the vocabulary {self.vocab}")
    def __len__(self): return len(self.table)
    def __getitem__(self, i):
        row, s = self.table.iloc[i], (self.size, self.size)
        img = Image.open(row['image']).convert('RGB').resize(s, Image.BILINEAR)
        mask = Image.fromarray(read_mask(row['mask'])).resize(s, Image.NEAREST)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
        return x, self.vocab.index(row['label']), torch.from_numpy(np.array(mask)).long()

def conv_bn_relu(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))

class PlainUNet(nn.Module):
    "timm encoder (no pretrained weights), U-Net decoder with one conv-BN-ReLU per level, 1x1 mask conv, linear class head"
    def __init__(self, n_classes, n_mask=3, arch='resnet18'):
        super().__init__()
        self.encoder = timm.create_model(arch, features_only=True, pretrained=False)
        chs = self.encoder.feature_info.channels()      # resnet18: 64, 64, 128, 256, 512 at strides 2 .. 32
        self.blocks = nn.ModuleList(conv_bn_relu(c_deep + c_skip, c_skip)   # deepest level first
                                    for c_deep, c_skip in zip(chs[:0:-1], chs[-2::-1]))
        self.mask_head = nn.Conv2d(chs[0], n_mask, 1)
        self.label_head = nn.Linear(chs[-1], n_classes)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    def forward(self, x):
        feats = self.encoder((x - self.mean) / self.std)
        y = feats[-1]
        for block, skip in zip(self.blocks, feats[-2::-1]):
            y = F.interpolate(y, size=skip.shape[-2:], mode='bilinear', align_corners=False)
            y = block(torch.cat([y, skip], 1))
        mask = F.interpolate(self.mask_head(y), size=x.shape[-2:], mode='bilinear', align_corners=False)
        return {'label': self.label_head(feats[-1].mean((2, 3))), 'mask': mask}

def augment(x, m, g):
    "Per image: rotation by k*90 degrees and horizontal flip of image and mask; brightness and contrast of the image"
    xs, ms = [], []
    for xi, mi in zip(x, m):
        k, flip = int(torch.randint(4, (1,), generator=g)), bool(torch.rand(1, generator=g) < 0.5)
        xi, mi = torch.rot90(xi, k, (1, 2)), torch.rot90(mi, k, (0, 1))
        if flip: xi, mi = xi.flip(2), mi.flip(1)
        bright = 1 + 0.05 * (2 * torch.rand(1, generator=g) - 1)
        contrast = 1 + 0.1 * (2 * torch.rand(3, 1, 1, generator=g) - 1)
        mean = xi.mean((1, 2), keepdim=True)
        xs.append((((xi - mean) * contrast + mean) * bright).clamp(0, 1)); ms.append(mi)
    return torch.stack(xs), torch.stack(ms)

def train_plain(table, vocab, size=128, epochs=25, bs=16, lr=3e-3, seed=0, num_workers=0):
    "The model trained on `table`'s rows with split == 'train', in eval mode"
    ds = CellDataset(table[table.split == 'train'], vocab, size)
    torch.manual_seed(seed)                              # model initialisation
    model = PlainUNet(len(vocab))
    dl = torch.utils.data.DataLoader(ds, bs, shuffle=True, drop_last=True, num_workers=num_workers,
                                     generator=torch.Generator().manual_seed(seed))   # batch order
    if not len(dl): raise ValueError(f"{len(ds)} training rows make no full batch of bs={bs}")
    g = torch.Generator().manual_seed(seed + 1)          # augmentation draws
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(dl))
    model.train()
    for epoch in range(epochs):
        for x, y, m in dl:
            x, m = augment(x, m, g)
            out = model(x)
            loss = F.cross_entropy(out['label'], y) + F.cross_entropy(out['mask'], m)
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return model.eval()

@torch.no_grad()
def predict_plain(model, table, vocab, size, bs=32):
    "(class probabilities (N, n_classes), predicted mask codes (N, size, size)) of `table`'s rows, in order"
    dl = torch.utils.data.DataLoader(CellDataset(table, vocab, size), bs)
    model.eval()
    outs = [model(x) for x, _, _ in dl]
    return torch.cat([o['label'].softmax(1) for o in outs]), torch.cat([o['mask'].argmax(1) for o in outs])
