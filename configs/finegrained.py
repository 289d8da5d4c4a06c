"""The fine-grained fine-tuning recipe shared by the CUB-200-2011, Stanford Cars and
FGVC-Aircraft configs: fast-MPN-COV's `finetune/finetune.sh` run through its `main.py`
(jiangtaoxie/fast-MPN-COV@c430c78), starting from ImageNet weights.

  python train.py --config=configs/cub200_r50.py --workdir=DIR --config.init_from=pretrained:resnet50_3g_imagenet \
      --config.dataset.data_dir=TFDS_DIR

- 448 x 448 inputs, batch 10, 100 epochs, lr 1.2e-3 (finetune.sh:L50-L66), SGD momentum 0.9
  (main.py:L158-L160), here scaled linearly with config.batch_size.
- Weight decay 1e-4: finetune.sh sets `weight_decay=1e-3` but never passes `--wd` to main.py
  (finetune.sh:L84-L100, L105-L122), so main.py's default `--weight-decay 1e-4` (main.py:L47-L48)
  is what the runs used; on every parameter, the classifier's too (main.py:L141-L148).
- No decay within the 100 epochs: `--lr-method step --lr-params 100` drops the rate only at
  epoch indices below the 100 epochs (main.py:L406-L417).
- The classifier (`fc`) learns 5x faster (`classifier_factor=5`, finetune.sh:L50-L66); the
  backbone and the pooling head (`features`, `representation`) learn at lr (main.py:L141-L148).
- The classifier is re-initialised for the dataset's classes (model_init.py:L38-L39).
- Evaluation averages the logits of the centre crop and the centre crop of the mirrored image
  (`CenterCropWithFlip`, imagepreprocess.py:L8-L40; fused by the mean of the logits,
  main.py:L336-L343), at every evaluation here (fast-MPN-COV's per-epoch validation uses the
  centre crop alone, its final evaluation both).
The dataset configs set the resizes before the 448 crops (imagepreprocess.py:L42-L101).
"""

from configs import default

# The dataset configs' sources and transforms (imagepreprocess.py:L44-L101): train crop after
# the resize (`augment`: shorter side or both sides resized, centre crop, flip) and eval resize.
DATASETS = {
    "cub200": dict(name="caltech_birds2011", augment="center_crop_flip", resize=448, resize_mode="shorter"),
    "cars196": dict(name="cars196", augment="square_center_crop_flip", resize=448, resize_mode="square"),
    "aircraft": dict(name="image_folder", augment="square_center_crop_flip", resize=512, resize_mode="square"),
}


def get_config(dataset: str = "cub200"):
    """The recipe on `dataset`, a key of `DATASETS`."""
    spec = DATASETS[dataset]
    config = default.get_config()
    config.dataset.name = spec["name"]
    config.dataset.augment = spec["augment"]
    config.dataset.train_resize_size = spec["resize"]
    config.eval.resize_mode = spec["resize_mode"]
    config.eval.resize_size = spec["resize"]
    config.model.name = "resnet50_3g"
    config.init_from = ""  # ImageNet weights: --config.init_from=DIR or pretrained:NAME (required).
    config.image_size = 448
    config.batch_size = 10
    config.learning_rate = 1.2e-3 * 256 / 10  # For a batch of 256: 1.2e-3 at batch 10.
    config.lr_schedule = "constant"
    config.weight_decay = 1e-4
    config.momentum = 0.9
    config.num_epochs = 100.0
    config.head_lr_factor = 5.0
    config.head_lr_modules = ("fc",)
    config.log_every_steps = 100
    config.eval_every_steps = 0  # Every epoch.
    config.checkpoint_every_steps = 0  # Every epoch.
    config.eval.batch_size = 10
    config.eval.mirror_crop = True
    return config
