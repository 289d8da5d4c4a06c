"""What a dataset source is, and the registry of sources by name.

A source knows a dataset's splits and reads any example of them by position
(random access, as Grain's data sources): `record(split, index) -> (image, label)`
where the image is encoded bytes or uint8 pixels. Here: `Source` (the interface),
`ArraySource` (splits held in memory), `DatasetInfo`, `shard_range`, the errors a
missing or unreadable dataset raises, and `SOURCES` with `register_source`.

Sharding: shard `i` of `n` holds the contiguous examples
`[i * (N // n) + min(i, N % n), (i + 1) * (N // n) + min(i + 1, N % n))`, the
arithmetic of `tfds.even_splits` and of Grain's `ShardByJaxProcess` (without
`drop_remainder`), so the shards partition the split and differ in size by at
most one example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gg_jax.errors import UserError


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset is not prepared where it was looked for; the message says how to prepare it."""


class DatasetFormatError(UserError, ValueError):
    """The dataset is prepared in a format the pipeline does not read (TFRecord); the message says how to convert it."""


class CorruptImageError(UserError, ValueError):
    """An image could not be decoded; `path` names its file (or TFDS record)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Corrupt or unreadable image file {path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # Raised in input worker processes and re-raised in the trainer's.
        return type(self), (self.path, self.reason)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a dataset."""

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    train_split: str
    eval_split: str
    data_dir: str | None = None
    class_names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False, compare=False)


def shard_range(num_examples: int, index: int, count: int) -> tuple[int, int]:
    """[start, stop) of shard `index` of `count` (the arithmetic of `tfds.even_splits`)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    per, rem = divmod(num_examples, count)
    return per * index + min(index, rem), per * (index + 1) + min(index + 1, rem)


class Source:
    """Base class of the dataset sources (picklable: input worker processes get a copy)."""

    info: DatasetInfo
    # Whether horizontal flips keep the label (False for digits).
    allow_flip: bool = True
    # 'crop': resize the shorter side + centre crop; 'resize': resize the whole image.
    eval_mode: str = "crop"
    default_augment: str = "inception_crop"
    # In-memory pixels that take microseconds each: no worker processes by default.
    cheap: bool = False

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    def record(self, split: str, index: int) -> tuple[Any, int]:
        """(image: encoded bytes or uint8 pixels, label) of example `index` of `split`."""
        raise NotImplementedError

    def describe(self, split: str, index: int) -> str:
        """Where example `index` of `split` comes from (its file or record), for error messages."""
        return f"{self.info.name}/{split}[{index}]"

    def check_split(self, split: str) -> None:
        self.split_size(split)


class ArraySource(Source):
    """A source whose splits are arrays in memory (pixels, encoded bytes or file paths)."""

    def __init__(self, info: DatasetInfo, splits: dict[str, tuple[str, np.ndarray, np.ndarray]]):
        # splits[name] = (kind, payload, labels); kind in {'pixels', 'bytes', 'path'}.
        self.info = info
        self._splits = splits

    def _get(self, split):
        if split not in self._splits:
            raise ValueError(f"{self.info.name} has no split {split!r}; it has {sorted(self._splits)}")
        return self._splits[split]

    def split_size(self, split):
        return len(self._get(split)[2])

    def record(self, split, index):
        kind, payload, labels = self._get(split)
        item = payload[index]
        if kind == "path":
            with open(item, "rb") as f:
                item = f.read()
        return item, int(labels[index])

    def describe(self, split, index):
        kind, payload, _ = self._get(split)
        return str(payload[index]) if kind == "path" else super().describe(split, index)

    def paths(self, split: str) -> np.ndarray | None:
        """The file of each example of `split`, if examples are files."""
        kind, payload, _ = self._get(split)
        return payload if kind == "path" else None


# ---------------------------------------------------------------------- registry

SourceFactory = Callable[[str | None], Source]
SOURCES: dict[str, SourceFactory] = {}


def register_source(name: str):
    """Registers `factory(data_dir) -> Source` as dataset `name`; other names are TFDS datasets."""

    def wrap(factory):
        if name in SOURCES:
            raise ValueError(f"dataset source {name!r} is registered twice")
        SOURCES[name] = factory
        return factory

    return wrap
