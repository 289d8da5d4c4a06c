"""Metric writers without TensorFlow: log lines and TensorBoard event files.

`create_writer(logdir)` returns a writer with the methods of clu's `MetricWriter`
(`write_scalars`, `write_images`, `write_texts`, `write_histograms`, `write_hparams`,
`write_summaries`, `flush`, `close`): each call is logged as clu's `LoggingWriter`
logs it (`[step] key=value, ...`) and, unless `just_logging`, written to an event
file in `logdir` with TensorBoard's own event writer, which TensorBoard reads as it
reads `tf.summary` files. (clu's writers cannot be used: importing
`clu.metric_writers` imports TensorFlow.)

    writer = create_writer(workdir, just_logging=jax.process_index() > 0)
    writer.write_scalars(step, {'train/loss': 0.7})
    writer.write_images(step, {'diagnose/beta': png_pixels[None]})  # [N, H, W, C] uint8
    writer.close()
"""

from __future__ import annotations

import abc
import io
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging


class MetricWriter(abc.ABC):
    """The writing methods of clu's `MetricWriter` that gg_jax uses."""

    @abc.abstractmethod
    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None): ...

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Any]): ...

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Any]):
        """images[key]: [N, H, W, C] (C = 1, 3 or 4) uint8, or float in [0, 1]."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]): ...

    @abc.abstractmethod
    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None): ...

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]): ...

    @abc.abstractmethod
    def flush(self): ...

    @abc.abstractmethod
    def close(self): ...


def _histogram(array: np.ndarray, num_buckets: int | None) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """(counts, edges) of equal-width buckets over the flattened array, as clu computes them."""
    array = np.asarray(array, np.float64).ravel()
    if array.size == 0:
        return None, None
    lo, hi = array.min(), array.max()
    if lo == hi:
        return np.asarray([array.size]), np.asarray([hi - 0.5, hi + 0.5])
    counts, edges = np.histogram(array, bins=max(num_buckets or 30, 2), range=(lo, hi))
    return counts, edges


class LoggingWriter(MetricWriter):
    """Everything to the INFO log, in clu's `LoggingWriter` format."""

    def write_summaries(self, step, values, metadata=None):
        logging.info("[%d] Got raw tensors: %s.", step, {k: np.shape(v) for k, v in values.items()})

    def write_scalars(self, step, scalars):
        values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(scalars.items())]
        logging.info("[%d] %s", step, ", ".join(values))

    def write_images(self, step, images):
        logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})

    def write_texts(self, step, texts):
        logging.info("[%d] Got texts: %s.", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        num_buckets = num_buckets or {}
        for key, value in arrays.items():
            counts, edges = _histogram(value, num_buckets.get(key))
            if counts is not None:
                buckets = ", ".join(f"[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}" for i, c in enumerate(counts))
                logging.info("[%d] Histogram for %r = {%s}", step, key, buckets)

    def write_hparams(self, hparams):
        logging.info("[Hyperparameters] %s", hparams)

    def flush(self):
        logging.flush()

    def close(self):
        self.flush()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


class TensorBoardWriter(MetricWriter):
    """Event files in `logdir`, written by TensorBoard's `EventFileWriter` (a background thread)."""

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter  # pylint: disable=g-import-not-at-top

        self._writer = EventFileWriter(str(logdir))

    def _add(self, step: int, values: Sequence[Any]):
        from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top

        event = event_pb2.Event(step=int(step), wall_time=time.time(), summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)

    def write_summaries(self, step, values, metadata=None):
        del metadata
        scalars = {k: v for k, v in values.items() if np.ndim(v) == 0}
        if scalars:
            self.write_scalars(step, scalars)

    def write_scalars(self, step, scalars):
        from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
        self._add(step, values)

    def write_images(self, step, images):
        from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

        values = []
        for key, batch in images.items():
            batch = np.asarray(batch)
            if batch.ndim == 3:  # One image [H, W, C].
                batch = batch[None]
            if batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
                raise ValueError(f"images[{key!r}] must be [N, H, W, C] with C in 1, 3, 4, not {batch.shape}")
            for i, image in enumerate(batch):
                tag = key if len(batch) == 1 else f"{key}/image/{i}"
                encoded = summary_pb2.Summary.Image(
                    height=image.shape[0],
                    width=image.shape[1],
                    colorspace=image.shape[-1],
                    encoded_image_string=_png(image),
                )
                values.append(summary_pb2.Summary.Value(tag=tag, image=encoded))
        self._add(step, values)

    def write_texts(self, step, texts):
        from tensorboard.compat.proto import summary_pb2, tensor_pb2  # pylint: disable=g-import-not-at-top

        metadata = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        values = [
            summary_pb2.Summary.Value(
                tag=k, metadata=metadata, tensor=tensor_pb2.TensorProto(dtype=7, string_val=[str(v).encode()])
            )  # dtype 7 = DT_STRING
            for k, v in texts.items()
        ]
        self._add(step, values)

    def write_histograms(self, step, arrays, num_buckets=None):
        from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top

        num_buckets = num_buckets or {}
        values = []
        for key, array in arrays.items():
            counts, edges = _histogram(array, num_buckets.get(key))
            if counts is None:
                continue
            flat = np.asarray(array, np.float64).ravel()
            histo = summary_pb2.HistogramProto(
                min=float(flat.min()),
                max=float(flat.max()),
                num=float(flat.size),
                sum=float(flat.sum()),
                sum_squares=float(np.square(flat).sum()),
                bucket_limit=[float(e) for e in edges[1:]],
                bucket=[float(c) for c in counts],
            )
            values.append(summary_pb2.Summary.Value(tag=key, histo=histo))
        self._add(step, values)

    def write_hparams(self, hparams):
        from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
        from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top

        summary = summary_v2.hparams_pb({k: v for k, v in hparams.items() if isinstance(v, bool | int | float | str)})
        self._writer.add_event(event_pb2.Event(step=0, wall_time=time.time(), summary=summary))

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter(MetricWriter):
    """Every call to each of `writers`."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = tuple(writers)

    def _each(self, method: str, *args, **kwargs):
        for writer in self._writers:
            getattr(writer, method)(*args, **kwargs)

    def write_summaries(self, step, values, metadata=None):
        self._each("write_summaries", step, values, metadata)

    def write_scalars(self, step, scalars):
        self._each("write_scalars", step, scalars)

    def write_images(self, step, images):
        self._each("write_images", step, images)

    def write_texts(self, step, texts):
        self._each("write_texts", step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self._each("write_histograms", step, arrays, num_buckets)

    def write_hparams(self, hparams):
        self._each("write_hparams", hparams)

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")


def create_writer(logdir: str, *, just_logging: bool = False) -> MetricWriter:
    """Log lines (clu's `LoggingWriter` format) and, unless `just_logging` (e.g. on every process
    but the first), TensorBoard event files in `logdir`."""
    if just_logging:
        return LoggingWriter()
    return MultiWriter([LoggingWriter(), TensorBoardWriter(logdir)])
