"""Research probe: kNN reference and flow variants on cached Lite0 features (screw / tire).

Diagnostic only: per-epoch TEST image AUROC is printed to find levers; defaults are then verified leak-free
with the harness itself.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastflow.runtime.config import load_config
from fastflow.data.dataset import make_splits
from fastflow.core.model import FastFlow, ChannelNorm
from fastflow.core.flow import build_flow, run_flow
from fastflow.engine.encode import encode_splits
from fastflow.engine.train import seed_everything
from fastflow.core import metrics as M

ROOTS = {"screw": "../shared/data/mvtec_screw", "tire": "../shared/data/mvtec3d_tire"}


def encoded_for(category, seed, size=256, indices=(1, 2, 3)):
    cfg = load_config("experiments/efficientnet_lite0.yaml", [
        f"data.root={ROOTS[category]}", f"data.category={category}", f"train.seed={seed}",
        f"model.input_size={size}", f"model.feature_indices=[{','.join(map(str, indices))}]",
        "train.cache_dir=.cache/features", "tracking.enabled=false"])
    seed_everything(seed)
    splits = make_splits(cfg.data, 0, seed)
    model = FastFlow(cfg.model)
    enc = encode_splits(model, cfg, splits, torch.device("cpu"))
    return cfg, splits, enc


def gaussian_blur(maps, sigma):
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum())
    maps = F.conv2d(F.pad(maps, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(maps, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))


def pool(f, k):
    return f if k <= 1 else F.avg_pool2d(f, k, stride=1, padding=k // 2, count_include_pad=False)


def knn_reference(enc, scales=(1, 2), k=3, fraction=0.25, seed=0, size=256):
    from sklearn.neighbors import NearestNeighbors

    def patches(split):
        feats = [pool(split.features[s].float(), k) for s in scales]
        side = feats[0].shape[-1]
        feats = [f if f.shape[-1] == side else F.interpolate(f, size=side, mode="bilinear", align_corners=False)
                 for f in feats]
        x = torch.cat(feats, 1)
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).numpy(), side

    bank, side = patches(enc.train)
    rng = np.random.default_rng(seed)
    bank = bank[rng.choice(len(bank), int(len(bank) * fraction), replace=False)]
    nn_ = NearestNeighbors(n_neighbors=1).fit(bank)
    test, _ = patches(enc.test)
    d, _ = nn_.kneighbors(test)
    n = len(enc.test)
    dmap = torch.from_numpy(d.reshape(n, 1, side, side)).float()
    up = gaussian_blur(F.interpolate(dmap, size=size, mode="bilinear", align_corners=False), 4)
    labels = enc.test.labels.numpy()
    masks = enc.test.masks.numpy()
    return {"img_max_patch": M.image_auroc(labels, dmap.flatten(1).max(1).values.numpy()),
            "img_max_blur": M.image_auroc(labels, up.flatten(1).max(1).values.numpy()),
            "pixel": M.pixel_auroc(masks[:, 0], up.numpy()[:, 0])}


class Flows(nn.Module):
    def __init__(self, shapes, norm, steps, hidden, clamp=2.0, kernel=3):
        super().__init__()
        self.norms = nn.ModuleList(ChannelNorm(c) if norm == "channel" else
                                   (nn.LayerNorm([c, h, w]) if norm == "chw" else nn.Identity()) for c, h, w in shapes)
        self.flows = nn.ModuleList(local_flow(c, h, w, steps, hidden, clamp, kernel) for c, h, w in shapes)

    def forward(self, feats):
        zs, js = [], []
        for f, n, fl in zip(feats, self.norms, self.flows):
            z, j = run_flow(fl, n(f))
            zs.append(z)
            js.append(j)
        return zs, js


def local_flow(c, h, w, steps, hidden, clamp, kernel):
    import FrEIA.framework as Ff
    from fastflow.core.flow import PositionLogJacBlock, subnet_conv
    flow = Ff.SequenceINN(c, h, w)
    for step in range(steps):
        ks = kernel if kernel in (1, 3) else (3 if step % 2 == 0 else 1)
        flow.append(PositionLogJacBlock, subnet_constructor=subnet_conv(ks, hidden), affine_clamping=clamp,
                    permute_soft=False)
    return flow


def prep(split, scales, k):
    return [pool(split.features[s].float(), k) for s in scales]


@torch.no_grad()
def maps_of(model, feats, bs=32):
    model.eval()
    out = {"nll": [], "z2": []}
    for i in range(0, len(feats[0]), bs):
        zs, js = model([f[i:i + bs] for f in feats])
        out["nll"].append([((0.5 * (z ** 2).sum(1) - j) / z.shape[1]).unsqueeze(1) for z, j in zip(zs, js)])
        out["z2"].append([(0.5 * (z ** 2).mean(1, keepdim=True)) for z in zs])
    return {kk: [torch.cat(s) for s in zip(*v)] for kk, v in out.items()}


def fuse(per_scale, size=256):
    return torch.stack([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in per_scale]).mean(0)


def run_variant(enc, scales=(0, 1, 2), k=1, norm="chw", steps=8, hidden=1.0, lr=1e-3, wd=1e-5, noise=0.0,
                epochs=10, seed=0, bs=32, aug_flip=False, log=print, kernel=3):
    seed_everything(seed)
    train = prep(enc.train, scales, k)
    test = prep(enc.test, scales, k)
    val = prep(enc.validation, scales, k) if enc.validation is not None else None
    shapes = [tuple(f.shape[1:]) for f in train]
    model = Flows(shapes, norm, steps, hidden, kernel=kernel)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(seed)
    labels, masks = enc.test.labels.numpy(), enc.test.masks.numpy()
    rows = []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.time()
        order = torch.randperm(len(train[0]), generator=g)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            feats = [f[idx] for f in train]
            if aug_flip:
                if torch.rand(1, generator=g) < 0.5:
                    feats = [f.flip(-1) for f in feats]
                if torch.rand(1, generator=g) < 0.5:
                    feats = [f.flip(-2) for f in feats]
            if noise > 0:
                feats = [f + noise * f.std() * torch.randn(f.shape, generator=g) for f in feats]
            zs, js = model(feats)
            loss = sum(torch.mean(0.5 * (z ** 2).sum((1, 2, 3)) - j.sum((1, 2))) for z, j in zip(zs, js))
            opt.zero_grad()
            loss.backward()
            opt.step()
        secs = time.time() - t0
        tm = maps_of(model, test)
        row = {"epoch": epoch, "loss": round(loss.item(), 1), "s": round(secs, 1)}
        for kind in ("nll", "z2"):
            fused = fuse(tm[kind])
            row[f"{kind}_max"] = M.image_auroc(labels, fused.flatten(1).max(1).values.numpy())
            b = gaussian_blur(fused, 4)
            row[f"{kind}_bmax"] = M.image_auroc(labels, b.flatten(1).max(1).values.numpy())
            if kind == "nll":
                row["px_nll"] = M.pixel_auroc(masks[:, 0], b.numpy()[:, 0])
        if val is not None:
            vm = maps_of(model, val)
            nv = int((enc.validation.labels == 0).sum())
            for kind in ("nll", "z2"):
                normals = [m[:nv] for m in vm[kind]]
                mu = [m.mean(0, keepdim=True) for m in normals]
                sd = [torch.sqrt(0.5 * (m.var(0, keepdim=True) + m.var()) + 1e-6) for m in normals]
                std_maps = [(m - a) / b for m, a, b in zip(tm[kind], mu, sd)]
                b = gaussian_blur(fuse(std_maps), 4)
                row[f"pos_{kind}_bmax"] = M.image_auroc(labels, b.flatten(1).max(1).values.numpy())
                row[f"pos_{kind}_max"] = M.image_auroc(labels, fuse(std_maps).flatten(1).max(1).values.numpy())
            vl = enc.validation.labels.numpy()
            for kind in ("z2", "nll"):
                b = gaussian_blur(fuse(vm[kind]), 4)
                row[f"val_{kind}_bmax"] = M.image_auroc(vl, b.flatten(1).max(1).values.numpy())
                normal = vl == 0
                row[f"val_{kind}_normal_max"] = float(b.flatten(1).max(1).values[torch.from_numpy(normal)].mean())
        rows.append(row)
        log(json.dumps({k2: (round(v, 3) if isinstance(v, float) else v) for k2, v in row.items()}))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("category")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--knn", action="store_true")
    p.add_argument("--variant", default="{}")
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg, splits, enc = encoded_for(a.category, a.seed, a.size)
    print("splits", len(splits.train), len(splits.validation), len(splits.test), flush=True)
    if a.knn:
        t = time.time()
        print("knn", knn_reference(enc, size=a.size), round(time.time() - t, 1), flush=True)
    v = json.loads(a.variant)
    if v:
        print("variant", v, flush=True)
        run_variant(enc, **v, log=lambda s: print(s, flush=True))


def diagnose(enc, splits, scales=(0, 1, 2), k=1, norm="chw", epochs=10, seed=0, save_at=(3, 10), out="/tmp/diag"):
    """Train the baseline and save per-scale test NLL/z2 maps at some epochs, for 'where does the max land'."""
    import os
    os.makedirs(out, exist_ok=True)
    seed_everything(seed)
    train = prep(enc.train, scales, k)
    test = prep(enc.test, scales, k)
    val = prep(enc.validation, scales, k)
    model = Flows([tuple(f.shape[1:]) for f in train], norm, 8, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train[0]), generator=g)
        for i in range(0, len(order), 32):
            zs, js = model([f[order[i:i + 32]] for f in train])
            loss = sum(torch.mean(0.5 * (z ** 2).sum((1, 2, 3)) - j.sum((1, 2))) for z, j in zip(zs, js))
            opt.zero_grad(); loss.backward(); opt.step()
        if epoch in save_at:
            torch.save({"test": maps_of(model, test), "val": maps_of(model, val),
                        "labels": enc.test.labels, "masks": enc.test.masks,
                        "names": [f"{s.defect}/{s.image}" for s in splits.test]}, f"{out}/epoch{epoch}.pt")
            print("saved", epoch, flush=True)
