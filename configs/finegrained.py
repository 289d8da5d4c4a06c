"""The fine-grained fine-tuning recipe shared by the CUB-200-2011, Stanford Cars and
FGVC-Aircraft configs (fast-MPN-COV's `finetune/finetune.sh`), starting from ImageNet weights.

  python -m gg_jax.convert --arch resnet50_3g --torch_checkpoint 3gnet_r50_imagenet.pth.tar --out /ckpt/r50_3g
  python train.py --config=configs/cub200_r50.py --workdir=DIR --config.init_from=/ckpt/r50_3g \
      --config.dataset.data_dir=TFDS_DIR

448 x 448 inputs, SGD momentum 0.9, weight decay 1e-3, batch 10, learning rate 1.2e-3 for
the backbone (no decay within the 100 epochs: fast-MPN-COV's step schedule drops it at epoch
100) and 5x that for the pooling head and the classifier (`head_lr_factor`; fast-MPN-COV's
`classifier_factor`); the classifier is re-initialised for the dataset's classes. The
dataset configs set the resize before the 448 centre crops (docs/finetuning.md).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50_3g"
    config.init_from = ""  # Converted ImageNet weights: --config.init_from=DIR (required for the recipe).
    config.image_size = 448
    config.batch_size = 10
    config.learning_rate = 1.2e-3 * 256 / 10  # For a batch of 256: 1.2e-3 at batch 10.
    config.lr_schedule = "constant"
    config.weight_decay = 1e-3
    config.momentum = 0.9
    config.num_epochs = 100.0
    config.head_lr_factor = 5.0
    config.log_every_steps = 100
    config.eval_every_steps = 0  # Every epoch.
    config.checkpoint_every_steps = 0  # Every epoch.
    config.eval.batch_size = 10
    config.eval.resize_size = 448
    return config
