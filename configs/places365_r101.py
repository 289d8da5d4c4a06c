"""ResNet-101 3G-Net on Places365 (places365_small): the reference recipe
(paper 42.77 / 13.12 % top-1/top-5 error, ten crops).

The ResNet-50 recipe (`configs/places365_r50.py`) with the deeper backbone.

  python train.py --config=configs/places365_r101.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import places365_r50


def get_config():
    config = places365_r50.get_config()
    config.model.name = "resnet101_3g"
    return config
