"""Input pipelines: TFDS datasets, image folders and the embedded digits, as global jax.Arrays.

    from gg_jax import data
    info = data.get_dataset_info('imagenet2012', data_dir)
    train = data.create_train_iterator('imagenet2012', data_dir=data_dir, global_batch_size=256)
    batch = next(train)  # {'image': [256, 224, 224, 3] float32, 'label': [256] int32}
    for batch in data.create_eval_iterator('imagenet2012', data_dir=data_dir, global_batch_size=256):
      ...  # + 'mask' [256] bool: False for padding of the last batch

Importing this package does not import TensorFlow; building a pipeline does, and
TensorFlow then runs on the CPU only (it never takes GPU memory).
"""

from gg_jax.data.datasets import (
    DIGITS,
    IMAGE_FOLDER,
    CorruptImageError,
    DatasetInfo,
    DatasetNotFoundError,
    get_dataset_info,
    shard_range,
)
from gg_jax.data.input_pipeline import (
    AUGMENTATIONS,
    create_eval_iterator,
    create_train_iterator,
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_batches,
)
from gg_jax.data.preprocessing import MEAN_RGB, STDDEV_RGB

__all__ = [
    "AUGMENTATIONS",
    "CorruptImageError",
    "DIGITS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "IMAGE_FOLDER",
    "MEAN_RGB",
    "STDDEV_RGB",
    "create_eval_iterator",
    "create_train_iterator",
    "eval_batches",
    "get_dataset_info",
    "num_eval_batches",
    "shard_range",
    "steps_per_epoch",
    "train_batches",
]
