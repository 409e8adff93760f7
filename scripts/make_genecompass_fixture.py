"""Build the GeneCompass parity fixture with the ORIGINAL GeneCompass code.

The fixture (``tests/data/genecompass_fixture/``) lets gc's tests compare gc's tokeniser, model and
checkpoint exporter against what the original code (https://github.com/xCompass-AI/GeneCompass, commit
8323757) does, without needing the original code or its old dependencies at test time. Its layout is
described in ``tests/data/genecompass_fixture/README.md``; ``manifest.json`` records seeds, shapes, versions
and sha256s.

Side environment (the original needs transformers 4.30; never install it into gc's own ``.venv``)
-----------------------------------------------------------------------------------------------
The script runs on gc's ``.venv`` Python (it has torch, numpy, pandas, anndata, h5py) with an overlay
directory on ``PYTHONPATH`` that shadows gc's transformers 5 with 4.30.2 and adds scanpy (the original
preprocessing calls ``sc.pp.log1p``)::

    python3 -m pip install --no-deps --target /tmp/tf430 \\
        transformers==4.30.2 huggingface_hub==0.16.4 tokenizers==0.13.3 \\
        requests urllib3 certifi charset-normalizer idna scanpy seaborn
    mkdir -p /tmp/gc_original
    git -C /work/.mirror/xCompass-AI+GeneCompass/repo archive 8323757 genecompass preprocess pretraining \\
        | tar -x -C /tmp/gc_original

(``tokenizers==0.13.3`` is there because transformers 4.30 refuses to import next to a newer tokenizers.)
The fixture in the repository was made with torch 2.15.0, numpy 2.4.6, anndata 0.12.19, scanpy 1.11.5,
h5py from gc's ``.venv``; ``manifest.json`` has the exact versions.

Regenerate the fixture (byte-identical on the same versions)::

    PYTHONPATH=/tmp/tf430 .venv/bin/python scripts/make_genecompass_fixture.py --original /tmp/gc_original

Check a checkpoint written by gc's exporter (an HF folder: config.json + pytorch_model.bin) with the
original code: prints key/shape differences and the max abs difference of its outputs on the fixture's
cells; exit status 1 if anything differs by more than ``--atol``::

    PYTHONPATH=/tmp/tf430 .venv/bin/python scripts/make_genecompass_fixture.py --original /tmp/gc_original \\
        --check-export DIR

How the original code is loaded (its files are not modified)
------------------------------------------------------------
* ``genecompass/__init__.py`` imports ``pretrainer.py``, which unpickles an LFS token dictionary at import
  time (the public repo only has LFS pointers). So the package ``__init__`` is NOT run: an empty module
  ``genecompass_original`` with ``__path__`` = the original's ``genecompass/`` folder is put into
  ``sys.modules`` and only ``output``, ``knowledge_embeddings``, ``modeling_bert`` and ``utils`` are imported
  from it (``modeling_bert`` does ``from . import MaskedLMOutputBoth``, so that name is set on the stub
  package, as the original ``__init__`` does). The stub is not called ``genecompass`` because that is gc's
  own package name.
* ``preprocess/preprocess.py`` runs a whole pipeline at module level with hard-coded paths. Only the
  definitions of ``id_token_match``, ``Normalized``, ``log1p``, ``tokenize_cell`` and ``rank_value`` are
  taken from it (with ``ast``) and executed in a namespace holding ``np``, ``pickle``, ``sc`` (scanpy),
  ``token_dict`` (the global that ``id_token_match`` reads) and a ``tqdm`` whose ``tqdm`` is the identity
  (no progress bar). The module-level lines that drop unknown genes
  (``adata.var.index = id_token_match(...)``; ``adata = adata[:, ~(adata.var.index == "delete")]``) are
  repeated here literally. The cell QC steps before them (z-score / gene-number filters) are not part of the
  fixture: it covers steps 5-9 of the original preprocessing (drop genes without a token, divide by the
  gene's non-zero median, log1p base 2, rank, truncate at 2048). As in the original, the counts are a dense
  matrix (the original builds its AnnData from a CSV).

What is made
------------
Real counts: 8 PBMC3k cells (one per cell type) from ``data/pbmc3k.h5ad`` and 8 spots from
``data/mouse_visium_100genes.h5``. A token dictionary of 200 human genes (expressed in those cells, plus the
human one-to-one orthologs, from gc's ``orthologs.tsv.gz``, of the mouse file's genes) and 92 of the mouse
file's 100 genes (8 are left out so that dropping unknown genes is exercised for mouse too), token ids
shuffled. The four prior-knowledge tables are random (seeded) vectors in the original's pickle formats, and
the original ``utils.load_prior_embedding`` turns them into the knowledge tensors. A small
``BertForMaskedLM`` is built exactly as ``pretraining/pretrain_genecompass_w_human_mouse_base.py`` does
(``torch.manual_seed(42)``), every trainable parameter then gets seeded noise (so biases and LayerNorms
are not 0/1 and a wrong key mapping cannot pass), it is saved with ``save_pretrained`` and run one cell at a
time in eval mode.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import io
import json
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "genecompass_fixture"
PBMC = REPO / "data" / "pbmc3k.h5ad"
MOUSE_H5 = REPO / "data" / "mouse_visium_100genes.h5"
ORTHOLOGS = REPO / "genecompass" / "reference_data" / "orthologs.tsv.gz"

ORIGINAL_COMMIT = "8323757"
PKG = "genecompass_original"  # stub package name for the original's genecompass/ folder
SEED = 20240715  # numpy: data selection, knowledge vectors, medians, token shuffle
TORCH_SEED = 42  # the pretraining script's default --seed_val
NOISE_SEED = 7  # torch generator for the parameter noise
NOISE_STD = 0.05
N_HUMAN_GENES = 200
N_MOUSE_LEFT_OUT = 8  # mouse file genes without a token
N_CELLS = 8
KNOWLEDGE_DIM = 16
N_NO_MEDIAN = {"human": 3, "mouse": 2}  # dictionary genes left out of medians.pickle (median 1)
MAX_LEN = 2048
PICKLE_PROTOCOL = 4

TINY_CONFIG = {  # the pretraining script's config dict with small shapes
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "attention_probs_dropout_prob": 0.02,
    "hidden_dropout_prob": 0.02,
    "intermediate_size": 64,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 4,
    "use_values": True,
    "use_promoter": True,
    "use_co_exp": True,
    "use_gene_family": True,
    "use_peca_grn": True,
    "warmup_steps": 10000,  # the pretraining script's defaults
    "emb_warmup_steps": 10000,
    "use_cls_token": True,
}
# GeneCompass-Small (6 layers, README) and Base (the pretraining script); vocab size from the notebook
PUBLISHED = {
    "small": {"num_hidden_layers": 6},
    "base": {"num_hidden_layers": 12},
}
PUBLISHED_WIDTHS = {
    "hidden_size": 768,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 2048,
    "vocab_size": 50558,
    "pad_token_id": 0,
}
PUBLISHED_KNOWLEDGE_DIM = 768
KNOWLEDGES = ("promoter", "co_exp", "gene_family", "peca_grn")

# file names of the prior-knowledge inputs (the original's folder layout, small files)
PRIOR_FILES = {
    ("promoter", "human"): "prior_knowledge/promoter_emb/human_emb.pickle",
    ("promoter", "mouse"): "prior_knowledge/promoter_emb/mouse_emb.pickle",
    ("co_exp", "human"): "prior_knowledge/gene_co_express_emb/Human_gene.pickle",
    ("co_exp", "mouse"): "prior_knowledge/gene_co_express_emb/Mouse_gene.pickle",
    ("gene_family", "human"): "prior_knowledge/gene_family/Human_gene.pickle",
    ("gene_family", "mouse"): "prior_knowledge/gene_family/Mouse_gene.pickle",
    ("peca_grn", "human"): "prior_knowledge/PECA2vec/human_PECA_vec.pickle",
    ("peca_grn", "mouse"): "prior_knowledge/PECA2vec/mouse_PECA_vec.pickle",
}
ID2NAME_FILE = "prior_knowledge/gene_list/Gene_id_name_dict_human_mouse.pickle"


# --------------------------------------------------------------------------- loading the original


def load_original(original: Path) -> types.SimpleNamespace:
    """Import the original's model modules (not its __init__) and its preprocessing functions."""
    import transformers

    if transformers.__version__ != "4.30.2":
        sys.exit(f"needs transformers 4.30.2 (found {transformers.__version__}): see the docstring")
    pkg_dir = original / "genecompass"
    if not (pkg_dir / "modeling_bert.py").is_file():
        sys.exit(f"{pkg_dir}/modeling_bert.py not found: --original must be a checkout of the original repo")
    pkg = types.ModuleType(PKG)
    pkg.__path__ = [str(pkg_dir)]
    sys.modules[PKG] = pkg
    output = importlib.import_module(f"{PKG}.output")
    pkg.MaskedLMOutputBoth = output.MaskedLMOutputBoth  # what the original __init__ exports
    modeling_bert = importlib.import_module(f"{PKG}.modeling_bert")
    utils = importlib.import_module(f"{PKG}.utils")

    import scanpy

    path = original / "preprocess" / "preprocess.py"
    wanted = {"id_token_match", "Normalized", "log1p", "tokenize_cell", "rank_value"}
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {d.name for d in defs} == wanted, "preprocess.py changed"
    namespace = {
        "np": np,
        "pickle": pickle,
        "sc": scanpy,
        "tqdm": types.SimpleNamespace(tqdm=lambda it: it),
        "token_dict": None,  # set per run: id_token_match reads this global
    }
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), namespace)
    return types.SimpleNamespace(
        BertForMaskedLM=modeling_bert.BertForMaskedLM,
        load_prior_embedding=utils.load_prior_embedding,
        preprocess=namespace,
        versions={
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scanpy": scanpy.__version__,
            "anndata": anndata.__version__,
            "h5py": h5py.__version__,
            "python": sys.version.split()[0],
        },
    )


# --------------------------------------------------------------------------- small helpers


def dump_pickle(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=PICKLE_PROTOCOL)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without timestamps: a stored (uncompressed) zip with a fixed date, readable by np.load."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_10x_h5(path: Path) -> anndata.AnnData:
    """A 10x HDF5 (matrix/ group, genes × barcodes CSC) as cells × genes CSR counts."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_genes, n_cells = (int(x) for x in m["shape"][:])
        x = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_cells))
        ids = [s.decode() for s in m["features/id"][:]]
        names = [s.decode() for s in m["features/name"][:]]
        barcodes = [s.decode() for s in m["barcodes"][:]]
    var = pd.DataFrame({"gene_symbols": names}, index=pd.Index(ids, name="gene_id"))
    obs = pd.DataFrame(index=pd.Index(barcodes, name="barcode"))
    return anndata.AnnData(X=sp.csr_matrix(x.T), obs=obs, var=var)


# --------------------------------------------------------------------------- inputs


def make_inputs(out: Path, rng: np.random.Generator) -> dict:
    """Counts, token dictionary, homolog map, medians and prior-knowledge pickles; returns a summary."""
    pbmc = anndata.read_h5ad(PBMC)
    mouse = read_10x_h5(MOUSE_H5)
    orth = pd.read_csv(ORTHOLOGS, sep="\t")

    # cells: one PBMC3k cell per cell type; 8 mouse spots among those with >= 20 non-zero genes
    human_cells = [
        int(rng.choice(np.flatnonzero((pbmc.obs["cell_type"] == t).to_numpy())))
        for t in sorted(pbmc.obs["cell_type"].cat.categories)
    ]
    assert len(human_cells) == N_CELLS
    mouse_nnz = np.diff(mouse.X.indptr)
    mouse_cells = sorted(int(i) for i in rng.choice(np.flatnonzero(mouse_nnz >= 20), N_CELLS, replace=False))

    # genes: mouse = the file's genes minus a few; human = one-to-one orthologs of them that PBMC3k has,
    # plus genes expressed in the chosen cells
    mouse_all = list(mouse.var_names)
    left_out = set(rng.choice(mouse_all, N_MOUSE_LEFT_OUT, replace=False).tolist())
    mouse_genes = sorted(g for g in mouse_all if g not in left_out)
    pairs = orth[orth["mouse_gene_id"].isin(mouse_all) & orth["human_gene_id"].isin(pbmc.var_names)]
    assert pairs["mouse_gene_id"].is_unique and pairs["human_gene_id"].is_unique
    ortholog_humans = sorted(pairs["human_gene_id"])
    x_cells = pbmc.X[human_cells]
    expressed = pbmc.var_names[np.flatnonzero(np.asarray((x_cells > 0).sum(axis=0)).ravel())]
    pool = sorted(set(expressed) - set(ortholog_humans))
    extra = rng.choice(pool, N_HUMAN_GENES - len(ortholog_humans), replace=False).tolist()
    human_genes = sorted(set(ortholog_humans) | set(extra))

    # token dictionary: <pad> 0, <mask> 1, genes shuffled
    genes = human_genes + mouse_genes
    order = rng.permutation(len(genes))
    token_dict = {"<pad>": 0, "<mask>": 1}
    for i, j in enumerate(order):
        token_dict[genes[j]] = i + 2
    dump_pickle(token_dict, out / "token_dict.pickle")

    # homologs: {human_token: mouse_token} (load_prior_embedding inverts it)
    pairs_in = pairs[pairs["mouse_gene_id"].isin(mouse_genes)].sort_values("human_gene_id")
    homologous = {
        token_dict[h]: token_dict[m] for h, m in zip(pairs_in["human_gene_id"], pairs_in["mouse_gene_id"])
    }
    dump_pickle(homologous, out / "homologous_hm_token.pickle")

    # raw counts: human keeps the genes with a count in these cells plus all dictionary genes (most of
    # those genes have no token); mouse keeps all 100 genes (8 without a token)
    position = {g: i for i, g in enumerate(pbmc.var_names)}
    keep = sorted(set(expressed) | set(human_genes), key=position.__getitem__)
    human = pbmc[human_cells, keep].copy()
    human.uns = {}
    human.write_h5ad(out / "human.h5ad", compression="gzip")
    mouse_sub = mouse[mouse_cells].copy()
    mouse_sub.write_h5ad(out / "mouse.h5ad", compression="gzip")

    # id -> symbol (both species in one dict, as the original's Gene_id_name_dict_human_mouse)
    symbol = dict(zip(pbmc.var_names, pbmc.var["gene_symbols"]))
    symbol.update(zip(mouse.var_names, mouse.var["gene_symbols"]))
    id2name = {g: symbol[g] for g in genes}
    dump_pickle(id2name, out / ID2NAME_FILE)

    # knowledge tables: symbol -> vector per species; they hold more genes than the vocabulary (the
    # mouse genes without a token and 10 human genes without one), as the real tables do. promoter,
    # co-expression and gene family are float32 (the original stacks them unconverted), PECA float64
    # (the original casts it to float32)
    decoys = {
        "human": sorted(rng.choice(sorted(set(keep) - set(human_genes)), 10, replace=False).tolist()),
        "mouse": sorted(left_out),
    }
    per_species = {"human": human_genes, "mouse": mouse_genes}
    for (kind, species), rel in PRIOR_FILES.items():
        names = sorted(symbol[g] for g in per_species[species] + decoys[species])
        dtype = np.float64 if kind == "peca_grn" else np.float32
        table = {n: rng.standard_normal(KNOWLEDGE_DIM).astype(dtype) for n in names}
        dump_pickle(table, out / rel)

    # non-zero medians: uniform in [0.3, 4.0]; a few dictionary genes with counts in these cells are left
    # out (the original then divides by 1). Two of those with the same count in one cell would tie, so a
    # candidate is skipped when it would
    counts = {"human": human[:, human_genes], "mouse": mouse_sub[:, mouse_genes]}
    no_median = []
    for species, n in N_NO_MEDIAN.items():
        x = counts[species].X.toarray()
        chosen: list[int] = []
        for j in rng.permutation(x.shape[1]):
            c = x[:, j]
            if c.any() and not any(((c == x[:, k]) & (c > 0)).any() for k in chosen):
                chosen.append(int(j))
            if len(chosen) == n:
                break
        no_median += sorted(counts[species].var_names[chosen])
    medians = {g: float(rng.uniform(0.3, 4.0)) for g in genes if g not in no_median}
    dump_pickle(medians, out / "medians.pickle")

    return {
        "token_dict": token_dict,
        "homologous": homologous,
        "human_cells": [str(b) for b in pbmc.obs_names[human_cells]],
        "human_cell_types": [str(t) for t in pbmc.obs["cell_type"].iloc[human_cells]],
        "mouse_cells": [str(b) for b in mouse.obs_names[mouse_cells]],
        "human_genes": human_genes,
        "mouse_genes": mouse_genes,
        "mouse_genes_without_token": sorted(left_out),
        "genes_without_median": no_median,
        "knowledge_decoy_genes": decoys,
        "human_h5ad_genes": len(keep),
    }


# --------------------------------------------------------------------------- original preprocessing


def tokenize_file(orig, path: Path, token_dict: dict, medians_path: Path) -> list[tuple]:
    """The original's steps 5-9 on one raw count file: [(input_ids int64, values float64)] per cell."""
    pp = orig.preprocess
    pp["token_dict"] = token_dict
    raw = anndata.read_h5ad(path)
    x = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    adata = anndata.AnnData(X=x, obs=raw.obs.copy(), var=raw.var.copy())  # dense, as in the original

    # the original's module-level lines ("4#.filter cells by gene token")
    gene_id_name_m = pp["id_token_match"](name_list=adata.var.index.to_list())
    adata.var["gene_symbols"] = adata.var.index
    adata.var.index = gene_id_name_m
    adata = adata[:, ~(adata.var.index == "delete")].copy()

    adata = pp["Normalized"](adata, str(medians_path), Parmerters=1e4)
    adata = pp["log1p"](adata)
    input_ids, length, values = pp["rank_value"](adata, token_dict)
    cells = []
    for i, n in enumerate(length):
        ids = input_ids[i, :n]
        assert np.array_equal(ids, np.round(ids)) and n <= MAX_LEN
        cells.append((ids.astype(np.int64), values[i, :n].astype(np.float64)))

    # no ties among a cell's kept values: numpy's argsort order of ties is unspecified (gc breaks them by
    # token id), so a tie would make the expected order ambiguous
    xn = np.asarray(adata.X)
    for i in range(xn.shape[0]):
        v = xn[i][xn[i] != 0]
        assert np.unique(v).size == v.size, f"{path.name}: cell {i} has tied values"
    return cells


# --------------------------------------------------------------------------- model


def knowledges_from_files(orig, out: Path) -> dict:
    """The original's load_prior_embedding on the fixture's pickles, in the pretraining script's dict."""
    res = orig.load_prior_embedding(
        name2promoter_human_path=out / PRIOR_FILES["promoter", "human"],
        name2promoter_mouse_path=out / PRIOR_FILES["promoter", "mouse"],
        name2coexp_human_path=out / PRIOR_FILES["co_exp", "human"],
        name2coexp_mouse_path=out / PRIOR_FILES["co_exp", "mouse"],
        name2family_human_path=out / PRIOR_FILES["gene_family", "human"],
        name2family_mouse_path=out / PRIOR_FILES["gene_family", "mouse"],
        name2peca_human_path=out / PRIOR_FILES["peca_grn", "human"],
        name2peca_mouse_path=out / PRIOR_FILES["peca_grn", "mouse"],
        id2name_human_mouse_path=out / ID2NAME_FILE,
        token_dictionary_or_path=str(out / "token_dict.pickle"),
        homologous_gene_path=out / "homologous_hm_token.pickle",
    )
    return {
        "promoter": res[0],
        "co_exp": res[1],
        "gene_family": res[2],
        "peca_grn": res[3],
        "homologous_gene_human2mouse": res[4],
    }


def knowledges_from_state_dict(sd: dict) -> dict:
    """Knowledges for the original's constructor taken back from a checkpoint's buffers.

    The constructor's 'homologous_gene_human2mouse' is used as given (index -> index, after
    load_prior_embedding's inversion), so the map is read straight off the homologous_index buffer.
    """
    idx = sd["bert.embeddings.homologous_index"]
    moved = torch.nonzero(idx != torch.arange(idx.numel())).ravel().tolist()
    out = {k: sd[f"bert.embeddings.{k}_knowledge"] for k in KNOWLEDGES}
    out["homologous_gene_human2mouse"] = {i: int(idx[i]) for i in moved}
    return out


def build_tiny_model(orig, knowledges: dict, vocab_size: int):
    from transformers import BertConfig

    torch.manual_seed(TORCH_SEED)
    config = BertConfig(**TINY_CONFIG, pad_token_id=0, vocab_size=vocab_size)
    model = orig.BertForMaskedLM(config, knowledges=knowledges)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if name.startswith("emb_warmup."):
                continue  # alpha stays 1 (the warm-up is a no-op in the original), steps a counter
            p.add_(NOISE_STD * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@torch.no_grad()
def run_cells(model, cells: list[tuple[int, np.ndarray, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """Each cell alone (no padding): hidden states, ID logits and value predictions."""
    res = {"last_hidden_state": [], "logits": [], "value_pred": []}
    for species, ids, values in cells:
        input_ids = torch.as_tensor(ids, dtype=torch.long)[None]
        vals = torch.as_tensor(values.astype(np.float32))[None]
        sp_t = torch.tensor([[species]])
        seq = model.bert(input_ids=input_ids, values=vals, species=sp_t).last_hidden_state
        res["last_hidden_state"].append(seq[0].numpy())
        res["logits"].append(model.cls(seq[:, 1:])[0].numpy())
        res["value_pred"].append(model.cls4value(seq[:, 1:]).squeeze(-1)[0].numpy())
    return res


def published_key_lists(orig) -> dict:
    """State-dict names/shapes and config.json of the published Small/Base shapes, built on 'meta'."""
    from transformers import BertConfig

    v, d = PUBLISHED_WIDTHS["vocab_size"], PUBLISHED_KNOWLEDGE_DIM
    res = {}
    for size, extra in PUBLISHED.items():
        with torch.device("meta"):
            knowledges = {k: torch.empty(v, d, dtype=torch.float32) for k in KNOWLEDGES}
            knowledges["homologous_gene_human2mouse"] = {}
            cfg = {**TINY_CONFIG, **PUBLISHED_WIDTHS, **extra}
            model = orig.BertForMaskedLM(BertConfig(**cfg), knowledges=knowledges)
        keys = {k: list(t.shape) for k, t in model.state_dict().items()}
        # what save_pretrained writes into config.json (transformers 4.30 sets these two first)
        model.config.torch_dtype = "float32"
        model.config.architectures = [type(model).__name__]
        res[size] = (keys, model.config.to_json_string())
    return res


# --------------------------------------------------------------------------- fixture reading


def fixture_cells(fx: dict) -> list[tuple[int, np.ndarray, np.ndarray]]:
    off = fx["gene_offsets"]
    return [
        (int(fx["cell_species"][i]), fx["input_ids"][off[i] : off[i + 1]], fx["values"][off[i] : off[i + 1]])
        for i in range(len(off) - 1)
    ]


def compare(fx: dict, res: dict[str, list[np.ndarray]]) -> dict[str, float]:
    return {k: float(np.abs(np.concatenate(res[k]) - fx[k]).max()) for k in res}


def check_export(orig, export_dir: Path, fixture: Path, atol: float) -> int:
    fx = dict(np.load(fixture / "outputs.npz"))
    manifest = json.loads((fixture / "manifest.json").read_text())
    expected = manifest["checkpoint"]["state_dict"]

    if (export_dir / "pytorch_model.bin").is_file():
        sd = torch.load(export_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        from safetensors.torch import load_file

        sd = load_file(export_dir / "model.safetensors")
    ok = True
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(
        f"{k}: {list(sd[k].shape)} {dtype_name(sd[k])} != {e['shape']} {e['dtype']}"
        for k, e in expected.items()
        if k in sd and (list(sd[k].shape) != e["shape"] or dtype_name(sd[k]) != e["dtype"])
    )
    tolerated = orig.BertForMaskedLM._keys_to_ignore_on_load_missing  # from_pretrained hides these
    missing = [
        k + ("  (from_pretrained tolerates it)" if any(re.search(p, k) for p in tolerated) else "")
        for k in missing
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape/dtype", wrong)):
        print(f"{label} keys: {len(items)}")
        for item in items:
            print(f"  {item}")
    ok = not (missing or unexpected or wrong)

    model, info = orig.BertForMaskedLM.from_pretrained(
        export_dir, knowledges=knowledges_from_state_dict(sd), output_loading_info=True
    )
    print("from_pretrained loading info:", {k: v for k, v in info.items() if v})
    model.eval()
    diffs = compare(fx, run_cells(model, fixture_cells(fx)))
    for k, v in diffs.items():
        print(f"max abs diff {k}: {v:.3g}")
        ok = ok and v <= atol
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


# --------------------------------------------------------------------------- main


def make_fixture(orig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    summary = make_inputs(out, rng)
    token_dict = summary["token_dict"]

    # the original's tokenisation of both files
    cells, species, source = [], [], []
    for sp_id, name in ((0, "human"), (1, "mouse")):
        tokenized = tokenize_file(orig, out / f"{name}.h5ad", token_dict, out / "medians.pickle")
        for i, (ids, vals) in enumerate(tokenized):
            cells.append((sp_id, ids, vals))
            species.append(sp_id)
            source.append(i)
    lengths = [len(c[1]) for c in cells]
    print("genes per cell:", lengths)
    print("no ties: within every cell the kept genes' normalised values are all distinct")

    # the model: knowledges built by the original load_prior_embedding, then saved by save_pretrained
    knowledges = knowledges_from_files(orig, out)
    model = build_tiny_model(orig, knowledges, len(token_dict))
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    saved = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert list(saved) == list(model.state_dict()), "save_pretrained wrote other keys than state_dict()"

    res = run_cells(model, cells)
    gene_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    arrays = {
        "cell_species": np.asarray(species, dtype=np.int64),
        "cell_source_index": np.asarray(source, dtype=np.int64),
        "gene_offsets": gene_offsets,
        "hidden_offsets": gene_offsets + np.arange(len(cells) + 1, dtype=np.int64),
        "input_ids": np.concatenate([c[1] for c in cells]),
        "values_f64": np.concatenate([c[2] for c in cells]),
        "values": np.concatenate([c[2] for c in cells]).astype(np.float32),
        **{k: np.concatenate(v).astype(np.float32) for k, v in res.items()},
    }
    save_npz(out / "outputs.npz", arrays)

    # self-check: the full forward gives the same logits (--check-export on the checkpoint runs at the end).
    # return_dict=False: the original's forward without labels fails with return_dict=True ('loss' unbound)
    with torch.no_grad():
        sp_id, ids, vals = cells[0]
        full = model(
            input_ids=torch.as_tensor(ids)[None],
            values=torch.as_tensor(vals.astype(np.float32))[None],
            species=torch.tensor([[sp_id]]),
            return_dict=False,
        )[0][0]
    assert torch.equal(full, torch.as_tensor(res["logits"][0]))

    published = published_key_lists(orig)
    for size, (keys, config_json) in published.items():
        lines = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        (out / f"keys_{size}.json").write_text("{\n" + lines + "\n}\n")
        (out / f"config_{size}.json").write_text(config_json)

    hom_index = saved["bert.embeddings.homologous_index"]
    manifest = {
        "made_by": "scripts/make_genecompass_fixture.py",
        "command": "PYTHONPATH=/tmp/tf430 .venv/bin/python scripts/make_genecompass_fixture.py "
        "--original /tmp/gc_original",
        "original": {"repo": "https://github.com/xCompass-AI/GeneCompass", "commit": ORIGINAL_COMMIT},
        "versions": orig.versions,
        "seeds": {
            "numpy_default_rng": SEED,
            "torch_manual_seed": TORCH_SEED,
            "noise_generator": NOISE_SEED,
            "noise_std": NOISE_STD,
        },
        "sources": {
            "human": "data/pbmc3k.h5ad (one cell per cell type)",
            "mouse": "data/mouse_visium_100genes.h5",
            "orthologs": "genecompass/reference_data/orthologs.tsv.gz",
        },
        "human_cells": dict(zip(summary["human_cells"], summary["human_cell_types"])),
        "mouse_cells": summary["mouse_cells"],
        "vocab_size": len(token_dict),
        "n_human_tokens": len(summary["human_genes"]),
        "n_mouse_tokens": len(summary["mouse_genes"]),
        "human_h5ad_genes": summary["human_h5ad_genes"],
        "mouse_genes_without_token": summary["mouse_genes_without_token"],
        "genes_without_median": summary["genes_without_median"],
        "knowledge_decoy_genes": summary["knowledge_decoy_genes"],
        "homologous_pairs": len(summary["homologous"]),
        "homologous_index_moved": int((hom_index != torch.arange(hom_index.numel())).sum()),
        "knowledge_dim": KNOWLEDGE_DIM,
        "genes_per_cell": lengths,
        "no_value_ties": "checked: within every cell the non-zero normalised log values are all distinct",
        "truncation_exercised": max(lengths) > MAX_LEN,
        "checkpoint": {
            "config": json.loads((ckpt / "config.json").read_text()),
            "state_dict": {k: {"shape": list(t.shape), "dtype": dtype_name(t)} for k, t in saved.items()},
        },
        "output_shapes": {k: list(v.shape) for k, v in sorted(arrays.items())},
        "files": {},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name not in ("manifest.json", "README.md"))
    manifest["files"] = {
        str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    assert check_export(orig, ckpt, out, atol=0.0) == 0
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixture written to {out}: {total:,} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", type=Path, required=True, help="checkout/export of the original repo")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory")
    ap.add_argument("--check-export", type=Path, metavar="DIR", help="check an exported HF folder instead")
    ap.add_argument("--atol", type=float, default=1e-4, help="tolerance for --check-export")
    args = ap.parse_args()
    torch.set_num_threads(1)
    orig = load_original(args.original.resolve())
    if args.check_export:
        sys.exit(check_export(orig, args.check_export, args.out, args.atol))
    make_fixture(orig, args.out)


if __name__ == "__main__":
    main()
