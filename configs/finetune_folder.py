"""Fine-tune a 3G-Net pretrained on ImageNet on your own image folder.

  python -m gg_jax.convert --arch resnet50_3g --torch_checkpoint resnet50_3g.pth.tar --out /data/r50_3g
  python train.py --config=configs/finetune_folder.py --workdir=DIR \
      --config.dataset.data_dir=/data/my_images --config.init_from=/data/r50_3g

`data_dir` holds train/<class>/*.jpg and val/<class>/*.jpg. Every variable is loaded from
`init_from` (a converted variables directory or one of our training workdirs) except the
classifier `fc`, re-initialised for your number of classes; set
--config.init_from_backbone_only=True to re-initialise the 3G head too. A smaller learning
rate than from scratch, 30 epochs, divided by 10 at epochs 10 and 20.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50_3g"
    config.dataset.name = "image_folder"
    config.dataset.augment = "inception_crop"
    config.init_from = ""  # Set with --config.init_from=DIR (empty = train from scratch).
    config.batch_size = 64
    config.learning_rate = 0.04  # For a batch of 256: 0.01 at batch 64.
    config.num_epochs = 30.0
    config.lr_boundaries_epochs = (10, 20)
    config.log_every_steps = 20
    config.eval_every_steps = 0  # Every epoch.
    config.checkpoint_every_steps = 0  # Every epoch.
    return config
