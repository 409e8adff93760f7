# ruff: noqa  (one-off probe kept as run; see bench/RESULTS.md)
# Issue-14 probe, run from the work directory of bench/RESULTS.md's 'Pre-training diagnosis' commands:
#   python layer_probe.py RUN_DIR ...   (needs kang_stim.h5ad / stim.zarr and untrained/ there)
import sys, numpy as np, torch, torch.nn.functional as F
torch.set_num_threads(1)
from genecompass.run import load_run
from genecompass.corpus import Corpus
from genecompass.data import CorpusDataset, MaskingCollator
from genecompass.reference import load_reference
from genecompass.evaluate import knn_cv, _stratified_subsample
ref = load_reference()
held = Corpus.open('stim.zarr'); labels = held.obs_labels('cell_type').astype(str)
rows = _stratified_subsample(labels, 1000, 0); labels = labels[rows]
ds = CorpusDataset(held, 513, species_token_ids=ref.species_token_ids)
items = [ds[int(i)] for i in rows]
col = MaskingCollator(ref)
def knn(x):
    x = x - x.mean(0); return knn_cv(x, labels)["knn_macro_f1"]
# bag of genes baselines from the knowledge tables
run0 = load_run('untrained'); emb = run0.model.embeddings
for table in emb.knowledge_tables:
    K = emb.knowledge(table)
    x = np.stack([K[torch.as_tensor(it["input_ids"][1:])].mean(0).numpy() for it in items])
    print("bag-of-genes knowledge", table, "%.3f" % knn(x), flush=True)
for name in sys.argv[1:]:
    run = load_run(name); m = run.model
    outs = None
    with torch.no_grad():
        for s in range(0, len(items), 50):
            b = col.pad(items[s:s+50])
            o = m(b["input_ids"], b["values"], b["attention_mask"], output_hidden_states=True)
            mask = b["attention_mask"][:, 1:].unsqueeze(-1).float()
            pooled = [((h[:, 1:] * mask).sum(1) / mask.sum(1)).numpy() for h in o.hidden_states]
            gid = (m.embeddings.gene_embeddings(b["input_ids"][:, 1:]) * mask).sum(1) / mask.sum(1)
            pooled.append(gid.numpy())
            outs = pooled if outs is None else [np.concatenate([a, p]) for a, p in zip(outs, pooled)]
    print(name, "mean-pooled (centered) per layer: input %s; gene-ID embeddings only %.3f" % (", ".join("%.3f" % knn(x) for x in outs[:-1]), knn(outs[-1])), flush=True)
