"""The project's own PyTorch implementation of the reference 3G-Net and its baselines.

Used as an oracle by the converter tests (``gg_jax.convert``) and as the PyTorch side
of the benchmarks. It imports torch at module top; it is not part of the installed
``gg_jax`` package. It was written from the project's reference notes (what the
released 3G-Net PyTorch code computes, number for number) and is validated against the
golden tensors in ``tests/data/*_golden.npz`` (``tests/test_torch_reference.py``).

``ReferenceResNet3G(arch, num_classes, num_blocks, num_iters, head)``

``head='3g'`` -- 3G-Net exactly as released (``resnet{18,34,23,50,101,152}_3g``):

* torchvision-style ResNet v1.5 (stride on the bottleneck's 3x3 conv), strides
  1, 2, 2, **1**; ``conv1 bn1 layer1..layer4``, shortcut ``downsample.0/1``;
* ``layer_reduce`` (1x1 conv -> 256, no bias) + ``layer_reduce_bn`` + ReLU -> X;
* ``AtMp1..AtMpT`` re-weighting blocks, each with ``map1/bn1, map2/bn2, map21/bn21,
  map3/bn3, map4/bn4, atmap1/bnat1, atmap2, atmap3``; block t gets the running
  features Xh and always the same X (``map21`` reads X);
* covariance ``Xh I_hat Xh^T + 1e-7 I`` with the M x M centring matrix
  ``I_hat = (1/M)(I - (1/M) 1 1^T)`` (batched ``bmm`` like the reference);
* iSQRT: trace pre-normalisation, ``num_iters`` Newton-Schulz iterations
  (``T = (3I - ZY)/2; Y = YT; Z = TZ``), ``* sqrt(trace)`` post-compensation. The
  released 3G-Net code differentiates this with **plain autograd**; that is the
  default here too (``sqrt_impl='autograd'``); ``sqrt_impl='function'`` uses the
  closed-form backward below instead (same forward);
* vectorisation of ``S[i, j], i >= j`` in row-major order, done sample by sample with
  a flat index from a boolean lower-triangular mask, like the reference;
* ``fc`` (32,896 -> classes). ``state_dict()`` equals ``tests/data/layout.json``.

  The released ImageNet model file additionally has a ``Dropout(p=0.2)`` before ``fc``
  (no parameters; identity in eval mode). The golden ``logits_train`` were produced
  without it, and the reference notes do not list it, so ``dropout=0.0`` is the
  default; pass ``dropout=0.2`` to train like that script.

``head='isqrt'`` -- fast-MPN-COV's iSQRT-COV ResNet (Li et al., CVPR 2018), as in
github.com/jiangtaoxie/fast-MPN-COV. Same backbone (torchvision ResNet with layer4's
stride set to 1; avgpool/fc removed), 1x1 reduction to 256 + BN + ReLU, covariance,
iSQRT (5 iterations), then the **upper** triangle ``i <= j`` in row-major order
(``torch.ones(d, d).triu()`` mask, batched index, as ``Triuvec``), and a linear
classifier. fast-MPN-COV's ``Covpool`` does not add ``1e-7 I`` (``cov_eps=0.0`` is
the default for this head) and its ``Covpool``/``Sqrtm`` are ``autograd.Function`` s
with hand-written backward (``sqrt_impl='function'`` is the default for this head;
the Functions here are this module's own code). Key names (``isqrt_keys``):

* ``'newmodel'`` (default): what fast-MPN-COV's ``main.py`` trains from scratch with
  ``-a mpncovresnet50 --representation MPNCOV`` (``trainingFromScratch/train.sh``):
  ``model_init.py`` ``Newmodel(Basemodel)`` has ``features``, ``representation``,
  ``classifier``; ``src/network/base.py`` ``_reconstruct_mpncovresnet`` (not
  pretrained) sets ``features = nn.Sequential(*list(basemodel.children())[:-4])``
  of ``src/network/mpncovresnet.py`` ``MPNCOVResNet`` (children ``conv1, bn1, relu,
  maxpool, layer1..4, layer_reduce, layer_reduce_bn, layer_reduce_relu, fc``), i.e.
  ``features.0`` conv1, ``features.1`` bn1, ``features.4..7`` layer1..layer4;
  ``src/representation/MPNCOV.py`` ``MPNCOV(dimension_reduction=256)`` holds
  ``conv_dr_block = nn.Sequential(Conv2d(no bias), BatchNorm2d, ReLU)`` ->
  ``representation.conv_dr_block.0.weight``, ``representation.conv_dr_block.1.*``;
  ``classifier = nn.Linear(32896, num_classes)`` -> ``classifier.weight/bias``.
  state_dict order: ``features.*``, ``classifier.*``, ``representation.*`` (Basemodel
  registers features and classifier, Newmodel then adds the representation).
  Note: ``main.py`` (single node) wraps ``model.features = nn.DataParallel(...)``
  before saving, so its ``.pth.tar`` files say ``features.module.0.weight`` etc.
  (and DistributedDataParallel adds a leading ``module.``); strip those infixes
  before ``load_state_dict``. In this layout the ``conv_dr_block`` conv keeps
  PyTorch's default conv init, as in fast-MPN-COV (``MPNCOV`` has no init loop).
* ``'mpncovresnet'``: the released ImageNet models ``mpncovresnet50-15991845.pth`` /
  ``mpncovresnet101-ade9737a.pth`` (``model_urls`` in ``src/network/mpncovresnet.py``,
  loaded with ``MPNCOVResNet.load_state_dict``): ``conv1``, ``bn1``, ``layer1..4``,
  ``layer_reduce``, ``layer_reduce_bn``, ``fc`` -- the 3G-Net names without ``AtMp``.
* ``'newmodel_pretrained'``: ``Newmodel`` built with ``pretrained=True`` (the finetune
  scripts): ``features = children()[:-1]`` so ``features.8`` is ``layer_reduce``,
  ``features.9`` ``layer_reduce_bn``; the representation has no parameters;
  ``classifier``.

``head='gap'`` -- the original torchvision ResNet (stride-2 last stage, global average
pooling, ``fc``) with torchvision's key names (``conv1 bn1 layer1..4 fc``).

Initialisation for every head (as the reference): convs He-normal, fan-out
(``kaiming_normal_(mode='fan_out', nonlinearity='relu')``), BN scale 1 / shift 0,
linear layers PyTorch's default. Modules are created and registered in the released
code's order, so under the same ``torch.manual_seed`` the 3G model should draw the same
initial weights as the reference (not checked against a reference run).

``forward(x, return_intermediates=False)``: NCHW input, logits out; with
``return_intermediates=True`` returns ``(logits, dict)`` where the dict holds (NCHW,
as the golden files) ``layer4``, ``reduced``, ``reweighted1..T`` (3g only),
``covariance``, ``sqrt``, ``vector``, ``logits`` (``gap``: ``layer4``, ``pooled``,
``logits``).

``forward_head(x, return_intermediates=False)`` runs the head alone from ``reduced``
(3g/isqrt) or ``layer4`` (gap) features, e.g. to time the head by itself.

``head_fp32=True`` runs the covariance head (from the covariance on) in float32 with
autocast disabled; the default (False) is what the reference does under autocast.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.reference.reference_weights import load_layout, make_state_dict  # noqa: F401

__all__ = [
    "ARCHS",
    "ReferenceResNet3G",
    "BasicBlock",
    "Bottleneck",
    "AtMp",
    "cov_pool",
    "sqrt_newton_schulz",
    "CovPoolFunction",
    "SqrtNewtonSchulzFunction",
    "tril_vec_per_sample",
    "triu_vec",
    "make_state_dict",
    "make_torch_state_dict",
    "layout_of",
    "random_state_dict",
    "load_numpy_state_dict",
]

# arch -> (block kind, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet23": ("bottleneck", (1, 2, 2, 2)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

HEADS = ("3g", "isqrt", "gap")
ISQRT_KEYS = ("newmodel", "mpncovresnet", "newmodel_pretrained")


# ----------------------------------------------------------------------------- backbone
def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _make_stage(block, inplanes, planes, blocks, stride):
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            _conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    inplanes = planes * block.expansion
    for _ in range(1, blocks):
        layers.append(block(inplanes, planes))
    return nn.Sequential(*layers), inplanes


# --------------------------------------------------------------------- re-weighting block
class AtMp(nn.Module):
    """One unrolled re-weighting block of 3G-Net (names as in the released checkpoints)."""

    def __init__(self, n_features=256, reduction=4):
        super().__init__()
        c, r = n_features, n_features // reduction
        self.map1 = _conv1x1(c, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.map2 = _conv1x1(c, c)
        self.bn2 = nn.BatchNorm2d(c)
        self.map21 = _conv1x1(c, c)
        self.bn21 = nn.BatchNorm2d(c)
        self.map3 = _conv1x1(c, c)
        self.bn3 = nn.BatchNorm2d(c)
        self.map4 = _conv1x1(c, c)
        self.bn4 = nn.BatchNorm2d(c)
        self.atmap1 = _conv1x1(c, r)
        self.bnat1 = nn.BatchNorm2d(r)
        self.atmap2 = _conv1x1(r, 1)
        self.atmap3 = _conv1x1(1, 1)

    def forward(self, xh, x):
        a = self.bn1(self.map1(xh)) * self.bn2(self.map2(xh))
        z = torch.relu(a + self.bn21(self.map21(x)))  # map21 reads X, not Xh
        b = torch.relu(self.bn3(self.map3(z))) * torch.relu(self.bn4(self.map4(z)))
        s = self.atmap2(torch.relu(self.bnat1(self.atmap1(b))))
        w = torch.sigmoid(s + self.atmap3(s))  # [B, 1, H, W]
        return xh * w  # one weight per position, shared by all channels


# ---------------------------------------------------------------------- covariance head
def _centering_matrix(m: int, device, dtype) -> torch.Tensor:
    """I_hat = (1/M) (I - (1/M) 1 1^T), M x M."""
    return ((-1.0 / m / m) * torch.ones(m, m, device=device) + (1.0 / m) * torch.eye(m, m, device=device)).to(dtype)


def cov_pool(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, C]: X I_hat X^T (+ eps I), batched bmm as the reference."""
    b, c, h, w = x.shape
    m = h * w
    x = x.reshape(b, c, m)
    i_hat = _centering_matrix(m, x.device, x.dtype).unsqueeze(0).expand(b, m, m)
    y = x.bmm(i_hat).bmm(x.transpose(1, 2))
    if eps:
        y = y + eps * torch.eye(c, device=x.device).unsqueeze(0).expand(b, c, c)
    return y


def sqrt_newton_schulz(s: torch.Tensor, num_iters: int = 5) -> torch.Tensor:
    """iSQRT forward, differentiated by plain autograd (what the 3G-Net code does)."""
    b, d, _ = s.shape
    eye = torch.eye(d, device=s.device, dtype=s.dtype).unsqueeze(0).expand(b, d, d)
    norm = (s * eye).sum(dim=(1, 2))  # trace
    y = s / norm.view(b, 1, 1)
    z = eye
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z.bmm(y))
        y = y.bmm(t)
        z = t.bmm(z)
    return y * torch.sqrt(norm).view(b, 1, 1)


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class CovPoolFunction(torch.autograd.Function):
    """Covariance pooling with a hand-written backward, dL/dX = (G + G^T) X I_hat.

    Computes in at least float32 with autocast off (so it also works inside autocast,
    where a custom Function's backward would otherwise mix dtypes); returns float32
    for half/bfloat16 inputs.
    """

    @staticmethod
    def forward(ctx, x, eps):
        ctx.in_dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = _at_least_f32(x)
            b, c, h, w = x.shape
            m = h * w
            xf = x.reshape(b, c, m)
            i_hat = _centering_matrix(m, x.device, x.dtype).unsqueeze(0).expand(b, m, m)
            y = xf.bmm(i_hat).bmm(xf.transpose(1, 2))
            if eps:
                y = y + eps * torch.eye(c, device=x.device, dtype=x.dtype).unsqueeze(0)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        b, c, h, w = x.shape
        m = h * w
        xf = x.reshape(b, c, m)
        g = g.to(x.dtype)
        i_hat = _centering_matrix(m, x.device, x.dtype).unsqueeze(0).expand(b, m, m)
        gx = (g + g.transpose(1, 2)).bmm(xf).bmm(i_hat)
        return gx.reshape(b, c, h, w).to(ctx.in_dtype), None


class SqrtNewtonSchulzFunction(torch.autograd.Function):
    """iSQRT with a closed-form backward through the coupled Newton-Schulz iteration.

    Forward as ``sqrt_newton_schulz``; backward walks the iterations in reverse, keeping
    every iteration's Y and Z (like fast-MPN-COV's ``Sqrtm``):
    ``T = (3I - ZY)/2, Y' = YT, Z' = TZ`` gives
    ``gT = Y^T gY' + gZ' Z^T``, ``gY = gY' T^T - Z^T gT/2``, ``gZ = T^T gZ' - gT Y^T/2``;
    then through ``A = S / tr(S)`` and the ``sqrt(tr(S))`` post-compensation.
    """

    @staticmethod
    def forward(ctx, s, num_iters):
        ctx.in_dtype = s.dtype
        with torch.autocast(device_type=s.device.type, enabled=False):
            s = _at_least_f32(s)
            b, d, _ = s.shape
            eye = torch.eye(d, device=s.device, dtype=s.dtype).unsqueeze(0).expand(b, d, d)
            norm = torch.diagonal(s, dim1=1, dim2=2).sum(-1)
            a = s / norm.view(b, 1, 1)
            ys, zs, ts = [a], [eye], []
            y, z = a, eye
            for _ in range(num_iters):
                t = 0.5 * (3.0 * eye - z.bmm(y))
                y = y.bmm(t)
                z = t.bmm(z)
                ys.append(y)
                zs.append(z)
                ts.append(t)
            out = y * torch.sqrt(norm).view(b, 1, 1)
        ctx.num_iters = num_iters
        ctx.save_for_backward(s, norm, *ys, *zs[1:], *ts)
        return out

    @staticmethod
    def backward(ctx, g):
        k = ctx.num_iters
        saved = ctx.saved_tensors
        s, norm = saved[0], saved[1]
        ys = saved[2 : 3 + k]
        b, d, _ = s.shape
        eye = torch.eye(d, device=s.device, dtype=s.dtype).unsqueeze(0).expand(b, d, d)
        zs = (eye,) + tuple(saved[3 + k : 3 + 2 * k])
        ts = saved[3 + 2 * k : 3 + 3 * k]
        g = g.to(s.dtype)
        sq = torch.sqrt(norm).view(b, 1, 1)
        g_norm = (g * ys[k]).sum(dim=(1, 2)) / (2.0 * sq.view(b))
        gy = g * sq
        gz = torch.zeros_like(gy)
        tr = lambda m: m.transpose(1, 2)  # noqa: E731
        for i in range(k - 1, -1, -1):
            y, z, t = ys[i], zs[i], ts[i]
            gt = tr(y).bmm(gy) + gz.bmm(tr(z))
            gp = -0.5 * gt  # P = Z Y
            gy, gz = gy.bmm(tr(t)) + tr(z).bmm(gp), tr(t).bmm(gz) + gp.bmm(tr(y))
        ga = gy  # Z_0 = I is a constant
        n = norm.view(b, 1, 1)
        g_norm = g_norm - (ga * s).sum(dim=(1, 2)) / (norm * norm)
        gs = ga / n + g_norm.view(b, 1, 1) * eye
        return gs.to(ctx.in_dtype), None


def _tril_index(d: int, device) -> torch.Tensor:
    """Flat row-major indices of (i, j), i >= j: ones(d, d).triu().t() mask."""
    mask = torch.ones(d, d, device=device).triu().t().reshape(d * d)
    return mask.nonzero().view(-1)


def _triu_index(d: int, device) -> torch.Tensor:
    """Flat row-major indices of (i, j), i <= j: ones(d, d).triu() mask (fast-MPN-COV)."""
    mask = torch.ones(d, d, device=device).triu().reshape(d * d)
    return mask.nonzero().view(-1)


def tril_vec_per_sample(x: torch.Tensor) -> torch.Tensor:
    """[B, d, d] -> [B, d(d+1)/2], S[i, j] with i >= j row-major, one sample at a time."""
    b, d, _ = x.shape
    flat = x.reshape(b, d * d)
    idx = _tril_index(d, x.device)
    # The reference fills a default-dtype (float32) buffer; keep float64 as float64.
    out = torch.zeros(b, idx.numel(), device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    for i in range(b):
        out[i, :] = flat[i, idx]
    return out


def triu_vec(x: torch.Tensor) -> torch.Tensor:
    """[B, d, d] -> [B, d(d+1)/2], S[i, j] with i <= j row-major (batched, Triuvec)."""
    b, d, _ = x.shape
    return x.reshape(b, d * d)[:, _triu_index(d, x.device)]


# ----------------------------------------------------------------------------- model
class _MPNCOVRepresentation(nn.Module):
    """Parameter holder named like fast-MPN-COV's ``MPNCOV`` (``conv_dr_block``)."""

    def __init__(self, input_dim, dr):
        super().__init__()
        if dr is not None:
            self.conv_dr_block = nn.Sequential(
                nn.Conv2d(input_dim, dr, kernel_size=1, stride=1, bias=False),
                nn.BatchNorm2d(dr),
                nn.ReLU(inplace=True),
            )


class ReferenceResNet3G(nn.Module):
    """Reference 3G-Net (``head='3g'``), iSQRT-COV (``'isqrt'``) or plain ResNet (``'gap'``).

    Args:
      arch: one of ``ARCHS`` (resnet18/34 basic; resnet23/50/101/152 bottleneck).
      num_classes: classifier outputs.
      num_blocks: number T of re-weighting blocks (3g only).
      num_iters: Newton-Schulz iterations (3g, isqrt).
      head: ``'3g'``, ``'isqrt'`` or ``'gap'``.
      cov_eps: added ``eps * I`` to the covariance; None -> 1e-7 for 3g, 0 for isqrt.
      sqrt_impl: ``'autograd'`` (plain autograd) or ``'function'`` (closed-form backward
        Functions for covariance and square root); None -> autograd for 3g, function
        for isqrt.
      isqrt_keys: key naming for ``head='isqrt'`` (see module docstring).
      dropout: dropout before the classifier (3g/isqrt); 0 (golden) by default.
      head_fp32: run covariance/sqrt/vector/classifier input in float32, autocast off.
      dim: reduced channel count (256).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        num_classes: int = 1000,
        num_blocks: int = 3,
        num_iters: int = 5,
        head: str = "3g",
        *,
        cov_eps: float | None = None,
        sqrt_impl: str | None = None,
        isqrt_keys: str = "newmodel",
        dropout: float = 0.0,
        head_fp32: bool = False,
        dim: int = 256,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; valid: {HEADS}")
        if isqrt_keys not in ISQRT_KEYS:
            raise ValueError(f"unknown isqrt_keys {isqrt_keys!r}; valid: {ISQRT_KEYS}")
        kind, counts = ARCHS[arch]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.arch, self.head, self.num_iters, self.dim = arch, head, num_iters, dim
        self.num_blocks = num_blocks if head == "3g" else 0
        self.cov_eps = (1e-7 if head == "3g" else 0.0) if cov_eps is None else float(cov_eps)
        self.sqrt_impl = sqrt_impl or ("autograd" if head == "3g" else "function")
        if self.sqrt_impl not in ("autograd", "function"):
            raise ValueError(f"unknown sqrt_impl {self.sqrt_impl!r}")
        self.isqrt_keys = isqrt_keys if head == "isqrt" else None
        self.head_fp32 = head_fp32

        # Build in the reference's order (affects only RNG order of the default inits).
        conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        bn1 = nn.BatchNorm2d(64)
        relu = nn.ReLU(inplace=True)
        maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2 if head == "gap" else 1)):
            stage, inplanes = _make_stage(block, inplanes, planes, n, stride)
            stages.append(stage)
        backbone = [conv1, bn1, relu, maxpool] + stages
        self.out_channels = inplanes
        # Handles used by forward (a plain dict: not registered a second time).
        h = {"backbone": backbone}

        if head == "gap":
            for name, mod in zip(("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), backbone):
                self.add_module(name, mod)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(inplanes, num_classes)
            h["fc"] = self.fc
        else:
            vec_dim = dim * (dim + 1) // 2
            if head == "3g" or isqrt_keys in ("mpncovresnet", "newmodel_pretrained"):
                reduce_conv = _conv1x1(inplanes, dim)
                reduce_bn = nn.BatchNorm2d(dim)
                reduce_relu = nn.ReLU(inplace=True)
            if head == "3g":
                for name, mod in zip(
                    ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), backbone
                ):
                    self.add_module(name, mod)
                self.layer_reduce, self.layer_reduce_bn = reduce_conv, reduce_bn
                self.layer_reduce_relu = reduce_relu
                for t in range(1, num_blocks + 1):
                    self.add_module(f"AtMp{t}", AtMp(dim))
                self.layer_final_dp = nn.Dropout(p=dropout)
                self.fc = nn.Linear(vec_dim, num_classes)
                h["reduce"] = [reduce_conv, reduce_bn, reduce_relu]
                h["atmp"] = [getattr(self, f"AtMp{t}") for t in range(1, num_blocks + 1)]
                h["fc"] = self.fc
            elif isqrt_keys == "mpncovresnet":
                for name, mod in zip(
                    ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), backbone
                ):
                    self.add_module(name, mod)
                self.layer_reduce, self.layer_reduce_bn = reduce_conv, reduce_bn
                self.layer_reduce_relu = reduce_relu
                self.fc = nn.Linear(vec_dim, num_classes)
                h["reduce"] = [reduce_conv, reduce_bn, reduce_relu]
                h["fc"] = self.fc
            elif isqrt_keys == "newmodel_pretrained":
                # Registration order as Newmodel: features, classifier, representation.
                self.features = nn.Sequential(*backbone, reduce_conv, reduce_bn, reduce_relu)
                self.classifier = nn.Linear(vec_dim, num_classes)
                self.representation = _MPNCOVRepresentation(dim, None)
                h["reduce"] = [reduce_conv, reduce_bn, reduce_relu]
                h["fc"] = self.classifier
            else:  # newmodel
                representation = _MPNCOVRepresentation(inplanes, dim)
                # Registration (= state_dict) order as Newmodel: Basemodel registers
                # features and classifier; Newmodel then adds representation.
                self.features = nn.Sequential(*backbone)
                self.classifier = nn.Linear(vec_dim, num_classes)
                self.representation = representation
                h["reduce"] = list(self.representation.conv_dr_block)
                h["fc"] = self.classifier
            if head == "isqrt":
                self.dropout = nn.Dropout(p=dropout)
            h["dropout"] = self.layer_final_dp if head == "3g" else self.dropout
        self._h = h
        self._init_weights()

    def _init_weights(self):
        skip = set()
        if self.head == "isqrt" and self.isqrt_keys == "newmodel":
            # fast-MPN-COV's MPNCOV module is created after the backbone's init loop.
            skip = {id(m) for m in self.representation.modules()}
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    # -- pieces
    def _covariance(self, x):
        if self.sqrt_impl == "function":
            return CovPoolFunction.apply(x, self.cov_eps)
        return cov_pool(x, self.cov_eps)

    def _sqrt(self, s):
        if self.sqrt_impl == "function":
            return SqrtNewtonSchulzFunction.apply(s, self.num_iters)
        return sqrt_newton_schulz(s, self.num_iters)

    def _vector(self, s):
        if self.head == "3g":
            return tril_vec_per_sample(s)
        return triu_vec(s)

    def forward(self, x: torch.Tensor, return_intermediates: bool = False):
        h = self._h
        inter: dict[str, torch.Tensor] = {}
        for mod in h["backbone"]:
            x = mod(x)
        inter["layer4"] = x
        if self.head != "gap":
            for mod in h["reduce"]:
                x = mod(x)
            inter["reduced"] = x
        logits, head_inter = self.forward_head(x, return_intermediates=True)
        inter.update(head_inter)
        if return_intermediates:
            return logits, inter
        return logits

    def forward_head(self, x: torch.Tensor, return_intermediates: bool = False):
        """The head alone: from ``reduced`` features (3g/isqrt) or ``layer4`` (gap).

        ``x`` is what ``forward`` reports as ``reduced`` (after the reduction's ReLU) or,
        for ``head='gap'``, ``layer4``. Returns logits (and the dict of intermediates).
        """
        h = self._h
        inter: dict[str, torch.Tensor] = {}
        if self.head == "gap":
            v = torch.flatten(self.avgpool(x), 1)
            inter["pooled"] = v
            logits = h["fc"](v)
        else:
            xh = x
            for t, block in enumerate(h.get("atmp", ()), start=1):
                xh = block(xh, x)
                inter[f"reweighted{t}"] = xh
            if self.head_fp32:
                with torch.autocast(device_type=x.device.type, enabled=False):
                    v = self._head(xh.float(), inter)
            else:
                v = self._head(xh, inter)
            v = h["dropout"](v)
            logits = h["fc"](v.view(v.size(0), -1))
        inter["logits"] = logits
        if return_intermediates:
            return logits, inter
        return logits

    def _head(self, xh, inter):
        s = self._covariance(xh)
        inter["covariance"] = s
        r = self._sqrt(s)
        inter["sqrt"] = r
        v = self._vector(r)
        inter["vector"] = v
        return v


# ------------------------------------------------------------------------ state dicts
def make_torch_state_dict(arch_key: str | None = None, seed: int = 0, layout=None) -> dict[str, torch.Tensor]:
    """``make_state_dict`` as torch tensors, ready for ``load_state_dict``."""
    return {k: torch.from_numpy(v) for k, v in make_state_dict(arch_key, seed, layout).items()}


def layout_of(module: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """The ``(key, shape)`` list of a module's state_dict (layout.json style)."""
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


def random_state_dict(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The deterministic recipe applied to any module's own layout (isqrt, gap, ...)."""
    return make_torch_state_dict(None, seed, layout=layout_of(module))


def load_numpy_state_dict(module: nn.Module, state: dict[str, np.ndarray], strict=True):
    """``module.load_state_dict`` from NumPy arrays (copies)."""
    return module.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()}, strict=strict)
