"""Research probe for the patch preset's flows on cached Lite0 features (strides 8 and 16, 3x3 average, channel norm):
dihedral augmentation of the training IMAGES (rot90 x flip, each copy encoded by the backbone), learning rate and
cosine schedule, one flow on the stages concatenated at 16x16 (`fusion`). Prints, every `eval_every_images`
training images, the TEST image AUROC of the fused NLL map's max (raw / position-standardised by the held-out
normals / blurred), each stage's alone, the pixel AUROC, and the held-out validation AUROC and mean NLL.
Diagnostic only (test figures choose nothing); what it suggests is then measured leak-free by `fastflow train`.

Run from the repository root, e.g.
  .venv/bin/python benchmarks/studies/2026-12-07-flow-levers/levers.py screw 0 '{"aug":1,"epochs":40,"lr":3e-3,"cosine":true}'
"""
import json, os, sys, time
import numpy as np, torch
import torch.nn.functional as F
sys.path.insert(0, "benchmarks/studies/2026-12-06-knn-reference")
from probe import encoded_for, Flows, prep, maps_of, fuse, gaussian_blur
from fastflow.core.model import FastFlow
from fastflow.data.dataset import ImageDataset
from fastflow.data.features import encode
from fastflow.engine.train import seed_everything
from fastflow.core import metrics as M

torch.set_num_threads(1)
cat, seed = sys.argv[1], int(sys.argv[2])
v = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
n_aug = v.get("aug", 8); epochs = v.get("epochs", 10); steps_eval = v.get("eval_every_images", 576)
size = v.get("size", 256)
cfg, splits, enc = encoded_for(cat, seed, size, (2, 3))
model = FastFlow(cfg.model)

class Dihedral(torch.utils.data.Dataset):
    def __init__(self, base, k): self.base, self.k = base, k
    def __len__(self): return len(self.base) * self.k
    def __getitem__(self, i):
        img, m, l = self.base[i % len(self.base)]
        t = i // len(self.base)
        if t >= 4: img = img.flip(-1)
        return torch.rot90(img, t % 4, (-2, -1)), m, l

path = f".cache/levers/aug_{cat}_{seed}_{n_aug}_{size}.pt"
os.makedirs(".cache/levers", exist_ok=True)
n_train_imgs = len(splits.train)
if os.path.exists(path):
    feats = torch.load(path)
else:
    t0 = time.time()
    e = encode(model, Dihedral(ImageDataset(splits.train, size), n_aug), 32, torch.device("cpu"))
    feats = e.features; torch.save(feats, path); print("encoded", round(time.time() - t0), "s", flush=True)
k = 3
def pool(f): return F.avg_pool2d(f.float(), k, stride=1, padding=k // 2, count_include_pad=False)
fusion = v.get("fusion", "none")
def fuse_stages(fs):
    if fusion == "none":
        return fs
    if fusion == "concat16":
        return [torch.cat([F.avg_pool2d(fs[0], 2), fs[1]], 1)]
    if fusion == "concat32":
        return [torch.cat([fs[0], F.interpolate(fs[1], size=fs[0].shape[-1], mode="bilinear", align_corners=False)], 1)]
train = fuse_stages([pool(f) for f in feats])
test = fuse_stages([pool(f) for f in enc.test.features])
val = fuse_stages([pool(f) for f in enc.validation.features])
seed_everything(seed)
net = Flows([tuple(f.shape[1:]) for f in train], v.get("norm", "channel"), 8, 1.0)
opt = torch.optim.Adam(net.parameters(), lr=v.get("lr", 1e-3), weight_decay=v.get("wd", 1e-5))
import math
total_steps = math.ceil(epochs * n_train_imgs / 32)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda st: 0.5 * (1 + math.cos(math.pi * min(st, total_steps) / total_steps)) if v.get("cosine") else 1.0)
g = torch.Generator().manual_seed(seed)
labels, masks = enc.test.labels.numpy(), enc.test.masks.numpy()
vl = enc.validation.labels.numpy(); nv = int((vl == 0).sum())
seen = 0; nxt = steps_eval; t0 = time.time()
total = epochs * n_train_imgs
while seen < total:
    order = torch.randperm(len(train[0]), generator=g)
    for i in range(0, len(order), 32):
        net.train()
        zs, js = net([f[order[i:i + 32]] for f in train])
        loss = sum(torch.mean(0.5 * (z ** 2).sum((1, 2, 3)) - j.sum((1, 2))) for z, j in zip(zs, js))
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        seen += len(order[i:i + 32])
        if seen >= nxt or seen >= total:
            nxt += steps_eval
            tm = maps_of(net, test)["nll"]; vm = maps_of(net, val)["nll"]
            normals = [m[:nv] for m in vm]
            mu = [m.mean(0, keepdim=True) for m in normals]
            sd = [torch.sqrt(0.5 * (m.var(0, keepdim=True) + m.var()) + 1e-6) for m in normals]
            sm = fuse([(m - a) / b for m, a, b in zip(tm, mu, sd)], size)
            svm = fuse([(m - a) / b for m, a, b in zip(vm, mu, sd)], size)
            row = dict(ep=round(seen / n_train_imgs, 1), s=round(time.time() - t0), loss=round(loss.item()),
                       raw=M.image_auroc(labels, fuse(tm, size).flatten(1).max(1).values.numpy()),
                       pos=M.image_auroc(labels, sm.flatten(1).max(1).values.numpy()),
                       px=M.pixel_auroc(masks[:, 0], gaussian_blur(fuse(tm, size), 4).numpy()[:, 0]),
                       pos_b=M.image_auroc(labels, gaussian_blur(sm, 4).flatten(1).max(1).values.numpy()),
                       s8=M.image_auroc(labels, ((tm[0]-mu[0])/sd[0]).flatten(1).max(1).values.numpy()),
                       s16=M.image_auroc(labels, ((tm[-1]-mu[-1])/sd[-1]).flatten(1).max(1).values.numpy()),
                       val_pos=M.image_auroc(vl, svm.flatten(1).max(1).values.numpy()),
                       val_raw=M.image_auroc(vl, fuse(vm, size).flatten(1).max(1).values.numpy()),
                       val_nll=float(fuse(vm, size)[:nv].mean()))
            print(json.dumps({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}), flush=True)
            if seen >= total: break
