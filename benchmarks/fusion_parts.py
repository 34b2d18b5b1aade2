"""Fusion experiment: train one model per category (cached), then the image AUROC of each part alone
(reconstruction, head, whole-image PCA residual at 16 and 32 px, patch view) and of their fusions (z-sum, max,
views: reconstruction and head averaged, with a full vote and with params.yaml's network_weight, then the image
views added).

    python benchmarks/fusion_parts.py CATEGORY_DIR ['{"train.epochs": 12}'] [TAG]

Models are cached under $CELLSCAN_FUSION_CACHE (default /tmp/cellscan-fusion/models); one JSON line per
run is appended to benchmarks/results/fusion_parts.jsonl; the raw part scores (test and hold-out) are saved
beside the cached model as part_scores.npz, for trying fusions without retraining. Standardisation uses the training hold-out only.
"""
import json, sys, time, os
from pathlib import Path
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
from sklearn.metrics import roc_auc_score
from cellscan.core.bundle import CellscanModel
from cellscan.core.config import load_params
from cellscan.core.data import load_dataset
from cellscan.core.images import load_batch, resize
from cellscan.core.scoring import PatchView, aggregate, anomaly_maps, smooth
from cellscan.core.train import fit_model

cat, over = Path(sys.argv[1]), json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
tag = sys.argv[3] if len(sys.argv) > 3 else "base"
p = load_params(Path(__file__).resolve().parent.parent / "params.yaml").with_overrides(over)
ds = load_dataset(cat)
mdir = Path(os.environ.get("CELLSCAN_FUSION_CACHE", "/tmp/cellscan-fusion/models")) / f"{cat.name}-{tag}"
if (mdir / "meta.json").is_file():
    model = CellscanModel.load_dir(mdir)
else:
    t0 = time.time()
    model, hist = fit_model(p, ds)
    model.save(mdir)
    print("trained", time.time() - t0, model.meta["stopped_by"], len(hist["loss"]), model.meta["train_images_per_s"], flush=True)
fit_paths, hold_paths = ds.split_train(p.data.val_fraction, p.base.seed)
shape = model.shape
samples = ds.evaluation
labels = np.array([s.label for s in samples])
xe = load_batch([s.path for s in samples], size=shape, channels=1)
xh = load_batch(hold_paths, size=shape, channels=1)
xf = load_batch(fit_paths, size=shape, channels=1)
sp = model.score_params
def parts(x):
    out = [model._parts(x[i:i+32], sp) for i in range(0, len(x), 32)]
    r = aggregate(np.concatenate([m for _, m, _ in out]), sp.aggregation, sp.topk)
    h = np.concatenate([hh for _, _, hh in out]).reshape(len(x), -1).max(axis=1)
    return r, h
re, he = parts(xe); rh, hh = parts(xh)
def pca_scores(side, var=0.95, mahal=False):
    def small(x): return np.stack([resize(a, side) for a in x]).reshape(len(x), -1).astype(np.float64)
    tf_, th, te = small(xf), small(xh), small(xe)
    mu = tf_.mean(0); u, s, vt = np.linalg.svd(tf_ - mu, full_matrices=False)
    ev = s**2 / (s**2).sum(); k = int(np.searchsorted(np.cumsum(ev), var) + 1); V = vt[:k]
    def sc(t):
        z = (t - mu) @ V.T; res = ((t - mu) - z @ V) ** 2
        return res.mean(1)
    return sc(th), sc(te), k
gh16, ge16, _ = pca_scores(16)
np.savez(mdir / "part_scores.npz", labels=labels, recon=re, head=he, glob=ge16, recon_hold=rh, head_hold=hh, glob_hold=gh16,
         defect=np.array([s.defect or "good" for s in samples]))
res = {"recon": roc_auc_score(labels, re), "head": roc_auc_score(labels, he)}
z = lambda v, ref: (v - ref.mean()) / max(ref.std(), 1e-9)
res["r+h"] = roc_auc_score(labels, z(re, rh) + z(he, hh))
net = (z(re, rh) + z(he, hh)) / 2  # the 'views' fusion: the network's two readings share one vote
res["views(r,h|g16)"] = roc_auc_score(labels, net + z(ge16, gh16))
w = p.score.network_weight  # the default fusion: the network's vote weighted
res[f"views({w:g}*(r,h)|g16)"] = roc_auc_score(labels, w * net + z(ge16, gh16))
for side in (16, 32):
    gh, ge, k = pca_scores(side)
    res[f"g{side}(k={k})"] = roc_auc_score(labels, ge)
    res[f"r+h+g{side}"] = roc_auc_score(labels, z(re, rh) + z(he, hh) + z(ge, gh))
    res[f"r+g{side}"] = roc_auc_score(labels, z(re, rh) + z(ge, gh))
    res[f"max(rhg{side})"] = roc_auc_score(labels, np.maximum.reduce([z(re, rh), z(he, hh), z(ge, gh)]))
patch_side = p.score.view_side(p.score.patch_side, shape)
if patch_side and PatchView.usable(shape, patch_side):
    # The patch view as training fits it (on the fitting images), so cached models made before it get it too.
    view = PatchView.fit(xf, patch_side)
    ph, pe = view.scores(xh), view.scores(xe)
    res["patch"] = roc_auc_score(labels, pe)
    res["r+h+g16+p"] = roc_auc_score(labels, z(re, rh) + z(he, hh) + z(ge16, gh16) + z(pe, ph))
    res["views(r,h|g16|p)"] = roc_auc_score(labels, net + z(ge16, gh16) + z(pe, ph))
    res[f"views({w:g}*(r,h)|g16|p)"] = roc_auc_score(labels, w * net + z(ge16, gh16) + z(pe, ph))
print(cat.name, tag, shape, {k: round(v, 3) for k, v in res.items()}, flush=True)
with open(Path(__file__).resolve().parent / "results" / "fusion_parts.jsonl", "a") as f:
    f.write(json.dumps({"cat": cat.name, "tag": tag, **res}) + "\n")
