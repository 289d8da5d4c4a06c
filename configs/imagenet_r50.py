"""ResNet-50 3G-Net on ImageNet-1K: the reference recipe (paper 21.31 / 5.61 % top-1/top-5 error).

- SGD over every parameter, momentum 0.9, weight decay 1e-4, lr 0.1 for a global batch of 256
  (csqlwang/3G-Net@bf3484d Train-ImageNet.py:L115-L117; scripts/ImageNet/train.sh:L13-L22);
  here scaled linearly with config.batch_size.
- Divided by 10 at epochs 30, 60, 90: `lr * 0.1 ** (epoch // 30)` (Train-ImageNet.py:L314-L321);
  115 epochs (scripts/ImageNet/train.sh:L13-L22).
- Train: `RandomResizedCrop(224)` + horizontal flip (Train-ImageNet.py:L138-L148); eval: one
  centre crop 224 of the 256-resized image (Train-ImageNet.py:L159-L167). No dropout (the
  final released models/ResNet_3G.py:L281-L286).

  python train.py --config=configs/imagenet_r50.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50_3g"
    config.dataset.name = "imagenet2012"
    config.dataset.augment = "inception_crop"
    config.num_epochs = 115.0
    config.lr_boundaries_epochs = (30, 60, 90)
    config.eval.ten_crop = False
    return config
