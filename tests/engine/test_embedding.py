"""``engine.embedding.ImageEmbedding``: saved and loaded; a damaged file is a ValueError naming it."""
import numpy as np
import pytest
import torch

from cellsam_trt.engine.embedding import ImageEmbedding


def test_a_damaged_embedding_file_is_a_value_error_naming_it(tmp_path):
    embedding = ImageEmbedding(torch.zeros(1, 8, 64, 64), 30, 40, None, "image", "weights")
    embedding.save(tmp_path / "whole.npz")
    loaded = ImageEmbedding.load(tmp_path / "whole.npz", weights="weights")
    assert (loaded.height, loaded.width) == (30, 40) and loaded.embedding.shape == (1, 8, 64, 64)

    data = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "half.npz").write_bytes(data[:len(data) // 2])  # a copy cut short
    (tmp_path / "notes.npz").write_text("not an embedding")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))  # an .npz of something else
    for name in ("half.npz", "notes.npz", "other.npz"):
        with pytest.raises(ValueError, match=f"embedding file {tmp_path / name}: damaged, or not a saved"):
            ImageEmbedding.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        ImageEmbedding.load(tmp_path / "absent.npz")
