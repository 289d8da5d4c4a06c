"""TFDS datasets as a source: any prepared TFDS image-classification dataset, read
from its ArrayRecord files (`tfds build ... --file_format=array_record`) with
`tfds.data_source`-style readers, which need no TensorFlow.

`TfdsSource` is what `datasets.get_source` returns for a name `SOURCES` does not
hold; a dataset that is not prepared, or prepared as TFRecord only, raises an error
that says how to prepare or convert it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from gg_jax.data.sources import SOURCES, DatasetFormatError, DatasetInfo, DatasetNotFoundError, Source


def _tfds():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return tfds


def _tfds_build_command(name: str, dd: str, manual: bool = False) -> str:
    manual_dir = " --manual_dir=MANUAL_DIR" if manual else ""
    return f"tfds build {name} --data_dir={dd}{manual_dir} --file_format=array_record"


def _tfds_instructions(name: str, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    dd = data_dir or "DATA_DIR"
    setup = "pip install tensorflow-datasets tensorflow-cpu  (TensorFlow only for this step)"
    if name.startswith("imagenet2012"):
        return (
            f"ImageNet-1K ({name}) is not prepared in {where}. It cannot be downloaded automatically:\n"
            "  1. Register at https://image-net.org/download-images and download\n"
            "     ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).\n"
            "  2. Put both tar files in one folder, MANUAL_DIR (do not extract them).\n"
            f"  3. {setup}\n"
            f"     {_tfds_build_command(name, dd, manual=True)}\n"
            "     (about 150 GB more disk and a few hours; data_dir may be a gs:// bucket).\n"
            f"  4. Pass data_dir={dd} (config field dataset.data_dir). See docs/data.md."
        )
    if name.startswith("places365_small"):
        return (
            f"Places365 ({name}) is not prepared in {where}. TFDS downloads it (about 30 GB) and prepares it:\n"
            f"  {setup}\n"
            f"  {_tfds_build_command(name, dd)}\n"
            f"then pass data_dir={dd} (config field dataset.data_dir). See docs/data.md."
        )
    return (
        f"The TFDS dataset {name!r} is not prepared in {where}. Prepare it with\n"
        f"  {setup}\n"
        f"  {_tfds_build_command(name, dd)}\n"
        f"(datasets that need a manual download print where to put the files), then pass data_dir={dd}."
    )


def _tfds_folder_name(name: str) -> str | None:
    """The folder TFDS keeps dataset `name` in ('imagenet2012' for 'imagenet2012/subset:5.*'),
    or None for names it resolves otherwise (community datasets, 'namespace:name')."""
    match = re.fullmatch(r"([a-z0-9_]+)(?:/[\w.-]+)?(?::[\w.*-]+)?", name)
    return match.group(1) if match else None


def _tfds_data_dirs(data_dir: str | None) -> list[str]:
    if data_dir:
        return [os.fspath(data_dir)]
    try:
        from tensorflow_datasets.core.utils import file_utils  # pylint: disable=g-import-not-at-top

        return [os.fspath(d) for d in file_utils.list_data_dirs(None)]
    except (ImportError, AttributeError):  # TFDS internals moved: its documented default.
        return [os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))]


def _exists(path: str) -> bool:
    from etils import epath  # pylint: disable=g-import-not-at-top  # gs:// paths too.

    return epath.Path(path).exists()


class TfdsSource(Source):
    """Any prepared TFDS image-classification dataset (features image + label), read from its
    ArrayRecord files (`tfds build ... --file_format=array_record`) without TensorFlow."""

    def __init__(self, name: str, data_dir: str | None):
        tfds = _tfds()

        def unknown(error):
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return DatasetNotFoundError(
                f"Unknown dataset {name!r}: it is neither a TFDS dataset nor prepared in data_dir={data_dir!r}; "
                f"the built-in names are {', '.join(repr(n) for n in SOURCES)}. ({first})"
            )

        base = _tfds_folder_name(name)
        if base is not None and not any(_exists(os.path.join(d, base)) for d in _tfds_data_dirs(data_dir)):
            # Not prepared there: say so before TFDS warns about the missing folder.
            try:
                tfds.builder_cls(base)
            except tfds.core.registered.DatasetNotFoundError as e:
                raise unknown(e) from None
            raise DatasetNotFoundError(_tfds_instructions(name, data_dir))
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise unknown(e) from None
        splits = builder.info.splits
        if not builder.is_prepared() or "train" not in splits:
            raise DatasetNotFoundError(_tfds_instructions(name, data_dir))
        eval_split = next((s for s in ("validation", "test", "val") if s in splits), None)
        if eval_split is None:
            raise DatasetNotFoundError(f"{name} has no validation or test split (splits: {list(splits)}).")
        formats = {f.value for f in builder.info.available_file_formats()}
        if "array_record" not in formats:
            raise DatasetFormatError(
                f"{name} in {builder.data_dir} is prepared as {', '.join(sorted(formats)) or 'an unknown format'} "
                "only; the input pipeline reads ArrayRecord files (random access, no TensorFlow). Convert it once "
                "(this step needs TensorFlow: pip install tensorflow-cpu): tfds convert_format "
                f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record "
                f"(or rebuild it with: {_tfds_build_command(name, data_dir or 'DATA_DIR')})."
            )
        keys = builder.info.supervised_keys or ("image", "label")
        self._image_key, self._label_key = keys[0], keys[1]
        label_feature = builder.info.features[self._label_key]
        self._name_key = next(
            (k for k in ("file_name", "filename", "image/filename") if k in builder.info.features), None
        )
        self._builder = builder
        self._readers: dict[str, Any] = {}
        self._checked: set[str] = set()
        self.info = DatasetInfo(
            name=name,
            num_classes=int(label_feature.num_classes),
            num_train_examples=int(splits["train"].num_examples),
            num_eval_examples=int(splits[eval_split].num_examples),
            train_split="train",
            eval_split=eval_split,
            data_dir=data_dir,
            class_names=tuple(getattr(label_feature, "names", ()) or ()) or None,
        )
        for split in ("train", eval_split):  # Before any training, not at the first evaluation.
            self.check_split(split)

    def __getstate__(self):  # Workers get the readers, not the builder.
        for split in self._builder.info.splits:
            self._reader(split)
        return {**self.__dict__, "_builder": None}

    def split_size(self, split):
        if self._builder is None:
            return len(self._reader(split))
        if split not in self._builder.info.splits:
            raise ValueError(f"{self.info.name} has no split {split!r}; it has {list(self._builder.info.splits)}")
        return int(self._builder.info.splits[split].num_examples)

    def check_split(self, split):
        """Every ArrayRecord file of `split` is there (a clear error now, not in a worker later)."""
        self.split_size(split)
        if self._builder is None or split in self._checked:
            return
        from etils import epath  # pylint: disable=g-import-not-at-top

        files = [epath.Path(p) for p in self._builder.info.splits[split].filepaths]
        present = {p.name for p in epath.Path(self._builder.data_dir).iterdir()}  # One listing, also on gs://.
        missing = [str(f) for f in files if f.name not in present]
        if missing:
            raise DatasetNotFoundError(
                f"{self.info.name}: the ArrayRecord file {missing[0]} of split {split!r} is missing "
                f"({len(missing)} of {len(files)} files). Copy it back, or prepare the dataset again: "
                f"{_tfds_build_command(self.info.name, self.info.data_dir or 'DATA_DIR')}"
            )
        self._checked.add(split)

    def _reader(self, split):
        if split not in self._readers:
            tfds = _tfds()
            self.check_split(split)
            self._readers[split] = self._builder.as_data_source(
                split=split, decoders={self._image_key: tfds.decode.SkipDecoding()}
            )
        return self._readers[split]

    def _example(self, split, index):
        return self._reader(split)[int(index)]

    def record(self, split, index):
        example = self._example(split, index)
        return example[self._image_key], int(example[self._label_key])

    def describe(self, split, index):
        where = f"{self.info.name}/{split}[{index}]"
        if self._name_key is None:
            return where
        try:
            file_name = self._example(split, index)[self._name_key]
        except Exception:  # pylint: disable=broad-except  # Only for a message.
            return where
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        return f"{where} ({file_name})"
