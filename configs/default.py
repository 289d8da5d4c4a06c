"""Default config: ResNet-50 3G-Net on ImageNet-1K with the reference recipe.

Every field can be overridden on the command line, e.g.
  python train.py --config=configs/default.py --workdir=DIR \
      --config.batch_size=1024 --config.model.name=resnet50_isqrt --config.dataset.data_dir=gs://b/tfds

The other configs start from this one and change what differs.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    config = ml_collections.ConfigDict()

    # Model: gg_jax.models.create(**config.model, num_classes=...): any name of
    # gg_jax.models.names() and the options of that model under their own names; an option left
    # None takes the model's default. Baselines are a flag away: --config.model.name=resnet50_isqrt
    # (an option that only the 3G head has, set by a config, is then unset with
    # --config.model.num_blocks=None: a model refuses options it does not take).
    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50_3g"
    # Compute dtype: 'float32', or 'bfloat16' on TPU/GPU (float32 parameters, covariance head and
    # classifier); the input pipeline delivers images in it.
    config.model.dtype = config_dict.placeholder(str)
    config.model.reduction_dim = config_dict.placeholder(int)  # 1x1 reduction before the head (256; 0: none).
    config.model.num_blocks = config_dict.placeholder(int)  # 3G re-weighting blocks T (3).
    config.model.num_iters = config_dict.placeholder(int)  # Newton-Schulz iterations (5).
    config.model.reweighting = config_dict.placeholder(str)  # 3G re-weighting: '3g' | 'urm_v1' | 'urm_v2' | 'exact'.
    # reweighting='exact' (Eqn. 9 computed): MGGD shape beta (None: learned), c (None: Eqn. 7's c_n),
    # learn c, Newton-Schulz iterations of its inverse roots (None: num_iters).
    config.model.exact_beta = config_dict.placeholder(float)
    config.model.exact_c = config_dict.placeholder(float)
    config.model.exact_learn_c = config_dict.placeholder(bool)
    config.model.exact_num_iters = config_dict.placeholder(int)
    config.model.hidden = config_dict.placeholder(int)  # Channels inside each re-weighting block (64).
    config.model.lam = config_dict.placeholder(float)  # Robust estimator, Theorem 1: lambda in (0, 1] (1).
    config.model.estimator = config_dict.placeholder(bool)  # 3G: square root of the covariance (True).
    config.model.sqrt_method = config_dict.placeholder(str)  # 'newton_schulz' (3G, iSQRT) | 'eigh'.
    config.model.cov_eps = config_dict.placeholder(float)  # Ridge added to the covariance (1e-7).
    config.model.last_stride = config_dict.placeholder(int)  # Last stage's stride (1; 2 for _gap).
    config.model.dropout_rate = config_dict.placeholder(float)  # Before the classifier (0).
    # Covariance/root products: 'auto' (the platform's fastest float32-accurate) | 'highest' | 'bf16_6x' | 'tf32_3x'.
    config.model.matmul_precision = config_dict.placeholder(str)

    # Data: see gg_jax.data.get_dataset_info for the names.
    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "imagenet2012"
    config.dataset.data_dir = config_dict.placeholder(str)  # TFDS data_dir (local or gs://); None = TFDS default.
    # 'inception_crop' | 'scale_aug' | 'center_crop_flip' | ... (gg_jax.data.AUGMENTATIONS); None = dataset default.
    config.dataset.augment = config_dict.placeholder(str)
    config.dataset.train_resize_size = config_dict.placeholder(int)  # Of the centre-crop augments; None = image_size.
    # Grain worker processes that decode and augment; None = one per CPU core (0 for digits); 0 = a thread.
    config.dataset.num_workers = config_dict.placeholder(int)
    config.image_size = 224

    # Optimisation: SGD momentum 0.9, weight decay 1e-4 added to the gradient of every
    # parameter (BN and biases too), as the reference's torch.optim.SGD.
    config.batch_size = 256  # Global, over all devices and hosts.
    config.learning_rate = 0.1  # For a batch of 256; the rate used is learning_rate * batch_size / 256.
    config.lr_schedule = "step"  # 'step' | 'cosine' | 'constant'.
    config.lr_boundaries_epochs = (30, 60, 90)  # 'step': multiply by lr_decay_factor at these epochs.
    config.lr_decay_factor = 0.1
    config.warmup_epochs = 0.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    # Fine-tuning: the modules head_lr_modules (top-level: `fc` the classifier, `head` the
    # pooling head) learn head_lr_factor times faster (fast-MPN-COV's classifier_factor, applied
    # to its classifier only); 1.0 = one learning rate.
    config.head_lr_factor = 1.0
    config.head_lr_modules = ("fc",)
    # Top-level modules whose parameters are not trained (no update, no weight decay; their
    # BatchNorm statistics still follow the batches, as PyTorch's requires_grad=False does):
    # fast-MPN-COV's --freezed-layer, e.g. ("conv1", "bn1", "layer1"); `layer1` names layer1_0, ...
    config.freeze = ()
    # Gradient accumulation: each step's batch in this many micro-batches, one in memory at a
    # time (BatchNorm statistics per micro-batch); batch_size must be a multiple of it x devices.
    config.grad_accum_steps = 1
    config.num_epochs = 115.0
    config.num_train_steps = -1  # > 0 overrides num_epochs.
    config.seed = 0

    # Bookkeeping. Periods in steps: > 0 as is, 0 = once per epoch, < 0 = only at the end.
    config.log_every_steps = 100
    config.eval_every_steps = 0
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.async_checkpoints = True  # Write checkpoints in the background while training goes on.
    config.profile = False  # A profiler trace of 5 steps into the workdir (TensorBoard).

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 0  # 0 = batch_size.
    config.eval.ten_crop = False  # 10 crops (corners + centre, and mirrors), logits averaged.
    config.eval.resize_size = 256  # Shorter side before the centre crop(s) of image_size.
    config.eval.resize_mode = "shorter"  # 'shorter' side to resize_size, or 'square': both sides.
    config.eval.mirror_crop = False  # The centre crop and its mirror image, logits averaged.

    # Fine-tuning: start from any checkpoint `gg_jax.checkpoints.load` reads (a variables
    # directory of `python -m gg_jax.convert ... --out DIR`, a training workdir, or a released
    # checkpoint "pretrained:NAME"). The classifier is re-initialised when the number of classes
    # differs; init_from_backbone_only re-initialises the head too.
    config.init_from = ""
    config.init_from_backbone_only = False
    config.init_from_classifier = "fc"
    config.init_from_head_modules = ("head", "fc")
    return config
