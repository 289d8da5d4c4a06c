"""ResNet-50 3G-Net fine-tuned on CUB-200-2011 (TFDS `caltech_birds2011`: 5,994 train / 5,794 test
images of 200 bird species), the fine-grained recipe of `configs/finegrained.py`.

fast-MPN-COV's CUB transforms (jiangtaoxie/fast-MPN-COV@c430c78 imagepreprocess.py:L44-L63):
shorter side resized to 448 (`Resize(448)`), centre crop 448, random flip (train); the same
without the flip (test). The published accuracy it targets: iSQRT-COV
ResNet-50 88.1 % (fast-MPN-COV paper; 88.0 % reproduced by its authors), ResNet-101 88.7 %;
`--config.model.name=resnet50_isqrt` with its ImageNet weights is that model.

  tfds build caltech_birds2011 --data_dir=TFDS_DIR
  python train.py --config=configs/cub200_r50.py --workdir=DIR --config.init_from=/ckpt/r50_3g \
      --config.dataset.data_dir=TFDS_DIR
"""

from configs import finegrained


def get_config():
    return finegrained.get_config("cub200")
