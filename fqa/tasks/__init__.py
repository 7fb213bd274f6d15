"""Tasks (what is learned), registered by name like estimators and allocators:
``create_task(name, config=..., splits=..., num_classes=...)``, ``list_tasks()``.

The factories import their module on use, so open_clip loads only for the CLIP tasks.
"""

from __future__ import annotations

from fqa.registry import Registry

TASKS: Registry = Registry("task")


@TASKS.register("image_classification")
def _image_classification(config, splits, num_classes):
    from fqa.tasks.image_classification import build_image_task

    return build_image_task(config, splits, num_classes)


@TASKS.register("backbone_features")
def _backbone_features(config, splits, num_classes):
    from fqa.tasks.backbone_features import build_backbone_features_task

    return build_backbone_features_task(config, splits, num_classes)


@TASKS.register("clip_align")
def _clip_align(config, splits, num_classes):
    from fqa.tasks.clip_align import build_clip_align_task

    return build_clip_align_task(config, splits)  # classes come from the captions


@TASKS.register("clip_prompt")
def _clip_prompt(config, splits, num_classes):
    from fqa.tasks.clip_prompt import build_clip_prompt_task

    return build_clip_prompt_task(config, splits)


def create_task(name: str, **kwargs):
    return TASKS.create(name, **kwargs)


def list_tasks() -> list[str]:
    return TASKS.names()


__all__ = ["TASKS", "create_task", "list_tasks"]
