"""ResNet-50 3G-Net fine-tuned on Stanford Cars (TFDS `cars196`: 8,144 train / 8,041 test images of
196 car models), the fine-grained recipe of `configs/finegrained.py`.

fast-MPN-COV's Cars transforms (jiangtaoxie/fast-MPN-COV@c430c78 imagepreprocess.py:L84-L101):
the whole image squeezed to 448 x 448 (`Resize((448, 448))`) and a random flip (train); the
same squeeze for evaluation, with no crop (the 448 centre crop of a 448 image is all of it).
The published accuracy it targets: iSQRT-COV ResNet-50 92.8 % (fast-MPN-COV paper; 92.3 %
reproduced by its authors), ResNet-101 93.3 %.

  tfds build cars196 --data_dir=TFDS_DIR
  python train.py --config=configs/cars196_r50.py --workdir=DIR --config.init_from=/ckpt/r50_3g \
      --config.dataset.data_dir=TFDS_DIR
"""

from configs import finegrained


def get_config():
    return finegrained.get_config("cars196")
