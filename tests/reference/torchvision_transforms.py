"""torchvision's transforms on PIL images, written from torchvision.transforms.functional (torchvision
cannot be installed beside the pinned torch): the reference the input pipeline's transforms are
checked against, pixel for pixel."""

import io
import math
import random

from PIL import Image


def tv_resize(img: Image.Image, size):
    """torchvision F.resize on a PIL image: int -> shorter side (longer int(size * long / short)),
    (h, w) -> both; bilinear (PIL antialiases when shrinking)."""
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BILINEAR)


def tv_center_crop(img: Image.Image, size: int):
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def tv_five_crop(img: Image.Image, size: int):
    w, h = img.size
    tl = img.crop((0, 0, size, size))
    tr = img.crop((w - size, 0, w, size))
    bl = img.crop((0, h - size, size, h))
    br = img.crop((w - size, h - size, w, h))
    return [tl, tr, bl, br, tv_center_crop(img, size)]


def tv_ten_crop(img: Image.Image, size: int):
    return tv_five_crop(img, size) + tv_five_crop(img.transpose(Image.FLIP_LEFT_RIGHT), size)


def tv_get_params(rnd: random.Random, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop.get_params, with Python's random module in place of torch's generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rnd.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rnd.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rnd.randint(0, height - h)
            j = rnd.randint(0, width - w)
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def pil_open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # torchvision's default_loader
