"""A checkpoint's structure is decided from every tensor it implies: a partial expert, head or final norm, or an
override that would leave present weights unused, is refused naming the tensors — never read as another model.
And the published layout read off the module tree is the same at every tensor-parallel degree."""
from __future__ import annotations

import pytest

from _paths import GOLDEN, needs
from engine.models import checkpoint_layout, recognise
from engine.models.inference import ConfigError
from sharding.checkpoint import read_checkpoint
from sharding.weights import select_weights

VLMO = GOLDEN / "tiny_relpos_vqa" / "checkpoint.pt"  # VL experts from layer 2 of 4
BEIT3 = GOLDEN / "beit3" / "tiny_beit3_nlvr2" / "checkpoint.pth"  # ends in a LayerNorm


def _infer(path, drop=(), **overrides):
    ckpt = read_checkpoint(path)
    sd = {k: v for k, v in ckpt.state_dict.items() if k not in drop}
    family = recognise(sd)
    cfg = family.infer_config(sd, ckpt.hyper_parameters, {"num_heads": 4, **overrides})
    return select_weights(sd, cfg)


@needs(VLMO)
def test_the_golden_checkpoint_is_read_whole() -> None:
    weights, unused = _infer(VLMO)
    assert "transformer.blocks.2.mlp_vl.fc1.weight" in weights and "transformer.blocks.1.mlp_vl.fc1.weight" not in weights


@needs(VLMO)
@pytest.mark.parametrize("dropped,named", [
    ("transformer.blocks.2.mlp_vl.fc1.weight", "transformer.blocks.2.mlp_vl.fc1.weight"),  # a partial VL expert
    ("transformer.blocks.3.norm2_vl.bias", "transformer.blocks.3.norm2_vl.bias"),
    ("vqa_classifier.0.weight", "vqa_classifier.0.weight"),  # a partial head
    ("vqa_classifier.3.weight", "vqa_classifier.3.weight"),
    ("transformer.blocks.1.gamma_2", "transformer.blocks.1.gamma_2"),  # a partial layer scale
])
def test_a_partial_part_is_missing_weights_not_another_model(dropped: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        _infer(VLMO, drop=(dropped,))


@needs(VLMO)
def test_an_override_that_would_drop_present_weights_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"transformer\.blocks\.2\.mlp_vl"):
        _infer(VLMO, vlffn_start_layer_index=3)
    with pytest.raises(ConfigError, match="cannot start at layer 9 of a 4-layer"):
        _infer(VLMO, vlffn_start_layer_index=9)


@needs(BEIT3)
def test_a_partial_beit3_final_norm_is_missing_weights() -> None:
    with pytest.raises(ConfigError, match=r"beit3\.encoder\.layer_norm\.A\.weight"):
        _infer(BEIT3, drop=("beit3.encoder.layer_norm.A.weight",))


@needs(VLMO)
@needs(BEIT3)
@pytest.mark.parametrize("path", [VLMO, BEIT3])
@pytest.mark.parametrize("tp", [2, 4])
def test_the_layout_is_the_same_at_every_degree(path, tp: int) -> None:
    ckpt = read_checkpoint(path)
    family = recognise(ckpt.state_dict)
    cfg = family.infer_config(ckpt.state_dict, ckpt.hyper_parameters, {"num_heads": 4})
    one, many = checkpoint_layout(cfg, 1), checkpoint_layout(cfg, tp)
    assert list(one) == list(many)
    assert all(one[k].shape == many[k].shape == tuple(ckpt.state_dict[k].shape) for k in one)
    for name, spec in many.items():
        local = spec.local_shape(tp)
        assert local == spec.shape if spec.split is None else local[spec.split.dim] * tp == spec.shape[spec.split.dim]


@needs(VLMO)
def test_manifests_written_before_families_were_declared_still_load(tmp_path) -> None:
    """Shards of the previous main carry no "family" in their VLMo config; they load as VLMo, unchanged."""
    import json

    from _run import shard_here
    from engine.models.vlmo.config import VLMoConfig
    from engine.runtime.shards import load_rank_shard, read_manifest

    shard_here(VLMO, 1, tmp_path / "shards")
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["config"].pop("family") == "vlmo"
    path.write_text(json.dumps(manifest))
    cfg = read_manifest(tmp_path / "shards").config
    assert isinstance(cfg, VLMoConfig) and cfg.vlffn_start_layer_index == 2
    assert set(load_rank_shard(tmp_path / "shards", 0, 1)) == set(checkpoint_layout(cfg))
