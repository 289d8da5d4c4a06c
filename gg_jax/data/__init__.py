"""Input pipelines on Grain: TFDS datasets (ArrayRecord), image folders, the embedded digits,
synthetic ImageNet-shaped images; global jax.Array batches out.

    from gg_jax import data
    info = data.get_dataset_info('imagenet2012', data_dir)
    train = data.create_train_iterator('imagenet2012', data_dir=data_dir, global_batch_size=256)
    batch = next(train)  # {'image': [256, 224, 224, 3] float32, 'label': [256] int32}
    state = train.get_state()  # JSON; train.set_state(state) resumes at the same batch
    for batch in data.create_eval_iterator('imagenet2012', data_dir=data_dir, global_batch_size=256):
      ...  # + 'mask' [256] bool: False for padding of the last batch

Nothing here imports TensorFlow. Datasets are chosen by name from registries:
`SOURCES` (plus any TFDS name) and `AUGMENTATIONS`.

Modules, each importing only those before it: `decoding` (bytes to pixels),
`preprocessing` (torchvision's transforms), `augmentations` (the registry),
`per_example` (what the workers run); `sources` (the interface and registry),
`tfds_source`, `datasets` (the built-in sources, lookup by name); `input_pipeline`
(process-local NumPy batches), `global_batches` (global `jax.Array` batches).
"""

from gg_jax.data.augmentations import AUGMENTATIONS, register_augmentation
from gg_jax.data.datasets import DIGITS, IMAGE_FOLDER, SYNTHETIC, get_dataset_info
from gg_jax.data.global_batches import GlobalIterator, create_eval_iterator, create_train_iterator
from gg_jax.data.input_pipeline import (
    InputWorkerError,
    default_num_workers,
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_batches,
)
from gg_jax.data.preprocessing import MEAN_RGB, STDDEV_RGB, eval_image
from gg_jax.data.sources import (
    SOURCES,
    CorruptImageError,
    DatasetFormatError,
    DatasetInfo,
    DatasetNotFoundError,
    register_source,
    shard_range,
)

__all__ = [
    "AUGMENTATIONS",
    "CorruptImageError",
    "DIGITS",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "GlobalIterator",
    "IMAGE_FOLDER",
    "InputWorkerError",
    "MEAN_RGB",
    "SOURCES",
    "STDDEV_RGB",
    "SYNTHETIC",
    "create_eval_iterator",
    "create_train_iterator",
    "default_num_workers",
    "eval_batches",
    "eval_image",
    "get_dataset_info",
    "num_eval_batches",
    "register_augmentation",
    "register_source",
    "shard_range",
    "steps_per_epoch",
    "train_batches",
]
