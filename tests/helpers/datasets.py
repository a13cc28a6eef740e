"""Tiny datasets written in the real on-disk formats torchvision (and the Criteo reader) reads, for tests.

Image folders are real JPEG, PNG and BMP files that PIL writes.

Loading these through the real torchvision classes tests our layout and label handling
without a download. MNIST-family files load through `rpc_train.data.datasets.load_datasets` as they
are. CIFAR-10 files cannot: torchvision checks each file's md5 against the official 170 MB
release, so `tiny_cifar10_class` gives a subclass that expects the tiny files' md5s instead.
"""

import hashlib
import os
import pickle
import struct

import numpy as np

from rpc_train.data.files import CIFAR10_FILES, CIFAR10_FOLDER, MNIST_FILES

# IDX magic: two zero bytes, the element type (0x08 = uint8), then the number of dimensions.
_IDX_UINT8 = 0x0800


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header: magic 2049 for 1-D, 2051 for 3-D)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(f">I{array.ndim}I", _IDX_UINT8 | array.ndim, *array.shape)
    with open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_mnist(
    root: str, class_name: str = "MNIST", n_train: int = 20, n_test: int = 10, ink: float = 0.13, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write the four idx files under `<root>/<class_name>/raw/`; return the training (images, labels).

    Images are uint8 [n, 28, 28]: each pixel is 255 with probability `ink`, else 0, so with
    `ink` near the dataset's mean (MNIST 0.13, FashionMNIST 0.29) standardising gives mean ~0.
    Labels cycle through 0..9 in a shuffled order, so every class appears.
    """
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, class_name, "raw")
    os.makedirs(raw, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = np.where(rng.random((n, 28, 28)) < ink, 255, 0).astype(np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        write_idx(os.path.join(raw, f"{split}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte"), labels)
        written[split] = (images, labels)
    assert sorted(os.listdir(raw)) == sorted(MNIST_FILES)
    return written["train"]


def write_cifar10(root: str, per_batch: int = 4, n_test: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write `<root>/cifar-10-batches-py/` (5 data batches, test_batch, batches.meta) as pickles.

    Each batch is the real format: {"batch_label", "labels": list of int, "data": uint8
    [n, 3072] (1024 red, 1024 green, 1024 blue values per row), "filenames"}, with every text
    pickled as a Python 2 `str` like the real files: torchvision's `encoding="latin1"` reads the
    keys as str, and `encoding="bytes"` as b"data", b"labels", exactly as it does the real ones. Returns the training
    (images uint8 [N, 3, 32, 32], labels int64 [N]) in file order (batch 1 first).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, CIFAR10_FOLDER)
    os.makedirs(folder, exist_ok=True)
    train_images, train_labels = [], []
    for name in CIFAR10_FILES[:-1]:
        n = n_test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=n)]
        batch = {"batch_label": name, "labels": labels, "data": rows, "filenames": [f"{name}_{i}.png" for i in range(n)]}
        _pickle_py2(os.path.join(folder, name), batch)
        if name != "test_batch":
            train_images.append(rows.reshape(n, 3, 32, 32))
            train_labels.extend(labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle_py2(os.path.join(folder, "batches.meta"), {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return np.concatenate(train_images), np.array(train_labels, dtype=np.int64)


IMAGE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp"}


def write_imagefolder(root: str, classes: int = 3, per_class: int = 4, size=(40, 32), seed: int = 0,
                      fmt: str = "JPEG") -> dict[str, tuple[int, np.ndarray]]:
    """Write `<root>/class<k>/img<i>.<ext>` image files with PIL; return {path: (class index, pixels)}.

    Pixels are seeded uint8 RGB [height, width, 3] (`size` is PIL's (width, height)); PNG and BMP
    decode to exactly them, JPEG to something close. `fmt`: JPEG, PNG, BMP, or "mixed" to
    alternate JPEG and PNG within each class.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    written = {}
    for k in range(classes):
        folder = os.path.join(root, f"class{k}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            kind = ("JPEG", "PNG")[i % 2] if fmt == "mixed" else fmt
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            path = os.path.join(folder, f"img{i:03d}{IMAGE_SUFFIXES[kind]}")
            Image.fromarray(pixels).save(path, format=kind)
            written[path] = (k, pixels)
    return written


def write_corrupt_image(folder: str, name: str = "corrupt.jpg") -> str:
    """A file named like an image whose bytes are not one; returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(b"not an image, only text with a .jpg name\n")
    return path


def criteo_line(label="1", ints=None, cats=None) -> str:
    """One line of Criteo's Display Advertising TSV: label, 13 integers, 26 hexadecimal categoricals."""
    ints = ints if ints is not None else [str(i) for i in range(13)]
    cats = cats if cats is not None else [f"{0x68fd1e64 + t:08x}" for t in range(26)]
    return "\t".join([label, *ints, *cats]) + "\n"


def cifar10_md5s(root: str) -> dict[str, str]:
    """md5 of each file under `<root>/cifar-10-batches-py/`, as torchvision's tables hold them."""
    folder = os.path.join(root, CIFAR10_FOLDER)
    return {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest() for name in CIFAR10_FILES}


def tiny_cifar10_class(root: str):
    """A torchvision CIFAR10 subclass whose md5 tables match the files `write_cifar10` put under root.

    Only the expected checksums change: torchvision's own loading and integrity check still run,
    and a test loading through this class fails if a tiny file is altered afterwards.
    """
    from torchvision.datasets import CIFAR10

    md5s = cifar10_md5s(root)

    class TinyCIFAR10(CIFAR10):
        train_list = [[name, md5s[name]] for name, _ in CIFAR10.train_list]
        test_list = [[name, md5s[name]] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": md5s[CIFAR10.meta["filename"]]}

    return TinyCIFAR10


class _Py2Str(bytes):
    """Text the real files hold as a Python 2 `str` (a byte string, decoded by the reader)."""


class _Py2Pickler(pickle._Pickler):
    """Protocol-2 pickler writing `_Py2Str` with Python 2's string opcodes.

    Python 3 cannot otherwise write these: it pickles str as unicode (always str on loading)
    and bytes via `codecs.encode` (always bytes), while the real files' keys follow `encoding`.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2_str


def _pickle_py2(path: str, obj) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(_as_py2(obj))


def _as_py2(obj):
    if isinstance(obj, str):
        return _Py2Str(obj.encode("latin1"))
    if isinstance(obj, dict):
        return {_as_py2(k): _as_py2(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_as_py2(x) for x in obj]
    return obj
