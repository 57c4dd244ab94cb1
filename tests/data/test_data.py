"""fastcnn.data: the built-in digits, class folders, MedMNIST npz (resized on request), the lecture's split and batch
arithmetic, and bad data giving errors that name the file: corrupt images found by one scan, or skipped."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from fastcnn import data

CLASSES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")


@pytest.fixture
def folder_tree(tmp_path):
    """Six class folders of 7 images each, mixed formats, modes and sizes (as Medical-MNIST, in miniature)."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(CLASSES):
        (tmp_path / name).mkdir()
        for i in range(7):
            size = 20 + i
            if i % 2:
                gray = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(gray, "L").save(tmp_path / name / f"{i}.png")
            else:
                rgb = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                Image.fromarray(rgb, "RGB").save(tmp_path / name / f"{i}.jpeg")
    return tmp_path


def test_lecture_split_and_batch_counts():
    assert data.train_size(58_954) == 42_000
    train, val = data.split_train_val(TensorDataset(torch.arange(58_954)), seed=0)
    assert (len(train), len(val)) == (42_000, 16_954)
    assert len(data.make_loader(train, 16, shuffle=True)) == 2_625
    assert len(data.make_loader(val, 16)) == 1_060
    assert len(data.make_loader(val, 16, drop_last=True)) == 1_059
    assert sorted(train.indices + val.indices) == list(range(58_954))


def test_split_is_reproducible_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    first, _ = data.split_train_val(TensorDataset(torch.arange(100)), seed=3)
    second, _ = data.split_train_val(TensorDataset(torch.arange(100)), seed=3)
    other, _ = data.split_train_val(TensorDataset(torch.arange(100)), seed=4)
    assert first.indices == second.indices != other.indices
    assert torch.equal(torch.get_rng_state(), state)


def test_digits_is_real_data_of_the_requested_shape():
    train, val = data.digits(image_size=16, channels=1)
    assert (len(train), len(val)) == (1_280, 517)
    image, label = train[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and -1.0 <= image.min() <= image.max() <= 1.0
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    assert set(labels.tolist()) == set(range(10))
    assert data.load_dataset(None, image_size=32)[0][0][0].shape == (3, 32, 32)


def test_folders_map_classes_like_imagefolder_and_resize(folder_tree):
    dataset = data.ImageFolderDataset(str(folder_tree), image_size=12, channels=1)
    assert dataset.class_to_idx == {"AbdomenCT": 0, "BreastMRI": 1, "CXR": 2, "ChestCT": 3, "Hand": 4, "HeadCT": 5}
    assert len(dataset) == 42
    image, label = dataset[7]
    assert image.shape == (1, 12, 12) and label == 1
    rgb = data.ImageFolderDataset(str(folder_tree), image_size=9, channels=3)
    assert rgb[0][0].shape == (3, 9, 9)
    train, val = data.medical_mnist(str(folder_tree), image_size=12)
    assert (len(train), len(val)) == (30, 12)
    assert len(data.make_loader(train, 16)) == 2 and len(data.make_loader(train, 16, drop_last=True)) == 1
    batch, labels = next(iter(data.make_loader(train, 16, shuffle=True, num_workers=1)))
    assert batch.shape == (16, 1, 12, 12) and labels.shape == (16,)


def test_corrupt_image_names_the_file_even_in_a_worker(folder_tree):
    bad = folder_tree / "Hand" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset = data.ImageFolderDataset(str(folder_tree), image_size=8)
    with pytest.raises(ValueError, match="Hand/3.png"):
        dataset[dataset.samples.index((str(bad), 4))]
    loader = data.make_loader(dataset, 8, num_workers=1)
    with pytest.raises(ValueError, match="Hand/3.png"):
        for _ in loader:
            pass


def test_corrupt_images_are_all_listed_before_training_or_skipped(folder_tree):
    bad = [folder_tree / "Hand" / "3.png", folder_tree / "CXR" / "0.jpeg"]
    bad[0].write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    bad[1].write_bytes(bad[1].read_bytes()[:40])  # a truncated JPEG
    listed = r"2 of 42 images .* cannot be read: CXR/0.jpeg \(.*\), Hand/3.png"
    with pytest.raises(data.BadImagesError, match=listed) as error:
        data.medical_mnist(str(folder_tree), image_size=8)
    assert [path for path, _ in error.value.bad] == [str(bad[1]), str(bad[0])]
    assert "--skip-bad-images" in str(error.value)
    train, val = data.load_dataset(str(folder_tree), image_size=8, skip_bad_images=True)
    assert len(train) + len(val) == 40 and len(train.dataset.skipped) == 2
    assert all(path not in map(str, bad) for path, _ in train.dataset.samples)


def test_empty_class_folder_and_missing_root_are_named(folder_tree, tmp_path):
    (folder_tree / "Empty").mkdir()
    with pytest.raises(ValueError, match="Empty"):
        data.ImageFolderDataset(str(folder_tree))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.ImageFolderDataset(str(tmp_path / "nowhere"))


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_medmnist_npz_splits_and_channels(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {f"{s}_images": rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8) for s, n in
              (("train", 10), ("val", 4), ("test", 5))}
    arrays |= {f"{s}_labels": rng.integers(0, 9, (n, 1)) for s, n in (("train", 10), ("val", 4), ("test", 5))}
    path = _write_npz(tmp_path / "pathmnist_28.npz", **arrays)
    train = data.medmnist_npz(path, "train")
    image, label = train[3]
    assert image.shape == (3, 28, 28) and label.ndim == 0 and label == int(arrays["train_labels"][3, 0])
    assert len(data.medmnist_npz(path, "test")) == 5
    gray = data.medmnist_npz(path, "val", channels=1)[0][0]
    assert gray.shape == (1, 28, 28)
    train_and_val = data.load_dataset(path)
    assert [len(d) for d in train_and_val] == [10, 4]


def test_medmnist_npz_resizes_to_image_size(tmp_path):
    images = np.full((3, 28, 28), 255, np.uint8)
    images[1] = 0
    labels = np.arange(3).reshape(3, 1)
    path = _write_npz(tmp_path / "bloodmnist_28.npz", train_images=images, train_labels=labels, val_images=images,
                      val_labels=labels)
    resized = data.medmnist_npz(path, "train", channels=3, image_size=32)
    assert resized[0][0].shape == (3, 32, 32) and resized.classes == ["0", "1", "2"]
    assert torch.allclose(resized[0][0], torch.ones(3, 32, 32)) and torch.allclose(resized[1][0], -torch.ones(1))
    train, val = data.load_dataset(path, image_size=16, channels=1)
    assert train[2][0].shape == val[0][0].shape == (1, 16, 16)
    assert data.medmnist_npz(path, "train")[0][0].shape == (1, 28, 28)  # None: the file's own size
    with pytest.raises(ValueError, match="image_size"):
        data.medmnist_npz(path, "train", image_size=0)


def test_medmnist_npz_bad_files_are_named(tmp_path):
    path = _write_npz(tmp_path / "broken.npz", train_images=np.zeros((3, 8, 8), np.uint8),
                      training_labels=np.zeros((3, 1)))
    with pytest.raises(KeyError, match="broken.npz.*train_labels"):
        data.medmnist_npz(path, "train")
    path = _write_npz(tmp_path / "short.npz", train_images=np.zeros((3, 8, 8), np.uint8),
                      train_labels=np.zeros((2, 1)))
    with pytest.raises(ValueError, match="short.npz.*3 train_images but 2"):
        data.medmnist_npz(path, "train")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz"):
        data.medmnist_npz(str(tmp_path / "garbage.npz"))
    with pytest.raises(ValueError, match="split"):
        data.medmnist_npz(path, "validation")
    with pytest.raises(ValueError, match="data source"):
        data.load_dataset("no-such-thing")
