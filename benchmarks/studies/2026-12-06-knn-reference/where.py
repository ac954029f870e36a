import torch, numpy as np, torch.nn.functional as F, sys
sys.path.insert(0, str(__import__('pathlib').Path(__file__).parent))
from fastflow.core import metrics as M
from PIL import Image
for ep in (3, 10):
    d = torch.load(f"/tmp/diag/epoch{ep}.pt", weights_only=False)
    lab = d["labels"].numpy(); masks = d["masks"]
    print(f"== epoch {ep}")
    for kind in ("nll", "z2"):
        for s, m in enumerate(d["test"][kind]):
            mx = m.flatten(1).max(1).values.numpy()
            # held-out normal stats
            print(kind, "scale", s, m.shape[-1], "img AUROC max %.3f" % M.image_auroc(lab, mx),
                  "good max mean %.2f defect max mean %.2f" % (mx[lab == 0].mean(), mx[lab == 1].mean()))
    # where does the fused NLL max land on good images: border? foreground?
    nll = d["test"]["nll"]
    for s, m in enumerate(nll):
        h = m.shape[-1]
        idx = m.flatten(1).argmax(1)
        r, c = idx // h, idx % h
        border = ((r < 2) | (c < 2) | (r >= h - 2) | (c >= h - 2)).float()
        # in the defect mask?
        mk = F.adaptive_max_pool2d(masks.float(), h)[:, 0]
        indef = mk[torch.arange(len(idx)), r, c]
        print("scale", s, "max on border: good %.2f defect %.2f; max inside defect (defective imgs) %.2f" % (
            border[lab == 0].mean(), border[lab == 1].mean(), indef[lab == 1].mean()))
    # foreground: image darkness
    names = d["names"]
    imgs = np.stack([np.asarray(Image.open("../shared/data/mvtec_screw/screw/test/" + n.split('/')[0] + "/" + n.split('/')[-1]).convert("L").resize((256, 256))) for n in names]) / 255.
    fg = torch.from_numpy(imgs < 0.5).float().unsqueeze(1)  # screw darker than background?
    print("fg fraction mean", fg.mean().item(), "mean level good %.3f defect %.3f" % (imgs[lab == 0].mean(), imgs[lab == 1].mean()))
    for s, m in enumerate(nll):
        h = m.shape[-1]
        idx = m.flatten(1).argmax(1); r, c = idx // h, idx % h
        f = F.adaptive_max_pool2d(fg, h)[:, 0][torch.arange(len(idx)), r, c]
        print("scale", s, "max on (near) part: good %.2f defect %.2f" % (f[lab == 0].mean(), f[lab == 1].mean()))
