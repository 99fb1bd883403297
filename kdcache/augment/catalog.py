"""What a recipe may name, without importing torch: the named presets and the help of --augment.

The operations are declared once, in :data:`kdcache.augment.recipe.OPERATIONS`; the help reads
their names through :data:`kdcache.choices.RECIPE_OPERATIONS`, without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdcache.choices import RECIPE_OPERATIONS


@dataclass(frozen=True)
class Preset:
    """A named recipe: the operations it stands for and where it comes from."""

    spec: str
    description: str


#: Named recipes; a preset's name may stand alone or as one element of a recipe
#: (``deit+mixup:0.8``).
PRESETS: dict[str, Preset] = {
    "fkd": Preset(
        "rrc+flip",
        "FKD's crops (Shen & Xing 2022): random-resized crop at 8-100 % of the area, flip",
    ),
    "deit": Preset(
        "rrc+flip+randaugment:2,9,bins=11+erase:0.25,value=random",
        "DeiT (Touvron et al. 2021) without its mixup/cutmix: crop, flip, RandAugment of 2 "
        "transforms at magnitude 9 of 10, random erasing with probability 0.25 and noise fill",
    ),
    "timm-a1": Preset(
        "rrc+flip+randaugment:2,7,bins=11+cutmix:1",
        "like timm's ResNet strikes back A1 (Wightman et al. 2021): crop, flip, RandAugment of "
        "2 transforms at magnitude 7 of 10, CutMix alpha 1 (A1 alternates it with mixup 0.2)",
    ),
    "torchvision-v2": Preset(
        "rrc+flip+trivialaugment+erase:0.1",
        "torchvision's recipe for its newer ImageNet weights, without mixup/cutmix: crop, flip, "
        "TrivialAugmentWide, random erasing with probability 0.1",
    ),
    "aa-imagenet": Preset(
        "rrc+flip+autoaugment",
        "crop, flip and AutoAugment's ImageNet policy (Cubuk et al. 2019)",
    ),
    "simclr": Preset(
        "rrc+flip+jitter:0.4,0.4,0.4,0.1+gray:0.2+blur:23,p=0.5",
        "SimCLR's view (Chen et al. 2020) at 224 pixels: crop, flip, colour jitter "
        "0.4/0.4/0.4/0.1, grayscale with probability 0.2, a 23-pixel Gaussian blur with "
        "probability 0.5",
    ),
}


def recipe_help() -> str:
    """One sentence for ``--augment``: its form, the operations and the presets."""
    return (
        "Augmentation recipe: operations joined by '+', e.g. 'rrc:scale=0.35-1+flip', "
        "'pad-crop:4+flip', 'rrc+flip+mixup:0.2', or a preset ("
        + ", ".join(PRESETS)
        + "); operations: "
        + ", ".join(RECIPE_OPERATIONS.names())
        + " (see docs/augmentation.md)."
    )
