"""ResNet-101 3G-Net on ImageNet-1K (paper 20.37 / 5.17 % top-1/top-5 error): the recipe of
`configs/imagenet_r50.py` with the deeper backbone (the authors' scripts give the ResNet-50
command; csqlwang/3G-Net@bf3484d README.md:L47 says to change the model name for others).

  python train.py --config=configs/imagenet_r101.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import imagenet_r50


def get_config():
    config = imagenet_r50.get_config()
    config.model.name = "resnet101_3g"
    return config
