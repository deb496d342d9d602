"""Checkpoint layout: identical keys and shapes to the released CellSAM module tree."""
import pickle

import pytest
import torch
from segment_anything import sam_model_registry

from cellsam_trt.modeling import CellSAMNetwork
from cellsam_trt.modeling.checkpoint import (
    CheckpointError,
    check_checkpoint,
    infer_config,
    load_checkpoint,
    random_network,
    read_state_dict,
    write_checkpoint,
    write_random_checkpoint,
)
from cellsam_trt.modeling.config import ModelConfig


def released_cellfinder_layout(cfg) -> dict:
    """``cellfinder.decode_head.*`` keys and shapes as the released AnchorDETR builds them
    (AnchorDETR/models: anchor_detr.py, transformer.py, backbone.py), written out by hand."""
    d, ffn, q, c = cfg.d_model, cfg.dim_feedforward, cfg.num_queries, cfg.num_classes
    vit = cfg.trunk
    e = vit.embed_dim
    keys = {}
    p = "cellfinder.decode_head."
    t = p + "transformer."

    def linear(name, n_in, n_out):
        keys[name + ".weight"] = (n_out, n_in)
        keys[name + ".bias"] = (n_out,)

    def norm(name, n):
        keys[name + ".weight"] = (n,)
        keys[name + ".bias"] = (n,)

    def rcda(name):
        keys[name + ".in_proj_weight"] = (5 * d, d)
        keys[name + ".in_proj_bias"] = (5 * d,)
        linear(name + ".out_proj", d, d)

    def ffn_block(name):
        linear(name + ".linear1", d, ffn)
        linear(name + ".linear2", ffn, d)
        norm(name + ".norm2", d)

    for i in range(cfg.enc_layers):
        rcda(f"{t}encoder_layers.{i}.self_attn")
        norm(f"{t}encoder_layers.{i}.norm1", d)
        ffn_block(f"{t}encoder_layers.{i}.ffn")
    for i in range(cfg.dec_layers):
        rcda(f"{t}decoder_layers.{i}.cross_attn")
        norm(f"{t}decoder_layers.{i}.norm1", d)
        keys[f"{t}decoder_layers.{i}.self_attn.in_proj_weight"] = (3 * d, d)
        keys[f"{t}decoder_layers.{i}.self_attn.in_proj_bias"] = (3 * d,)
        linear(f"{t}decoder_layers.{i}.self_attn.out_proj", d, d)
        norm(f"{t}decoder_layers.{i}.norm2", d)
        ffn_block(f"{t}decoder_layers.{i}.ffn")
    keys[t + "pattern.weight"] = (cfg.num_patterns, d)
    keys[t + "position.weight"] = (q, 2)
    for name in ("adapt_pos2d", "adapt_pos1d"):
        linear(f"{t}{name}.0", d, d)
        linear(f"{t}{name}.2", d, d)
    for i in range(cfg.dec_layers):  # one shared head listed once per decoder layer
        linear(f"{t}class_embed.{i}", d, c)
        linear(f"{t}bbox_embed.{i}.layers.0", d, d)
        linear(f"{t}bbox_embed.{i}.layers.1", d, d)
        linear(f"{t}bbox_embed.{i}.layers.2", d, 4)
    keys[p + "input_proj.0.0.weight"] = (d, e, 1, 1)
    keys[p + "input_proj.0.0.bias"] = (d,)
    norm(p + "input_proj.0.1", d)
    body = p + "backbone.body."
    grid = vit.img_size // vit.patch_size
    keys[body + "pos_embed"] = (1, grid, grid, e)
    keys[body + "patch_embed.proj.weight"] = (e, 3, vit.patch_size, vit.patch_size)
    keys[body + "patch_embed.proj.bias"] = (e,)
    hd = e // vit.num_heads
    for i in range(vit.depth):
        b = f"{body}blocks.{i}."
        norm(b + "norm1", e)
        linear(b + "attn.qkv", e, 3 * e)
        linear(b + "attn.proj", e, e)
        size = grid if i in vit.global_attn_indexes else vit.window_size
        keys[b + "attn.rel_pos_h"] = (2 * size - 1, hd)
        keys[b + "attn.rel_pos_w"] = (2 * size - 1, hd)
        norm(b + "norm2", e)
        linear(b + "mlp.lin1", e, int(e * vit.mlp_ratio))
        linear(b + "mlp.lin2", int(e * vit.mlp_ratio), e)
    return keys


def released_layout() -> dict:
    """Full released CellSAM: SAM vit_b twice (model, model_cp) + CellFinder."""
    with torch.device("meta"):
        sam = {k: tuple(v.shape) for k, v in sam_model_registry["vit_b"]().state_dict().items()}
    keys = {f"model.{k}": s for k, s in sam.items()}
    keys.update({f"model_cp.{k}": s for k, s in sam.items()})
    keys.update(released_cellfinder_layout(ModelConfig.cellsam().cellfinder))
    return keys


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_full_module_tree_matches_released_layout():
    with torch.device("meta"):
        ours = shapes(CellSAMNetwork(ModelConfig.cellsam()).state_dict())
    expected = released_layout()
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}
    assert len(ours) == 1041


def test_tiny_random_checkpoint_has_official_layout_and_loads(tmp_path):
    cfg = ModelConfig.tiny()
    path = write_random_checkpoint(tmp_path / "tiny.pt", cfg, seed=3)
    raw = torch.load(path, weights_only=True)
    sam_cfg = cfg.sam
    expected = released_cellfinder_layout(cfg.cellfinder)
    assert {k: s for k, s in shapes(raw).items() if k.startswith("cellfinder.")} == expected
    assert {k[len("model."):] for k in raw if k.startswith("model.")} == {
        k[len("model_cp."):] for k in raw if k.startswith("model_cp.")
    }
    assert raw["model.image_encoder.patch_embed.proj.weight"].shape[0] == sam_cfg.encoder.embed_dim
    net = load_checkpoint(path)
    assert net.config == cfg and net.uses_model_cp
    for key, value in net.state_dict().items():
        assert torch.equal(value, raw[key]), key
    # seeded: same seed, same weights; other seed, other weights
    again = torch.load(write_random_checkpoint(tmp_path / "again.pt", cfg, seed=3), weights_only=True)
    other = torch.load(write_random_checkpoint(tmp_path / "other.pt", cfg, seed=4), weights_only=True)
    key = "model_cp.mask_decoder.iou_token.weight"
    assert torch.equal(raw[key], again[key]) and not torch.equal(raw[key], other[key])


def test_wrapped_state_dict_and_missing_model_cp(tmp_path):
    net = random_network(ModelConfig.tiny(), seed=1)
    sd = net.state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "wrapped.pt")
    assert load_checkpoint(tmp_path / "wrapped.pt").uses_model_cp

    plain = {k: v for k, v in sd.items() if not k.startswith("model_cp.")}
    torch.save(plain, tmp_path / "no_cp.pt")
    loaded = load_checkpoint(tmp_path / "no_cp.pt")
    assert not loaded.uses_model_cp
    # without model_cp the decoder path is model.*
    assert loaded.sam is loaded.model
    assert torch.equal(loaded.model_cp.mask_decoder.iou_token.weight, sd["model.mask_decoder.iou_token.weight"])


def test_layout_errors_list_every_problem(tmp_path):
    sd = random_network(ModelConfig.tiny(), seed=1).state_dict()
    del sd["model.mask_decoder.iou_token.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    sd["cellfinder.decode_head.transformer.position.weight"] = torch.zeros(7, 2)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.pt", config=ModelConfig.tiny())
    text = str(err.value)
    assert "1 missing: model.mask_decoder.iou_token.weight" in text
    assert "1 unexpected: model.extra.weight" in text
    assert "cellfinder.decode_head.transformer.position.weight (7, 2) != (200, 2)" in text


def test_a_damaged_layout_is_reported_against_the_layout_its_keys_imply(tmp_path):
    """A tiny checkpoint with one key removed names that key, not hundreds against ViT-B."""
    sd = random_network(ModelConfig.tiny(), seed=1).state_dict()
    assert infer_config(sd) == ModelConfig.tiny()
    sd.pop("cellfinder.decode_head.transformer.pattern.weight")
    assert infer_config(sd) == ModelConfig.tiny()
    torch.save(sd, tmp_path / "odd.pt")
    for read in (load_checkpoint, check_checkpoint):
        with pytest.raises(CheckpointError) as err:
            read(tmp_path / "odd.pt")
        assert str(err.value).splitlines()[1:] == ["  1 missing: cellfinder.decode_head.transformer.pattern.weight"]
        assert "(tiny)" in str(err.value)


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path):
    """A text file, an empty file and a truncated download: one CheckpointError each, naming
    the file and the problem (not torch's unpickler errors)."""
    (tmp_path / "notes.pt").write_text("these are my notes, not weights\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    write_random_checkpoint(tmp_path / "whole.pt", ModelConfig.tiny())
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[:len(data) // 2])
    torch.save(torch.load(tmp_path / "whole.pt"), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy-half.pt").write_bytes(data[:len(data) // 2])
    for name, match in [("notes.pt", "starts with b'these are my not', not with the zip archive"),
                        ("empty.pt", r"empty \(0 bytes\)"), ("half.pt", "truncated or damaged"),
                        ("legacy-half.pt", "truncated or damaged")]:
        for read in (load_checkpoint, check_checkpoint):
            with pytest.raises(CheckpointError, match=match) as err:
                read(tmp_path / name)
            assert str(err.value).startswith(f"checkpoint {tmp_path / name}: ")
    assert check_checkpoint(tmp_path / "legacy.pt") == ModelConfig.tiny()  # the old format still loads


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /tmp/cellsam_trt_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    torch.save({"model.x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="would run code.*GLOBAL posix.system"):
        read_state_dict(tmp_path / "evil.pt")
    # a bare pickle (not torch's zip format) is refused before any object is built
    with open(tmp_path / "evil2.pt", "wb") as fh:
        pickle.dump({"model.x": _RunsCode()}, fh, protocol=4)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(tmp_path / "evil2.pt")
    import os

    assert not os.path.exists("/tmp/cellsam_trt_pwned")


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no file at"):
        load_checkpoint(tmp_path / "absent.pt")


def test_default_location_message_mentions_download(monkeypatch, tmp_path):
    import cellsam_trt.modeling.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "DEFAULT_CHECKPOINT", tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="DEEPCELL_ACCESS_TOKEN"):
        ckpt.load_checkpoint()
    monkeypatch.delenv("DEEPCELL_ACCESS_TOKEN", raising=False)
    with pytest.raises(CheckpointError, match="access token"):
        ckpt.download_weights()


def test_write_checkpoint_round_trip_preserves_steering(tmp_path, steered_tiny):
    path = write_checkpoint(steered_tiny, tmp_path / "steered.pt")
    loaded = load_checkpoint(path)
    for key, value in steered_tiny.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
