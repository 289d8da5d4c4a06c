"""ResNet-50 3G-Net on Places365 (places365_small, 256x256 images): the reference recipe
(paper 43.07 / 13.34 % top-1/top-5 error, ten crops).

The ImageNet recipe (`configs/imagenet_r50.py`) but 55 epochs: the reference's
`lr * 0.1 ** (epoch // 30)` gives 0.1 for epochs 0-29 and 0.01 for 30-54. Evaluation
averages the logits of ten crops (four corners, centre, and their mirror images) of the
256-resized image.

  python train.py --config=configs/places365_r50.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import imagenet_r50


def get_config():
    config = imagenet_r50.get_config()
    config.dataset.name = "places365_small"
    config.num_epochs = 55.0
    config.eval.ten_crop = True
    return config
