"""The quick-start demo: a small 3G-Net on the embedded digits dataset, on a CPU, in minutes.

  pip install -r requirements.txt && python train.py --config=configs/demo.py --workdir=/tmp/gg_demo

scikit-learn's 1,797 real 8x8 handwritten digits (bundled with the package: nothing is
downloaded), split 1,437 train / 360 test, upscaled to 48x48 RGB, trained with random
shifts. ResNet-18 backbone (last stage at stride 1: a 3x3 final map) with the 3G head on
64 reduced channels: one re-weighting block (T = 1, the paper's Table 1 variant; T = 3
learns much more slowly from scratch at this size), iSQRT square root of the covariance,
linear classifier.
Six epochs (264 steps of 32 images), SGD momentum 0.9 with cosine decay; its top-1 error
on the 360 test digits and its wall time are in BENCHMARKS.md ("Demo").
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet18_3g"
    config.model.reduction_dim = 64
    config.model.num_blocks = 1
    config.dataset.name = "digits"
    # 48 px: the last feature map is 3x3 (with the stride-1 last stage).
    config.image_size = 48
    config.batch_size = 32
    config.learning_rate = 0.4  # For a batch of 256: 0.05 at batch 32.
    config.lr_schedule = "cosine"
    config.warmup_epochs = 0.0
    config.num_epochs = 6.0
    config.log_every_steps = 22
    config.eval_every_steps = 0  # Every epoch (44 steps).
    config.checkpoint_every_steps = 0  # Every epoch.
    config.keep_checkpoints = 2
    config.eval.batch_size = 120
    return config
