# ruff: noqa  (one-off probe kept as run; see bench/RESULTS.md)
# Issue-14 probe, run from the work directory of bench/RESULTS.md's 'Pre-training diagnosis' commands:
#   python center_probe.py RUN_DIR ...   (needs kang_stim.h5ad / stim.zarr and untrained/ there)
import sys, numpy as np, anndata as ad, torch
torch.set_num_threads(1)
from genecompass.run import load_run
from genecompass.embed import embed, EMBEDDING_KEY
from genecompass.evaluate import knn_cv, mean_pairwise_cosine, _stratified_subsample
from genecompass.benchmark import untrained_copy
a = ad.read_h5ad('kang_stim.h5ad')
rows = _stratified_subsample(a.obs.cell_type.astype(str).to_numpy(), 1000, 0)
a = a[rows].copy()
import scipy.sparse as sp; a.X = sp.csr_matrix(a.X)
labels = a.obs.cell_type.astype(str).to_numpy()
for name, path in [("untrained", "untrained"), ("A", sys.argv[1])]:
    run = load_run(path)
    for pool in ("species", "mean"):
        x = embed(a.copy(), run, pool=pool).obsm[EMBEDDING_KEY].astype(np.float64)
        c = x - x.mean(0)
        z = c / (x.std(0) + 1e-8)
        print(name, pool, "raw %.3f centered %.3f z %.3f cos %.4f" % (knn_cv(x, labels)["knn_macro_f1"], knn_cv(c, labels)["knn_macro_f1"], knn_cv(z, labels)["knn_macro_f1"], mean_pairwise_cosine(x)), flush=True)
