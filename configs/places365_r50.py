"""ResNet-50 3G-Net on Places365 (places365_small, 256x256 images): the reference recipe
(paper 43.07 / 13.34 % top-1/top-5 error, ten crops).

The ImageNet recipe (`configs/imagenet_r50.py`) with Places365's own schedule and evaluation:
- 55 epochs (`--epochs 55`: csqlwang/3G-Net@bf3484d scripts/Places365/train.sh:L13-L22).
- Learning rate 0.1, multiplied by 0.1 once the 0-based epoch is > 30, > 40, > 45 and > 50: 0.1
  for epochs 0-30, 0.01 for 31-40, 1e-3 for 41-45, 1e-4 for 46-50, 1e-5 for 51-54
  (`adjust_learning_rate`, whose `epoch // 30` line is commented out:
  csqlwang/3G-Net@bf3484d Train-Places365.py:L314-L331).
- Evaluation averages the logits of ten crops (four corners, centre, and their mirror images)
  of the 256-resized image (`Resize(256)`, `TenCrop(224)`, the mean of the crops' logits:
  csqlwang/3G-Net@bf3484d Test-Places365-10-Crop.py:L159-L172, L266-L279).

  python train.py --config=configs/places365_r50.py --workdir=DIR --config.dataset.data_dir=TFDS_DIR
"""

from configs import imagenet_r50


def get_config():
    config = imagenet_r50.get_config()
    config.dataset.name = "places365_small"
    config.num_epochs = 55.0
    config.lr_boundaries_epochs = (31, 41, 46, 51)
    config.eval.ten_crop = True
    return config
