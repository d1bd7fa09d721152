"""Labels of four fit paths, to check that a restructuring of fit changes nothing (same seed, same labels).

Before the change: ``python bench/same_labels.py before.npz``; after it: ``python bench/same_labels.py after.npz
before.npz`` prints 'same' or 'DIFFERENT' per path: the default (no pretraining) on digits, two distillation
rounds with a fresh student, a pretrained encoder's distillation, and IDEC from k-means.
"""
import sys, numpy as np, torch
from sklearn.datasets import load_digits, make_blobs
from dec_mlflow import DEC
torch.set_num_threads(2)
X, _ = load_digits(return_X_y=True)
xb, _ = make_blobs(600, n_features=12, centers=4, cluster_std=2.0, random_state=3)
out = {}
out["digits_default"] = DEC(n_clusters=10, random_state=0, max_iter=400).fit(X).labels_
out["digits_best2"] = DEC(n_clusters=10, random_state=1, distill_rounds=2, distill_epochs=3, max_iter=200).fit(X[:800]).labels_
out["blobs_pretrained"] = DEC(n_clusters=4, hidden_dims=(32, 16, 4), pretrain_epochs=15, pretrain_lr=0.1, batch_size=64, update_interval=10, precision="fp32", random_state=2).fit(xb.astype(np.float32)).labels_
out["blobs_idec"] = DEC(n_clusters=4, hidden_dims=(32, 16, 4), pretrain_epochs=15, pretrain_lr=0.1, batch_size=64, update_interval=10, precision="fp32", variant="idec", init="kmeans", random_state=2).fit(xb.astype(np.float32)).labels_
np.savez(sys.argv[1], **out)
if len(sys.argv) > 2:
    before = np.load(sys.argv[2])
    for k in out: print(k, "same" if np.array_equal(before[k], out[k]) else "DIFFERENT")
