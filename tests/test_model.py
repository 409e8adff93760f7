"""The model: config validation, invariants (padding, species token, frozen knowledge), heads, round trips,
and the knowledge-table reader/writer it depends on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dist_helpers.synthetic import FakeReference, make_knowledge
from safetensors.torch import load_file

from genecompass.errors import FormatError, InputError, ReferenceMismatchError
from genecompass.knowledge import (
    KNOWLEDGE_TABLES,
    MANIFEST_NAME,
    load_knowledge,
    read_manifest,
    write_knowledge_table,
)
from genecompass.model import (
    IGNORE_INDEX,
    MODEL_PRESETS,
    GeneCompassConfig,
    GeneCompassForCellClassification,
    GeneCompassForGeneClassification,
    GeneCompassForPretraining,
    GeneCompassModel,
    parameter_counts,
)

REF = FakeReference()
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_config(knowledge_dir=None, **overrides) -> GeneCompassConfig:
    fields: dict = dict(vocab_size=REF.vocab_size, reference_hash=REF.hash, **NO_DROPOUT)
    if knowledge_dir is not None:
        manifest = read_manifest(knowledge_dir)
        tables = [t for t in KNOWLEDGE_TABLES if t in manifest["tables"]]
        fields.update(
            knowledge_tables=tables,
            knowledge_dims={t: manifest["tables"][t]["dim"] for t in tables},
            knowledge_sha256={t: manifest["tables"][t]["sha256"] for t in tables},
            knowledge_dir=str(knowledge_dir),
        )
    return GeneCompassConfig.from_preset("tiny", **{**fields, **overrides})


def random_cells(n_cells=4, length=12, seed=0, pad_from=None):
    """A batch: species token at position 0, distinct genes after it, values descending; optional padding."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_cells, length), np.int64)
    values = np.zeros((n_cells, length), np.float32)
    for row in range(n_cells):
        species = "mouse" if row % 2 else "human"
        ids[row, 0] = REF.species_token_ids[species]
        genes = rng.choice(REF.species_tokens(species), size=length - 1, replace=False)
        ids[row, 1:] = genes
        values[row, 1:] = np.sort(rng.random(length - 1) * 5)[::-1]
    ids, values = torch.as_tensor(ids), torch.as_tensor(values)
    if pad_from is not None:
        for row, start in enumerate(pad_from):
            ids[row, start:] = REF.pad_id
            values[row, start:] = 0.0
    return ids, values


def mask_some(ids, values, every=3):
    labels = torch.full_like(ids, IGNORE_INDEX)
    value_labels = torch.zeros_like(values)
    masked_ids, masked_values = ids.clone(), values.clone()
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, 1::every] = True
    positions &= ids != REF.pad_id
    labels[positions] = ids[positions]
    value_labels[positions] = values[positions]
    masked_ids[positions] = REF.mask_id
    masked_values[positions] = -1.0
    return masked_ids, masked_values, labels, value_labels


@pytest.fixture(scope="module")
def knowledge_dir(tmp_path_factory):
    return make_knowledge(tmp_path_factory.mktemp("knowledge"), REF)


# ---------------------------------------------------------------------------------------------- config


def test_presets_have_the_documented_sizes():
    assert MODEL_PRESETS["tiny"] == dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=513,
    )
    small = GeneCompassConfig.from_preset("small", vocab_size=100)
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads) == (6, 256, 4)
    assert small.max_position_embeddings == 2049  # 2048 genes + the species token
    base = GeneCompassConfig.from_preset("base", vocab_size=100)
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (
        12,
        768,
        12,
        3072,
    )
    assert (base.id_loss_weight, base.value_loss_weight, base.mask_value) == (0.2, 0.8, -1.0)
    with pytest.raises(InputError, match="unknown model preset"):
        GeneCompassConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=65), "not a multiple"),
        (dict(value_encoding="binned"), "value_encoding"),
        (dict(cell_embedding="cls"), "cell_embedding"),
        (dict(knowledge_tables=["pathways"], knowledge_dims={"pathways": 4}), "unknown knowledge tables"),
        (dict(knowledge_tables=["grn"]), "no positive width"),
        (dict(mask_token_id=0), "collide"),
        (dict(vocab_size=3), "inside the vocabulary"),
        (dict(num_hidden_layers=0), "positive integer"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(id_loss_weight=0.0, value_loss_weight=0.0), "loss weights"),
    ],
)
def test_config_validation_names_the_problem(overrides, message):
    with pytest.raises(InputError, match=message):
        GeneCompassConfig.from_preset("tiny", **{"vocab_size": 50, **overrides})


def test_config_round_trips_through_json(tmp_path, knowledge_dir):
    config = tiny_config(knowledge_dir, cell_embedding="mean", value_encoding="scalar")
    config.save_pretrained(tmp_path)
    loaded = GeneCompassConfig.from_pretrained(tmp_path)
    for key in (
        "knowledge_tables",
        "knowledge_dims",
        "knowledge_sha256",
        "species_token_ids",
        "cell_embedding",
        "value_encoding",
        "reference_hash",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert getattr(loaded, key) == getattr(config, key), key


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("value_encoding", ["mlp", "scalar"])
def test_extra_padding_does_not_change_real_tokens(value_encoding, knowledge_dir):
    torch.manual_seed(0)
    model = GeneCompassModel(tiny_config(knowledge_dir, value_encoding=value_encoding))
    model.load_knowledge()
    model.eval()
    ids, values = random_cells(n_cells=3, length=10, pad_from=[10, 7, 4])
    padded_ids = torch.cat([ids, torch.full((3, 6), REF.pad_id)], dim=1)
    padded_values = torch.cat([values, torch.zeros(3, 6)], dim=1)
    with torch.no_grad():
        short = model(ids, values)
        long = model(padded_ids, padded_values)
        mask = short.attention_mask
        assert torch.allclose(short.last_hidden_state[mask], long.last_hidden_state[:, :10][mask], atol=1e-5)
        for method in ("species", "mean"):
            assert torch.allclose(
                model.get_cell_embeddings(ids, values, method=method),
                model.get_cell_embeddings(padded_ids, padded_values, method=method),
                atol=1e-5,
            )


def test_species_token_takes_the_full_embedding_path(knowledge_dir):
    """The species token gets its own ID embedding, the position embedding of position 0, LayerNorm and
    dropout like every gene (original bug #9), and no knowledge."""
    torch.manual_seed(0)
    model = GeneCompassModel(tiny_config(knowledge_dir))
    model.load_knowledge()
    model.eval()
    for table in model.config.knowledge_tables:
        rows = model.embeddings.knowledge(table)[[REF.pad_id, REF.mask_id, *REF.species_token_ids.values()]]
        assert torch.count_nonzero(rows) == 0
    ids, values = random_cells(n_cells=2)
    with torch.no_grad():
        before = model(ids, values).last_hidden_state[:, 0].clone()
        model.embeddings.position_embeddings.weight[0] += 1.0
        after = model(ids, values).last_hidden_state[:, 0]
    assert not torch.allclose(before, after)
    human, mouse = before  # rows 0 and 1 carry different species tokens
    assert not torch.allclose(human, mouse)


def test_value_encoder_clamps_and_learns_a_mask_vector():
    torch.manual_seed(0)
    model = GeneCompassModel(tiny_config())
    encoder = model.embeddings.value_encoder
    clamp = model.config.value_clamp_max
    with torch.no_grad():
        out = encoder(torch.tensor([[clamp, clamp * 1000.0, -1.0, 0.5]]))
    assert torch.equal(out[0, 0], out[0, 1])  # in-silico overexpression cannot leave the value range
    assert torch.equal(out[0, 2], encoder.mask_embedding)  # the sentinel is not read as an expression level
    assert not torch.equal(out[0, 3], out[0, 0])


def test_knowledge_is_frozen_and_never_saved(tmp_path, knowledge_dir):
    torch.manual_seed(0)
    model = GeneCompassForPretraining(tiny_config(knowledge_dir))
    model.load_knowledge()
    tables = {t: model.genecompass.embeddings.knowledge(t).clone() for t in model.config.knowledge_tables}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = mask_some(*random_cells())
    output = model(*batch[:2], labels=batch[2], value_labels=batch[3])
    output.loss.backward()
    for table in tables:
        assert model.genecompass.embeddings.knowledge(table).grad is None
        assert model.genecompass.embeddings.knowledge_projections[table].weight.grad is not None
    optimizer.step()
    for table, before in tables.items():
        assert torch.equal(model.genecompass.embeddings.knowledge(table), before)

    buffers = {f"genecompass.embeddings.knowledge_{t}" for t in tables}
    assert buffers <= {name for name, _ in model.named_buffers()}
    assert not buffers & set(model.state_dict())
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not buffers & set(saved)
    assert len(saved) == len(model.state_dict()) - 1  # all but the tied decoder weight
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == read_manifest(knowledge_dir)
    assert parameter_counts(model)["frozen"] == sum(
        REF.vocab_size * d for d in model.config.knowledge_dims.values()
    )


def test_save_then_load_gives_identical_outputs(tmp_path, knowledge_dir):
    torch.manual_seed(0)
    model = GeneCompassForPretraining(tiny_config(knowledge_dir))
    model.load_knowledge()
    model.eval()
    batch = mask_some(*random_cells(seed=3))
    with torch.no_grad():
        before = model(*batch[:2], labels=batch[2], value_labels=batch[3])
    model.save_pretrained(tmp_path / "model")
    loaded = GeneCompassForPretraining.from_pretrained(tmp_path / "model", reference_hash=REF.hash)
    loaded.eval()
    assert loaded.id_decoder.weight is loaded.genecompass.embeddings.gene_embeddings.weight  # still tied
    with torch.no_grad():
        after = loaded(*batch[:2], labels=batch[2], value_labels=batch[3])
    assert torch.equal(before.id_logits, after.id_logits)
    assert torch.equal(before.last_hidden_state, after.last_hidden_state)
    assert before.loss.item() == after.loss.item()

    # The bare encoder (what `gc embed` loads) and a fine-tuning head see the same weights.
    encoder = GeneCompassModel.from_pretrained(tmp_path / "model")
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(*batch[:2]).last_hidden_state, before.last_hidden_state)
    classifier = GeneCompassForCellClassification.from_pretrained(tmp_path / "model", num_labels=3)
    classifier.eval()
    with torch.no_grad():
        cells = classifier(*batch[:2]).embeddings
    assert classifier.config.cell_embedding == "mean"  # the default: the mean of the gene positions
    gene_states = before.last_hidden_state[:, 1:]
    torch.testing.assert_close(cells, gene_states.mean(1))  # this batch has no padding

    with pytest.raises(ReferenceMismatchError):
        GeneCompassForPretraining.from_pretrained(tmp_path / "model", reference_hash="another-reference")


def test_loading_refuses_missing_or_different_knowledge(tmp_path, knowledge_dir):
    torch.manual_seed(0)
    model = GeneCompassForPretraining(tiny_config(knowledge_dir))
    model.save_pretrained(tmp_path / "model")
    other = make_knowledge(tmp_path / "other_knowledge", REF, seed=1)  # same shapes, other vectors
    with pytest.raises(ReferenceMismatchError, match="differs from the one the model was trained with"):
        GeneCompassForPretraining.from_pretrained(tmp_path / "model", knowledge_dir=other)
    config = tiny_config(knowledge_dir)
    config.knowledge_dir = None  # e.g. a model trained elsewhere
    GeneCompassForPretraining(config).save_pretrained(tmp_path / "no_dir")
    with pytest.raises(FormatError, match="pass knowledge_dir"):
        GeneCompassForPretraining.from_pretrained(tmp_path / "no_dir")
    unattached = GeneCompassModel(tiny_config(knowledge_dir))
    with pytest.raises(FormatError, match="none are attached"):
        unattached(*random_cells())


# ---------------------------------------------------------------------------------------------- heads


def test_pretraining_logits_exist_only_at_masked_positions():
    torch.manual_seed(0)
    model = GeneCompassForPretraining(tiny_config())
    ids, values, labels, value_labels = mask_some(*random_cells(pad_from=[12, 9, 12, 5]))
    output = model(ids, values, labels=labels, value_labels=value_labels)
    n_masked = int((labels != IGNORE_INDEX).sum())
    assert output.n_masked == n_masked
    assert output.id_logits.shape == (n_masked, REF.vocab_size)
    assert output.value_predictions.shape == (n_masked,)
    assert torch.equal(output.masked_positions, (labels != IGNORE_INDEX).nonzero())
    where = labels != IGNORE_INDEX
    id_loss = torch.nn.functional.cross_entropy(output.id_logits, labels[where])
    value_loss = torch.nn.functional.mse_loss(output.value_predictions, value_labels[where])
    assert torch.allclose(output.id_loss, id_loss)
    assert torch.allclose(output.value_loss, value_loss)
    assert torch.allclose(output.loss, 0.2 * id_loss + 0.8 * value_loss)
    # num_items_in_batch replaces the local count as the denominator (the trainer's global count).
    scaled = model(ids, values, labels=labels, value_labels=value_labels, num_items_in_batch=2 * n_masked)
    assert torch.allclose(scaled.loss, output.loss / 2)
    # No labels: no logits at all.
    assert model(ids, values).id_logits is None


def test_gene_classification_ignores_unlabelled_positions():
    torch.manual_seed(0)
    model = GeneCompassForGeneClassification(tiny_config(num_labels=3))
    ids, values = random_cells()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 2] = torch.tensor([0, 1, 2, 1])
    output = model(ids, values, labels=labels)
    assert output.logits.shape == (4, 12, 3)
    expected = torch.nn.functional.cross_entropy(output.logits[:, 2], labels[:, 2])
    assert torch.allclose(output.loss, expected)


def test_cell_classification_uses_the_configured_cell_embedding():
    torch.manual_seed(0)
    model = GeneCompassForCellClassification(tiny_config(num_labels=2, cell_embedding="mean"))
    model.eval()
    ids, values = random_cells(pad_from=[12, 6, 12, 8])
    output = model(ids, values, labels=torch.tensor([0, 1, 1, 0]))
    hidden = model.genecompass(ids, values).last_hidden_state
    assert torch.allclose(output.embeddings[1], hidden[1, 1:6].mean(0), atol=1e-6)
    assert output.logits.shape == (4, 2) and output.loss.ndim == 0


def test_parameter_counts_add_up(knowledge_dir):
    model = GeneCompassForPretraining(tiny_config(knowledge_dir))
    counts = parameter_counts(model)
    assert sum(v for k, v in counts["by_component"].items() if "frozen" not in k) == counts["trainable"]
    assert counts["trainable"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["trainable"] + counts["frozen"]


# ------------------------------------------------------------------------------------------ knowledge files


def test_knowledge_tables_round_trip(tmp_path):
    embedding = np.arange(REF.vocab_size * 3, dtype=np.float32).reshape(REF.vocab_size, 3)
    covered = np.ones(REF.vocab_size, bool)
    covered[:10] = False
    write_knowledge_table(
        tmp_path, "grn", embedding, covered, source="test", description="d", reference_hash=REF.hash
    )
    write_knowledge_table(
        tmp_path, "promoter", embedding[:, :2], covered, source="t", description="d", reference_hash=REF.hash
    )
    manifest = read_manifest(tmp_path)
    assert manifest["format"] == "gc-knowledge" and manifest["format_version"] == 1
    assert manifest["tables"]["grn"]["n_covered"] == REF.vocab_size - 10
    assert manifest["tables"]["promoter"]["dim"] == 2
    tables = load_knowledge(tmp_path, REF.hash)
    assert list(tables) == ["grn", "promoter"]
    grn, grn_covered = tables["grn"]
    assert torch.equal(grn_covered, torch.as_tensor(covered))
    assert torch.count_nonzero(grn[:10]) == 0  # rows not covered are stored as zeros
    assert torch.equal(grn[10:], torch.as_tensor(embedding[10:]))
    assert list(load_knowledge(tmp_path, REF.hash, ["promoter"])) == ["promoter"]


def test_knowledge_loader_names_the_bad_file(tmp_path):
    make_knowledge(tmp_path, REF, dims={"grn": 4})
    with pytest.raises(ReferenceMismatchError, match="knowledge built for reference"):
        load_knowledge(tmp_path, "another-reference")
    with pytest.raises(ReferenceMismatchError, match="fresh knowledge directory"):
        write_knowledge_table(
            tmp_path,
            "promoter",
            np.zeros((REF.vocab_size, 2)),
            np.ones(REF.vocab_size, bool),
            source="t",
            description="d",
            reference_hash="another-reference",
        )
    with pytest.raises(FormatError, match="no table 'promoter'"):
        load_knowledge(tmp_path, REF.hash, ["promoter"])
    with pytest.raises(InputError, match="unknown knowledge table"):
        write_knowledge_table(
            tmp_path,
            "pathways",
            np.zeros((4, 2)),
            np.ones(4, bool),
            source="t",
            description="d",
            reference_hash=REF.hash,
        )
    table = tmp_path / "grn.safetensors"
    payload = bytearray(table.read_bytes())
    payload[-1] ^= 0xFF
    table.write_bytes(bytes(payload))
    with pytest.raises(FormatError, match="grn.safetensors: sha256"):
        load_knowledge(tmp_path, REF.hash)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    manifest["format_version"] = 2
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="version 2 is not supported"):
        load_knowledge(tmp_path, REF.hash)
