import sys, torch, numpy as np, torch.nn.functional as F
sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
import probe
from fastflow.core import knn
from fastflow.core import metrics as M
torch.set_num_threads(2)
cfg, splits, enc = probe.encoded_for('screw', 0)
lab = enc.test.labels.numpy()
tr = knn.patch_features(enc.train.features, [1, 2], 3)
te = knn.patch_features(enc.test.features, [1, 2], 3)
X = tr.permute(0, 2, 3, 1).reshape(-1, tr.shape[1]).double()
mu = X.mean(0); C = torch.cov(X.T)
ev = torch.linalg.eigvalsh(C); print("eigs min/median/max", ev.min().item(), ev.median().item(), ev.max().item())
Y = te.permute(0, 2, 3, 1).reshape(-1, te.shape[1]).double() - mu
def report(name, s):
    m = s.view(len(te), 1, te.shape[-2], te.shape[-1]).float()
    up = knn.gaussian_blur(F.interpolate(m, size=(256, 256), mode="bilinear"), 4)
    print(name, "img max %.3f blur %.3f" % (M.image_auroc(lab, m.flatten(1).max(1).values.numpy()), M.image_auroc(lab, up.flatten(1).max(1).values.numpy())))
report("euclid-to-mean", (Y ** 2).sum(1))
for reg in (0.0, 0.01, 0.1, 1.0):
    P = torch.linalg.inv(C + reg * ev.mean() * torch.eye(len(C), dtype=C.dtype))
    report(f"mahalanobis reg {reg}", ((Y @ P) * Y).sum(1))
