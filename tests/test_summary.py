"""gg_jax.summary: TensorBoard event files without TensorFlow, read back with TensorBoard's reader."""

import numpy as np

from gg_jax import summary


def _accumulator(logdir):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def test_event_file_reads_back(tmp_path, caplog):
    writer = summary.create_writer(str(tmp_path))
    with caplog.at_level("INFO"):
        writer.write_scalars(3, {"train/loss": 0.25, "train/top1_error": np.float32(0.5)})
        writer.write_scalars(7, {"train/loss": 0.125})
    image = np.zeros((2, 6, 5, 3), np.uint8)
    image[1, :, :, 0] = 255
    writer.write_images(7, {"diagnose/figure": image})
    writer.write_texts(7, {"notes": "hello"})
    writer.write_histograms(7, {"weights": np.arange(100.0)}, num_buckets={"weights": 10})
    writer.write_hparams({"learning_rate": 0.1, "model": "resnet18_3g"})
    writer.flush()
    writer.close()
    # clu's LoggingWriter lines.
    assert "[3] train/loss=0.25, train/top1_error=0.5" in caplog.text and "[7] train/loss=0.125" in caplog.text

    acc = _accumulator(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(3, 0.25), (7, 0.125)]
    assert acc.Scalars("train/top1_error")[0].value == 0.5
    tags = acc.Tags()
    assert set(tags["images"]) == {"diagnose/figure/image/0", "diagnose/figure/image/1"}
    red = acc.Images("diagnose/figure/image/1")[0]
    assert (red.step, red.width, red.height) == (7, 5, 6)
    import io

    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(red.encoded_image_string)))
    assert pixels.shape == (6, 5, 3) and (pixels[..., 0] == 255).all() and not pixels[..., 1:].any()
    histo = acc.Histograms("weights")[0].histogram_value
    assert histo.num == 100 and list(histo.bucket) == [10.0] * 10
    assert "notes" in tags["tensors"]


def test_just_logging_writes_no_file(tmp_path, caplog):
    writer = summary.create_writer(str(tmp_path / "logs"), just_logging=True)
    with caplog.at_level("INFO"):
        writer.write_scalars(1, {"eval/top1_error": 0.0138889})
    writer.close()
    assert "[1] eval/top1_error=0.0138889" in caplog.text
    assert not (tmp_path / "logs").exists()
