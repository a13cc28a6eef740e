"""Augmentations as torchvision v2 transforms built from Hydra `_target_` nodes, run seeded per sample.

A batch must be a pure function of (seed, epoch, sample ids), whichever process makes it.
torchvision v2 transforms draw from torch's global CPU generator, so `apply_seeded` runs each
sample's transform on a generator freshly seeded from (seed, epoch, sample) and puts the
caller's state back afterwards.
"""

import hashlib
import os
import re
import threading
from typing import Any, Callable, Optional, Sequence

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms import v2

from rpc_train.config.errors import ConfigError, first_line

# The ImageNet training set's per-channel statistics of [0, 1] pixels: the usual published values.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The global generator is one per process: two threads (an RPC worker's pool) seeding and
# drawing at once would take each other's numbers, so seeded sections run one at a time.
_SEEDED = threading.Lock()


def _unlock_in_child() -> None:
    # A process forked (a DataLoader worker) while another thread held the lock would wait for ever.
    global _SEEDED
    _SEEDED = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


def train_augmentation(size: int, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 [3, H, W] -> a random crop of `size` x `size`, maybe flipped, standardised float32."""
    return v2.Compose([
        v2.RandomResizedCrop(size, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def val_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """uint8 [3, H, W] -> the centre `size` x `size` of the image resized as ImageNet evaluation does
    (shorter side to size * 256/224), standardised float32; no randomness."""
    return v2.Compose([
        v2.Resize(round(size * 256 / 224), antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def build_transform(node: Any, setting: str) -> Optional[Callable]:
    """The transform a `_target_` node describes (None: no transform); a node that does not build
    is a one-line ConfigError naming `setting` (e.g. "data.train_transform") and the target."""
    if node is None:
        return None
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(f"{setting}={node}: expected a node with a _target_ (a callable such as "
                          "torchvision.transforms.v2.Compose) or null for none")
    try:
        # _convert_="all": plain lists and dicts inside, so the transform pickles without omegaconf.
        return instantiate(node, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(f"{setting}: {_why_not_built(err, node['_target_'])}") from err


def _why_not_built(err: InstantiationException, target: str) -> str:
    """"cannot import 'X' (reason)" or "cannot build 'X' (reason)", naming the failing (maybe nested) target."""
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    import_error = next((e for e in chain if isinstance(e, ImportError)), None)
    if import_error is not None:
        # Hydra's ImportError reads "Error loading 'X':" then the import's own error, whose
        # innermost cause says what was missing ("module 'a.b' has no attribute 'C'").
        named = re.match(r"Error loading '([^']+)'", str(import_error))
        return f"cannot import '{named.group(1) if named else target}' ({first_line(chain[-1])})"
    named = re.search(r"target '([^']+)'", str(err))
    cause = chain[1] if len(chain) > 1 else err
    return f"cannot build '{named.group(1) if named else target}' ({type(cause).__name__}: {first_line(cause)})"


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """A 63-bit seed for one sample's randomness, the same in every process and Python version.

    blake2b of the three numbers: Python's hash() is salted per process (PYTHONHASHSEED), and a
    sum such as seed + epoch + key would give neighbouring samples related seeds.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(key)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def apply_seeded(transform: Optional[Callable], sample: torch.Tensor, seed: int, epoch: int,
                 key: int) -> torch.Tensor:
    """`transform(sample)` with its randomness fixed by (seed, epoch, key); the caller's RNG is untouched."""
    if transform is None:
        return sample
    with _SEEDED, torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also reseed every GPU's generator,
        # which fork_rng(devices=[]) does not restore. CPU tensors draw from this one alone.
        torch.default_generator.manual_seed(sample_seed(seed, epoch, key))
        return transform(sample)
