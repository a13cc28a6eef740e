"""Which files each dataset needs on disk, checked before any process starts.

Stdlib only: the launcher's preflight imports this, and `import torchvision` costs seconds.
The layouts mirror torchvision 0.29's own checks, so a run that passes here does not fail
later inside torchvision for a missing file:
- MNIST/FashionMNIST (`MNIST._check_exists`) need the four idx files UNCOMPRESSED in
  `<root>/<ClassName>/raw/`; `.gz` files alone do not count (only `download=True` extracts
  them, and then only if their md5 matches the official archives). A legacy
  `<root>/<ClassName>/processed/{training,test}.pt` pair is accepted instead.
- CIFAR10 (`CIFAR10._check_integrity`, `_load_meta`) needs `data_batch_1..5`, `test_batch` and
  `batches.meta` in `<root>/cifar-10-batches-py/`. torchvision also md5-checks them; that takes
  a read of 170 MB, so it is left to loading time (`data.load_datasets` reports it).
- ImageFolder (`find_classes`, `make_dataset`): every sub-folder of root is a class, and each
  needs at least one file (searched recursively, links followed) whose name ends with one of
  `IMG_EXTENSIONS`, compared in lower case.
"""

import os

from rpc_train.config.errors import ConfigError
from rpc_train.data.corpus import usable_files

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic", "imagefolder", "criteo", "synthetic_clicks",
            "text")
CLICK_DATASETS = ("criteo", "synthetic_clicks")  # mode=hybrid's, read by data/clicks.py

# Datasets that are generated or bundled with a package, so never need files.
_NO_FILES = ("digits", "synthetic", "synthetic_clicks")

# torchvision names the folder after the dataset class.
MNIST_CLASS_NAMES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_LEGACY_FILES = ("training.pt", "test.pt")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")

# torchvision.datasets.folder.IMG_EXTENSIONS, copied to stay stdlib (a test compares the two).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_available(data) -> None:
    """Raise ConfigError (one line) if `data` names an unknown dataset or lacks its files.

    `data` needs `.name`, `.root` and `.download` (a DataConf or anything shaped like it).
    With `download` true the files may be fetched later, so only the name is checked.
    """
    if data.name not in DATASETS:
        raise ConfigError(f"data.name={data.name!r} is not a dataset; valid: {', '.join(DATASETS)}")
    if data.name == "imagefolder":  # never downloaded, whatever data.download says
        check_imagefolder(data)
        return
    if data.name == "text":  # files there, readable, two of them long enough for a window
        usable_files(data, int(data.shape[0]) + 1)
        return
    if data.download or data.name in _NO_FILES:
        return
    # torchvision expands ~ itself; abspath only makes the message say where a relative root led.
    root = os.path.abspath(os.path.expanduser(data.root))
    if data.name == "criteo":
        path = os.path.join(root, data.file)
        if not os.path.isfile(path):
            raise ConfigError(f"data=criteo: no file {path} (data.root={data.root}, data.file={data.file}); put "
                              "Criteo's train.txt (or a day_N file) there, or set data.root and data.file")
        return
    if data.name == "cifar10":
        label, folder, missing = "CIFAR-10", *_missing_cifar10(root)
        only_gz = False
    else:
        label = MNIST_CLASS_NAMES[data.name]
        folder, missing = _missing_mnist(root, label)
        only_gz = bool(missing) and all(os.path.isfile(os.path.join(folder, f + ".gz")) for f in missing)
    if not missing:
        return
    where = f"under {folder} (data.root={data.root})"
    if only_gz:
        raise ConfigError(
            f"data={data.name}: only .gz copies of {', '.join(missing)} {where}; torchvision reads "
            "them uncompressed: gunzip them there or add data.download=true"
        )
    # Naming each missing file helps only when some are there; otherwise "no files" says it all.
    total = len(CIFAR10_FILES) if data.name == "cifar10" else len(MNIST_FILES)
    what = f"no {label} files" if len(missing) == total else f"missing {', '.join(missing)}"
    raise ConfigError(f"data={data.name}: {what} {where}; put the files there or add data.download=true")


def _missing_mnist(root: str, class_name: str) -> tuple[str, list[str]]:
    """(raw folder, names of the idx files torchvision would not find there)."""
    raw = os.path.join(root, class_name, "raw")
    processed = os.path.join(root, class_name, "processed")
    # torchvision < 0.9 cached tensors here; 0.29 still loads them in place of the raw files.
    if all(os.path.isfile(os.path.join(processed, f)) for f in _MNIST_LEGACY_FILES):
        return raw, []
    return raw, [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]


def _missing_cifar10(root: str) -> tuple[str, list[str]]:
    folder = os.path.join(root, CIFAR10_FOLDER)
    return folder, [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]


def check_imagefolder(data) -> None:
    """data=imagefolder's folder, its class folders, an image in each, and the settings that follow them.

    Stops at the first image of each class, so it costs one directory read per class, not a scan.
    """
    root = os.path.abspath(os.path.expanduser(data.root))
    if not os.path.isdir(root):
        raise ConfigError(f"data=imagefolder: no folder {root} (data.root={data.root}); set data.root to the "
                          "folder holding one sub-folder of images per class")
    # torchvision's find_classes: every sub-folder, sorted, is a class; the label is its position.
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ConfigError(f"data=imagefolder: no class folders in {root} (data.root={data.root}); put each "
                          "class's images in a sub-folder of its own, <root>/<class>/<image>")
    for name in classes:
        if not _holds_image(os.path.join(root, name)):
            raise ConfigError(f"data=imagefolder: class folder {os.path.join(root, name)} holds no image; "
                              f"accepted extensions: {', '.join(IMAGE_EXTENSIONS)}; add images or remove it")
    if data.num_classes != len(classes):
        raise ConfigError(f"data.num_classes={data.num_classes} does not match the {len(classes)} class folders "
                          f"in {root}; set data.num_classes={len(classes)}")
    size = data.image_size
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"data.image_size={size}: must be a positive number of pixels (the side of the crops)")
    if list(data.shape) != [3, size, size]:
        # Models are built from data.shape; the transforms make [3, image_size, image_size].
        raise ConfigError(f"data.shape={list(data.shape)} does not match data.image_size={size}; drop the "
                          f"override or set data.shape=[3,{size},{size}]")


def _holds_image(folder: str) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):  # as make_dataset walks a class folder
        if any(name.lower().endswith(IMAGE_EXTENSIONS) for name in names):
            return True
    return False
