"""The authors' released checkpoints, one frozen `Entry` each, and those that cannot be loaded yet.

Every fact below is copied from the authors' pages at the commits named in the comments
(`csqlwang/3G-Net@bf3484d`, `jiangtaoxie/fast-MPN-COV@c430c78`, torchvision 0.29.1's
`torchvision/models/resnet.py` at `pytorch/vision@1f1a920`); none was measured here. No
file was downloaded to write it, so no entry has a full sha256 yet: torchvision's carry the
leading hex digits of theirs in the file name (torch.hub's convention), the others none (the
first download's digest is recorded in the cache, see `gg_jax.pretrained`).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

# Evaluation preprocessing, PyTorch side (torchvision PIL transforms on RGB images).
_NORMALISE = "/255, normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
IMAGENET_EVAL = f"shorter side to 256 (PIL bilinear, antialiased), centre crop 224, {_NORMALISE}"
IMAGENET_EVAL_232 = f"shorter side to 232 (bilinear, antialiased), centre crop 224, {_NORMALISE}"
PLACES365_EVAL = (
    "shorter side to 256 (Places365-Standard images are 256x256 already), ten crops 224 (4 corners and "
    f"the centre, and the same of the mirror image), each {_NORMALISE}; the 10 logits averaged"
)
# The class lists, by the dataset whose label order they follow.
IMAGENET_CLASSES = "imagenet2012: the 1000 ILSVRC-2012 synsets in sorted WordNet-id order (ImageFolder's = TFDS's)"
PLACES365_CLASSES = (
    "places365: the 365 Places365-Standard categories in ImageFolder order (sorted folder names; "
    "not checked against TFDS places365_small's order)"
)
NO_LICENCE_3GNET = (
    "none stated: csqlwang/3G-Net has no licence file and its README no licence statement, so default "
    "copyright applies (all rights reserved); ask the authors before redistributing the weights"
)
MIT_FAST_MPN_COV = (
    'MIT, "Copyright (c) 2018 Peihua Li and Jiangtao Xie" (fast-MPN-COV LICENSE); no separate terms for the '
    'weights (src/representation/MPNCOV.py\'s own header says "All rights reserved")'
)
TORCHVISION_TERMS = (
    "torchvision's code is BSD-3-Clause; of its weights it says they \"may have their own licenses or terms and "
    "conditions derived from the dataset used for training\" (ImageNet's terms); no specific licence"
)


@dataclasses.dataclass(frozen=True)
class Published:
    """The accuracy an entry should reproduce: errors in percent, on the dataset's validation split."""

    top1_error: float
    top5_error: float
    ten_crop: bool  # 10 crops (logits averaged), else one centre crop
    resize_size: int  # shorter side before the crop(s)
    image_size: int  # the crop's side
    source: str  # where the numbers are published (repository@commit file:lines)

    @property
    def protocol(self) -> str:
        crops = "10 crops" if self.ten_crop else "1 centre crop"
        return f"{crops} of {self.image_size} from the {self.resize_size}-resized image"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One released checkpoint: where to get it, how to convert it, what it should reproduce.

    name: the registry name (`gg_jax.pretrained.load(name)`, `pretrained:NAME`).
    architecture: the `gg_jax.models` name it converts to; `model_options` are the options
      that make our model compute the authors' (e.g. fast-MPN-COV adds no ridge: cov_eps=0).
    num_classes, classes, dataset: the classifier's size, its class list (by name) and the
      gg_jax dataset (`config.dataset.name`) it is evaluated on.
    file_name: the name the file is cached under (the authors' own where known).
    urls: direct HTTP(S) sources, tried in order; google_drive_id: the Google Drive file
      (downloaded with gdown); baidu_url, baidu_code: Baidu Pan link and extraction code,
      for a manual download (`--from_file`).
    sha256: the file's sha256 hexdigest, or its leading hex digits where only those are
      published (torchvision's file names); "" where nothing is published.
    convention: `gg_jax.convert`'s key convention of the file.
    published: the accuracy it should reproduce, and where that number comes from.
    preprocessing: the evaluation preprocessing it expects (PyTorch side).
    licence: the licence or terms the authors state, or that they state none.
    init_from_backbone_only: as `config.init_from`, only its backbone is taken (the head and
      classifier of the model being fine-tuned stay fresh): a plain ResNet's classifier
      fits no covariance head.
    num_params, file_size_mib: the published parameter count / file size (MiB), where given.
    notes: what a user should know (unverified file names, dead mirrors, ...).
    """

    name: str
    architecture: str
    num_classes: int
    classes: str
    dataset: str
    file_name: str
    convention: str
    published: Published
    preprocessing: str
    licence: str
    urls: tuple[str, ...] = ()
    google_drive_id: str = ""
    baidu_url: str = ""
    baidu_code: str = ""
    sha256: str = ""
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    init_from_backbone_only: bool = False
    num_params: int | None = None
    file_size_mib: float | None = None
    notes: str = ""

    def __post_init__(self):
        object.__setattr__(self, "model_options", types.MappingProxyType(dict(self.model_options)))

    @property
    def google_drive_url(self) -> str:
        return f"https://drive.google.com/file/d/{self.google_drive_id}/view" if self.google_drive_id else ""

    def sources(self) -> list[str]:
        """Where to download the file by hand, one line each."""
        out = list(self.urls)
        if self.google_drive_id:
            out.append(f"Google Drive {self.google_drive_url}")
        if self.baidu_url:
            code = f" (extraction code {self.baidu_code})" if self.baidu_code else " (no extraction code published)"
            out.append(f"Baidu Pan {self.baidu_url}{code}")
        return out


_PRESUMED = "The file name is presumed from the ResNet-50 one (the authors' scripts name only that)."


def _3gnet(depth: int, dataset: str, drive_id: str, baidu: tuple[str, str], errors, readme_line: int) -> Entry:
    """A released 3G-Net: `baidu` = (link, extraction code), `errors` = (top-1, top-5) % from
    the README row `readme_line` (ImageNet one crop, Places365 ten crops)."""
    imagenet = dataset == "imagenet"
    return Entry(
        name=f"resnet{depth}_3g_{dataset}",
        architecture=f"resnet{depth}_3g",
        num_classes=1000 if imagenet else 365,
        classes=IMAGENET_CLASSES if imagenet else PLACES365_CLASSES,
        dataset="imagenet2012" if imagenet else "places365_small",
        file_name=f"ResNet{depth}-3G-{'ImageNet' if imagenet else 'Places365'}.pth.tar",
        convention="3gnet",
        preprocessing=IMAGENET_EVAL if imagenet else PLACES365_EVAL,
        licence=NO_LICENCE_3GNET,
        google_drive_id=drive_id,
        baidu_url=baidu[0],
        baidu_code=baidu[1],
        published=Published(*errors, not imagenet, 256, 224, f"{_3G} README.md:L{readme_line}"),
        notes=_PRESUMED if depth != 50 else "",
    )


def _fast_mpn_cov(depth: int, **kwargs) -> Entry:
    return Entry(
        name=f"resnet{depth}_isqrt_imagenet",
        architecture=f"resnet{depth}_isqrt",
        num_classes=1000,
        classes=IMAGENET_CLASSES,
        dataset="imagenet2012",
        convention="fast_mpn_cov",
        preprocessing=IMAGENET_EVAL,
        licence=MIT_FAST_MPN_COV,
        # fast-MPN-COV's Covpool adds no ridge to the covariance (ours adds 1e-7 I by default):
        # jiangtaoxie/fast-MPN-COV@c430c78 src/representation/MPNCOV.py:L80-L94.
        model_options={"cov_eps": 0.0},
        notes=(
            "The file name is the one fast-MPN-COV's pretrained=True looks for; the Drive file's own name is not "
            "known here. Not used: http://jtxie.com/models/ (unreachable, fast-MPN-COV issue #19) and the Drive/"
            "Baidu links before commit 01f6758 (2020-01-08, 'update model'): those models predate the retrain "
            "after the Triuvec order change (issue #20) and give chance-level ImageNet accuracy."
        ),
        **kwargs,
    )


def _torchvision(depth: int, version: int, digest: str, published, num_params: int, file_size_mib: float) -> Entry:
    """A torchvision ResNet: its file is `resnet{depth}-{digest}.pth`, the digest being the first
    hex digits of the file's sha256; `published` = (top-1 error, top-5 error, resize, lines of
    torchvision/models/resnet.py)."""
    top1, top5, resize, lines = published
    file_name = f"resnet{depth}-{digest}.pth"
    return Entry(
        name=f"torchvision_resnet{depth}" + ("_v2" if version == 2 else ""),
        architecture=f"resnet{depth}_gap",
        num_classes=1000,
        classes=IMAGENET_CLASSES,
        dataset="imagenet2012",
        convention="torchvision",
        preprocessing=IMAGENET_EVAL if version == 1 else IMAGENET_EVAL_232,
        licence=TORCHVISION_TERMS,
        init_from_backbone_only=True,
        file_name=file_name,
        urls=(f"https://download.pytorch.org/models/{file_name}",),
        sha256=digest,
        published=Published(top1, top5, False, resize, 224, f"{_TV} torchvision/models/resnet.py:{lines}"),
        num_params=num_params,
        file_size_mib=file_size_mib,
    )


_3G = "csqlwang/3G-Net@bf3484d"
_FM = "jiangtaoxie/fast-MPN-COV@c430c78"
_TV = "pytorch/vision@1f1a920 (torchvision 0.29.1)"

_ENTRIES = (
    # csqlwang/3G-Net@bf3484d README.md:L49-L69 (row L54): ImageNet "in 1-Crop testing" (L51);
    # file name: scripts/ImageNet/val-download.sh:L22.
    _3gnet(
        50,
        "imagenet",
        "1hN8Q5rlIOQa0YYkcen9jpN9YatPB1j4D",
        ("https://pan.baidu.com/s/1C8uNk0PJCanDaNwol0gR1Q", "74ot"),
        (21.34, 5.70),
        54,
    ),
    # csqlwang/3G-Net@bf3484d README.md:L49-L69 (row L55); the file name is presumed (not written anywhere).
    _3gnet(
        101,
        "imagenet",
        "14vJLFYqlRJyiIHjoG0lOm0RhB1NRF4Xc",
        ("https://pan.baidu.com/s/1J9f39L0FXRlqxORMa0OkJg", "wmzp"),
        (20.40, 5.21),
        55,
    ),
    # csqlwang/3G-Net@bf3484d README.md:L49-L69 (row L60): Places365 "in 10-Crop testing" (L57);
    # file name: scripts/Places365/val-download.sh:L22.
    _3gnet(
        50,
        "places365",
        "1VMVw35h-iW-d4AYH6ecV58_kECDyNzib",
        ("https://pan.baidu.com/s/19da3ZDTZS0AtGP7FjDryvw", "fnkt"),
        (43.07, 13.44),
        60,
    ),
    # csqlwang/3G-Net@bf3484d README.md:L49-L69 (row L61); the file name is presumed.
    _3gnet(
        101,
        "places365",
        "1dOCeQkLBwR3AJSiH8w1qTq9-kT00T7_G",
        ("https://pan.baidu.com/s/17N5edFaP1B5YTaWS6ajT0Q", "1dd9"),
        (42.82, 13.00),
        61,
    ),
    # jiangtaoxie/fast-MPN-COV@c430c78 README.md:L24-L67 (rows L49-L57): single crop 224 (L24, L33-L38),
    # the "reproduce" column (the released file); 217.3MB; no Baidu extraction code published.
    # File name: src/network/mpncovresnet.py:L10-L13.
    _fast_mpn_cov(
        50,
        file_name="mpncovresnet50-15991845.pth",
        google_drive_id="19TWen7p9UDyM0Ueu9Gb22NtouR109C6j",
        baidu_url="https://pan.baidu.com/s/17TxANPJg_j2VyYgXV05OOQ",
        published=Published(21.71, 6.13, False, 256, 224, f"{_FM} README.md:L49-L57 (reproduce column)"),
        file_size_mib=217.3,
    ),
    # jiangtaoxie/fast-MPN-COV@c430c78 README.md:L24-L67 (rows L58-L66); 289.9MB.
    _fast_mpn_cov(
        101,
        file_name="mpncovresnet101-ade9737a.pth",
        google_drive_id="1riur7v3rZ7vnrdj2UZ7EBaTKEGSccYwg",
        baidu_url="https://pan.baidu.com/s/1_H8MosgzPH0BBmlKw2sr5A",
        published=Published(20.99, 5.56, False, 256, 224, f"{_FM} README.md:L58-L66 (reproduce column)"),
        file_size_mib=289.9,
    ),
    # pytorch/vision@1f1a920 torchvision/models/resnet.py:L356-L374 (ResNet50_Weights.IMAGENET1K_V1):
    # acc@1 76.130, acc@5 92.862, 25,557,032 parameters, 97.781 MB; sha256 prefix from the file name.
    _torchvision(50, 1, "0676ba61", (23.870, 7.138, 256, "L356-L374"), 25_557_032, 97.781),
    # pytorch/vision@1f1a920 torchvision/models/resnet.py:L399-L417 (ResNet101_Weights.IMAGENET1K_V1):
    # acc@1 77.374, acc@5 93.546, 44,549,160 parameters, 170.511 MB.
    _torchvision(101, 1, "63fe2227", (22.626, 6.454, 256, "L399-L417"), 44_549_160, 170.511),
    # pytorch/vision@1f1a920 torchvision/models/resnet.py:L375-L396 (ResNet50_Weights.IMAGENET1K_V2, DEFAULT):
    # acc@1 80.858, acc@5 95.434, resize 232; 97.79 MB.
    _torchvision(50, 2, "11ad3fa6", (19.142, 4.566, 232, "L375-L396"), 25_557_032, 97.79),
    # pytorch/vision@1f1a920 torchvision/models/resnet.py:L418-L439 (ResNet101_Weights.IMAGENET1K_V2, DEFAULT):
    # acc@1 81.886, acc@5 95.780, resize 232; 170.53 MB.
    _torchvision(101, 2, "cd907fc2", (18.114, 4.220, 232, "L418-L439"), 44_549_160, 170.53),
)
ENTRIES: dict[str, Entry] = {e.name: e for e in _ENTRIES}

# Released, listed, not loadable: name -> why.
NOT_AVAILABLE: dict[str, str] = {
    # jiangtaoxie/fast-MPN-COV@c430c78 README.md:L40-L48 (23.98 / 7.12 reproduced, Drive
    # 1oD2QydL8VvK2Zu6Ba5Xe3gFq3to8JsrN); architecture: src/network/mpncovvgg.py:L1-L96.
    "vgg16_isqrt_imagenet": (
        "fast-MPN-COV's VGG-D iSQRT-COV model (mpncovvgg16_bn, 23.98 / 7.12 % top-1/top-5 error) is not "
        "loadable: its backbone matches gg_jax's vgg16 except for conv biases (foldable into BatchNorm), but "
        "its ImageNet classifier is a 3-layer MLP (32896 -> 4096 -> 4096 -> 1000, with dropout) where gg_jax "
        "has one linear layer, so the published accuracy cannot be reproduced, and gg_jax.convert has no VGG "
        "key mapping (the file's key names are known only from its loader). Download it from Google Drive "
        "1oD2QydL8VvK2Zu6Ba5Xe3gFq3to8JsrN or Baidu https://pan.baidu.com/s/10DmoGbuHjI_Nsd8bEbefsA."
    ),
}
