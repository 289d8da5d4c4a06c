"""ResNet-101 3G-Net on Places365 (places365_small, 256x256 images): the reference recipe
(paper 42.77 / 13.12 % top-1/top-5 error, ten crops).

As ImageNet but 55 epochs: the reference's `lr * 0.1 ** (epoch // 30)` gives 0.1 for
epochs 0-29 and 0.01 for 30-54. Evaluation averages the logits of ten crops (four
corners, centre, and their mirror images) of the 256-resized image.

  python train.py --config=configs/places365_r101.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""
from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet101_3g"
    config.dataset.name = "places365_small"
    config.dataset.augment = "inception_crop"
    config.num_epochs = 55.0
    config.eval.ten_crop = True
    return config
