"""ResNet-50 3G-Net fine-tuned on FGVC-Aircraft (100 aircraft variants; 6,667 trainval / 3,333 test
images), the fine-grained recipe of `configs/finegrained.py`.

TFDS has no FGVC-Aircraft builder: the images are read from a folder,
DATA_DIR/train/<variant>/*.jpg and DATA_DIR/val/<variant>/*.jpg (docs/finetuning.md says
how to make it from the official archive's trainval/test lists). fast-MPN-COV's Aircraft
transforms (jiangtaoxie/fast-MPN-COV@c430c78 imagepreprocess.py:L64-L83): both sides resized
to 512 (`Resize((512, 512))`), centre crop 448, random flip (train); the same without the flip
(test). The published accuracy it targets: iSQRT-COV ResNet-50 90.0 %
(fast-MPN-COV paper; 90.3 % reproduced by its authors), ResNet-101 91.4 %.

  python train.py --config=configs/aircraft_r50.py --workdir=DIR --config.init_from=/ckpt/r50_3g \
      --config.dataset.data_dir=DATA_DIR
"""

from configs import finegrained


def get_config():
    return finegrained.get_config("aircraft")
