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
"""

import os

from rpc_train.config.errors import ConfigError

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic", "criteo", "synthetic_clicks")
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


def check_available(data) -> None:
    """Raise ConfigError (one line) if `data` names an unknown dataset or lacks its files.

    `data` needs `.name`, `.root` and `.download` (a DataConf or anything shaped like it).
    With `download` true the files may be fetched later, so only the name is checked.
    """
    if data.name not in DATASETS:
        raise ConfigError(f"data.name={data.name!r} is not a dataset; valid: {', '.join(DATASETS)}")
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
