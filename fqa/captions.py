"""Captions for image–text pairs: templates, the caption column, class prompts.

A CLIP task reads the ``caption`` column of the Parquet splits (schema in
``fqa.data``). With ``task.caption_templates`` set, training captions are instead
written from each image's class name with a template chosen by the image's global
index (several phrasings of the same content); held-out splits keep their caption
column, so retrieval is always measured on the dataset's own captions. Zero-shot
classification averages the text features of every template per class (CLIP's
prompt ensembling).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fqa.data import ImageDataset

# The first is the digits Parquet's own caption column (fqa.data.digit_caption).
DIGIT_TEMPLATES = (
    "a photo of the digit {}",
    "a handwritten {}",
    "the number {}",
    "a drawing of a {}",
)


def check_templates(templates: Sequence[str]) -> None:
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(
                f"caption template {template!r} must contain exactly one '{{}}' where the "
                "class name goes, e.g. 'a photo of the digit {}'"
            )


def class_names_of(dataset: ImageDataset) -> list[str]:
    names = list(dataset.class_names or [])
    if not names:
        raise ValueError(
            f"dataset {dataset.path or '(in memory)'} has an empty class list; CLIP tasks need "
            "class names for zero-shot prompts: add 'class_names' to dataset.json"
        )
    if (
        dataset.labels is not None
        and len(dataset.labels)
        and int(dataset.labels.max()) >= len(names)
    ):
        raise ValueError(
            f"labels reach {int(dataset.labels.max())} but only {len(names)} class names are given; "
            "list one name per class in dataset.json"
        )
    return names


def captions_of(
    dataset: ImageDataset, templates: Sequence[str] | None = None, class_names: Sequence[str] = ()
) -> list[str]:
    """One caption per row: from templates (by global index) or the caption column."""
    if templates:
        check_templates(templates)
        if dataset.labels is None:
            raise ValueError(
                "task.caption_templates needs a 'label' column to name each image's class"
            )
        ids = dataset.ids.numpy()
        pick = np.asarray(ids) % len(templates)
        return [
            templates[t].format(class_names[y])
            for t, y in zip(pick, dataset.labels.tolist(), strict=True)
        ]
    if dataset.captions is None:
        raise ValueError(
            f"dataset {dataset.path or '(in memory)'} has no 'caption' column; CLIP tasks need a "
            "caption per image (add a string column 'caption', or set task.caption_templates "
            "to write captions from class names)"
        )
    return list(dataset.captions)


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """prompts[t][c]: template t filled with class c's name."""
    if not class_names:
        raise ValueError("the class list is empty; zero-shot classification needs class names")
    check_templates(templates)
    return [[template.format(name) for name in class_names] for template in templates]
