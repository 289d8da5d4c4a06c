"""ResNet-50 3G-Net on ImageNet-1K: the reference recipe (paper 21.31 / 5.61 % top-1/top-5 error).

SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 (scaled linearly with the batch),
divided by 10 at epochs 30, 60, 90; 115 epochs; random-resized crop 224 + flip; eval
one centre crop 224 of the 256-resized image.

  python train.py --config=configs/imagenet_r50.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50_3g"
    config.dataset.name = "imagenet2012"
    config.dataset.augment = "inception_crop"
    config.num_epochs = 115.0
    config.eval.ten_crop = False
    return config
