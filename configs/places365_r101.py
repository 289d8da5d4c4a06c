"""ResNet-101 3G-Net on Places365, ten-crop evaluation (paper 42.77 / 13.12 % top-1/top-5 error).

`configs/places365_r50.py` with `model.name = "resnet101_3g"`.
"""

from configs import places365_r50


def get_config():
    config = places365_r50.get_config()
    config.model.name = "resnet101_3g"
    return config
