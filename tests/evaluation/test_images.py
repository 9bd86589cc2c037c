import gzip
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lawa_diffusion.evaluation import images as data

FMNIST = data.FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
                                  reason="Fashion-MNIST IDX files not installed")


def _write_pngs(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"img{i:03d}.png"))
    return folder


@needs_fmnist
def test_fashion_mnist_matches_torchvision_reader(tmp_path):
    from torchvision.datasets.mnist import read_image_file

    raw = tmp_path / "t10k-images-idx3-ubyte"
    with gzip.open(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz"), "rb") as src, open(raw, "wb") as dst:
        shutil.copyfileobj(src, dst)
    expected = read_image_file(str(raw))
    images = data.load_fashion_mnist("test", root=FMNIST)
    assert images.dtype == torch.uint8 and images.shape == (10000, 1, 28, 28)
    assert torch.equal(images[:, 0], expected)
    # the raw (non-gz) file in another root gives the same tensor
    assert torch.equal(data.load_fashion_mnist("test", root=str(tmp_path)), images)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no t10k-images-idx3-ubyte"):
        data.load_fashion_mnist("test", root=str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_fashion_mnist("valid", root=str(tmp_path))
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist("test", root=str(tmp_path))


def test_image_folder_round_trip_and_order(tmp_path):
    rng = np.random.RandomState(0)
    gray = [rng.randint(0, 256, (6, 5), dtype=np.uint8) for _ in range(3)]
    folder = _write_pngs(tmp_path / "gray", gray)
    (tmp_path / "gray" / "notes.txt").write_text("ignored")
    images = data.load_image_folder(folder)
    assert images.shape == (3, 1, 6, 5) and images.dtype == torch.uint8
    for i, a in enumerate(gray):
        assert torch.equal(images[i, 0], torch.from_numpy(a))
    rgb = [rng.randint(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(2)]
    folder = _write_pngs(tmp_path / "rgb", rgb)
    images = data.load_image_folder(folder)
    assert torch.equal(images[1], torch.from_numpy(rgb[1]).permute(2, 0, 1))


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no image files.*it is empty"):
        data.load_image_folder(str(tmp_path / "empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="has no image files.*'a.txt'"):
        data.load_image_folder(str(tmp_path / "text"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(str(tmp_path / "missing"))
    folder = _write_pngs(tmp_path / "corrupt", [np.zeros((4, 4), np.uint8)])
    (tmp_path / "corrupt" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="bad.png' could not be decoded"):
        data.load_image_folder(folder)


def test_mixed_sizes_refused_then_resized(tmp_path):
    folder = _write_pngs(tmp_path / "mixed", [np.full((4, 4), 10, np.uint8), np.full((6, 8), 200, np.uint8)])
    with pytest.raises(ValueError, match="2 sizes.*--image-size"):
        data.load_image_folder(folder)
    images = data.load_image_folder(folder, image_size=8, resize_mode="resize")
    assert images.shape == (2, 1, 8, 8)
    assert int(images[0].min()) == int(images[0].max()) == 10  # constant images stay constant
    padded = data.load_image_folder(folder, image_size=8, resize_mode="pad")
    assert int(padded[0, 0, 2:6, 2:6].min()) == 10 and int(padded[0, 0, 0].max()) == 0


def test_arrays_in_every_layout(tmp_path):
    rng = np.random.RandomState(1)
    nhw = rng.randint(0, 256, (3, 5, 6), dtype=np.uint8)
    nhwc = rng.randint(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", nhw)
    np.savez(tmp_path / "b.npz", images=nhwc)
    np.savez(tmp_path / "c.npz", x=nhwc.transpose(0, 3, 1, 2))
    assert torch.equal(data.load_array(str(tmp_path / "a.npy")), torch.from_numpy(nhw)[:, None])
    expected = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert torch.equal(data.load_array(str(tmp_path / "b.npz")), expected)
    assert torch.equal(data.load_array(str(tmp_path / "c.npz")), expected)
    np.save(tmp_path / "f.npy", nhw.astype(np.float32))
    with pytest.raises(ValueError, match="must hold uint8 images"):
        data.load_array(str(tmp_path / "f.npy"))


def test_fit_to_size_pad_keeps_every_pixel():
    images = torch.randint(1, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = data.fit_to_size(images, 32, "pad")
    assert out.shape == (2, 1, 32, 32)
    assert torch.equal(out[:, :, 2:30, 2:30], images)
    assert int(out.sum()) == int(images.sum())  # border is zero
    assert data.fit_to_size(images, 28) is images
    assert data.fit_to_size(images, 16, "resize").shape == (2, 1, 16, 16)


def test_training_batches_range_and_flips():
    """Training images reach the model as float32 uint8/127.5 - 1, mirrored left-right at random when asked."""
    from lawa_diffusion.training.trainer import BatchSource

    images = data.fit_to_size(torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), 32)
    cpu = torch.device("cpu")
    plain = BatchSource(images, 4, 1, 0, 0, 1, False, cpu)
    x, _ = plain.draw(1, 0)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 32, 32)
    assert torch.allclose(x.double(), images[plain._permutation(0)].double() / 127.5 - 1, atol=1e-6)
    flipping = BatchSource(images, 4, 1, 0, 0, 1, True, cpu)
    seen = set()
    for step in range(1, 11):  # one batch per epoch: every step draws a new permutation
        y, _ = flipping.draw(step, 0)
        expected = images[flipping._permutation(step - 1)].float() / 127.5 - 1
        for row, want in zip(y, expected):
            assert torch.equal(row, want) or torch.equal(row, want.flip(-1))
            seen.add(bool(torch.equal(row, want)))
    assert seen == {True, False}


def test_fingerprint_tracks_folder_changes_without_decoding(tmp_path):
    folder = _write_pngs(tmp_path / "f", [np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8)])
    first = data.fingerprint(folder)
    assert data.fingerprint(folder) == first
    _write_pngs(tmp_path / "f2", [np.full((4, 4), 7, np.uint8)])
    shutil.copy(tmp_path / "f2" / "img000.png", tmp_path / "f" / "img002.png")
    assert data.fingerprint(folder) != first
    t = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    assert data.fingerprint(t) != data.fingerprint(t + 1)
