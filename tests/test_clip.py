"""CLIP tasks: the per-datapoint contrastive loss, feature caching, the black box, bad input."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fqa.data import DataError, write_image_parquet
from fqa.estimators import create_estimator
from fqa.setup import build_task
from fqa.tasks.clip_align import contrast_groups, pair_losses, retrieval_recall
from fqa.tasks.models import CheckpointError
from fqa.trainer import Trainer

# one layer per tower: a few hundred thousand parameters, mostly the token embedding
TINY = {"vision_cfg": {"layers": 1}, "text_cfg": {"layers": 1}}


@pytest.fixture
def clip_config(tiny_config):
    """The tests' tiny end-to-end config, turned into a CLIP task on the tiny CLIP."""

    def make(name="clip_align", **sections):
        data = {
            "task": {"name": name, "contrast_size": 8},
            "model": {"name": "fqa-clip-tiny", "kwargs": TINY},
            "trainable": {"mode": "head"},
            "estimator": {"name": "lr" if name == "clip_align" else "spsa", "sigma": 0.1},
            "train": {"steps": 3},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return tiny_config(**data)

    return make


def test_per_datapoint_terms_average_to_open_clip_loss():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    image, text = torch.randn(12, 32, dtype=torch.float64), torch.randn(12, 32, dtype=torch.float64)
    scale = torch.tensor(7.0, dtype=torch.float64)
    # every row of one group, the group as its contrast set
    terms = pair_losses(image.expand(12, -1, -1), text.expand(12, -1, -1), torch.arange(12), scale)
    expected = ClipLoss()(F.normalize(image, dim=-1), F.normalize(text, dim=-1), scale)
    torch.testing.assert_close(terms.mean(), expected, rtol=1e-12, atol=1e-12)


def test_task_group_loss_is_open_clip_loss_on_the_group(clip_config):
    from open_clip.loss import ClipLoss

    task = build_task(clip_config())
    members, _ = task._groups["train"]
    group = members[0]
    ids = task.train_ids()[group]
    losses = task.losses(ids)
    with torch.no_grad():
        image, text = task._embedded("train", torch.as_tensor(group))
        expected = ClipLoss()(image, text, task.model.scale())
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-6)
    # a datapoint's loss does not depend on which other rows share the call
    torch.testing.assert_close(task.losses(ids[[3, 3, 1]]), losses[[3, 3, 1]])
    # the backpropagation objective is the same function
    torch.testing.assert_close(task.backprop_loss(ids).detach(), losses.mean())


def test_low_rank_heads_start_at_the_identity_and_train_only_a(clip_config):
    full = build_task(clip_config())
    low = build_task(clip_config(task={"contrast_size": 8, "align_rank": 2}))
    assert [n for n, _ in low.trainable_parameters()] == [
        "image_head.lora_a.weight",
        "text_head.lora_a.weight",
    ]
    ids = full.train_ids()[:10]
    torch.testing.assert_close(low.losses(ids), full.losses(ids))


def test_contrast_groups_partition_and_interleave_classes():
    labels = np.repeat(np.arange(5), 7)  # 35 rows, 5 classes
    members, own = contrast_groups(35, labels, 5, seed=3)
    assert members.shape == (7, 5)
    for row in range(35):
        assert row in members[own[row]]
    assert all(len(set(labels[g])) == 5 for g in members)  # one caption per class per group
    again, _ = contrast_groups(35, labels, 5, seed=3)
    np.testing.assert_array_equal(members, again)


def test_lr_estimate_on_align_heads_matches_autograd(clip_config):
    """Unbiased for l_i including the negatives' paths: the mean of independent estimates
    lies within a chi-square bound of autograd (E‖ḡ−g‖² = Σ se²) and clearly away from the
    gradient that ignores the negatives' paths (what noise on the own pair alone gives)."""
    task = build_task(clip_config(estimator={"name": "lr", "sigma": 0.02}))
    image, text = task._image_cache["train"], task._text_cache["train"]  # float32 towers
    task._image_cache._features = {"train": image.double()}
    task._text_cache._features = {"train": text.double()}
    for p in task.model.parameters():
        p.data = p.data.double()  # float64 heads: tight statistics
    ids = task.train_ids()[:2]
    params = [p for _, p in task.trainable_parameters()]
    with torch.enable_grad():
        truth = torch.cat(
            [g.flatten() for g in torch.autograd.grad(task.backprop_loss(ids), params)]
        )
        own_path = torch.cat(
            [g.flatten() for g in torch.autograd.grad(_own_path_loss(task, ids), params)]
        )
    estimator = create_estimator("lr", sigma=0.02)
    baselines = task.prepass(ids)["loss"]
    estimates = []
    for repeat in range(10):
        shards = estimator.plan(
            ids, np.array([1000, 1000]), baselines, seed=repeat, shard_rows=4000
        )
        estimator.estimate(task, shards)
        estimates.append(torch.cat([p.grad.flatten() for p in params]).clone())
    est = torch.stack(estimates)
    mean, se2 = est.mean(0), float((est.var(0) / len(est)).sum())
    assert float(((mean - truth) ** 2).sum()) < 3 * se2
    assert float(((mean - own_path) ** 2).sum()) > 3 * se2  # measured: ~20x se2


def _own_path_loss(task, ids):
    """The same loss with every negative's embedding detached (own pair's path only)."""
    positions = task._positions(ids)
    members, own = task._groups["train"]
    groups = torch.as_tensor(members[own[positions.numpy()]])
    target = (groups == positions[:, None]).int().argmax(1)
    mask = F.one_hot(target, groups.shape[1]).double()[..., None]
    image = task.model.image_head(task._image_cache["train"][groups])
    text = task.model.text_head(task._text_cache["train"][groups])
    image = mask * image + (1 - mask) * image.detach()
    text = mask * text + (1 - mask) * text.detach()
    return pair_losses(image, text, target, task.model.scale()).mean()


def test_retrieval_counts_identical_captions_as_relevant():
    image = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.9, 0.1, 0]])  # image 2 looks like a zero
    text = torch.eye(3)[[0, 1, 1]]  # rows 1 and 2 share a caption and its feature
    captions = ["zero", "one", "one"]
    out = retrieval_recall(image, text, captions, ks=(1, 2))
    assert out["i2t_r1"] == pytest.approx(2 / 3)  # image 2 retrieves "zero"
    assert out["i2t_r2"] == 1.0  # only two distinct captions
    assert out["t2i_r1"] == 1.0  # "one" retrieves image 1, which carries "one" too


def test_align_trains_and_reports_recall(clip_config):
    trainer = Trainer(clip_config())
    before = [p.detach().clone() for p in trainer.params]
    summary = trainer.fit()
    metrics = trainer.task.evaluate("test")
    assert summary["queries"] == 3 * (16 + 16 * 4)
    # every trainable tensor that the estimator reaches moved (it trains) ...
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True)]
    assert all(moved), f"{moved.count(False)} trainable tensors never changed"
    # ... and recall@k is a recall: it can only grow with k
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] and metrics["t2i_r1"] <= metrics["t2i_r5"]
    assert summary["test_accuracy"] == metrics["accuracy"]


def test_prompt_cached_and_uncached_losses_agree(clip_config):
    task = build_task(clip_config("clip_prompt"))
    ids = task.train_ids()[:20]
    cached = task.losses(ids)
    task.black_box.cache_features = False
    torch.testing.assert_close(task.losses(ids), cached, rtol=1e-5, atol=1e-6)
    cost = task.query_cost(rows=8, repeats=1)
    assert cost["cached"] > 0 and cost["uncached"] > 0


def test_prompt_untuned_context_is_the_hand_written_prompt(clip_config):
    """With ctx_init, the context equals the words' embeddings: open_clip's own encoding."""
    task = build_task(clip_config("clip_prompt", task={"ctx_init": "a photo of the digit"}))
    clip, box = task.black_box._clip, task.black_box
    with torch.no_grad():
        ours = box._class_features(task.model.ctx)
        theirs = F.normalize(clip.encode_text(box._tokens), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_prompt_counts_every_black_box_call(clip_config):
    config = clip_config(
        "clip_prompt", task={"class_specific": True}, train={"steps": 100, "eval_every": 100}
    )
    trainer = Trainer(config)
    box = trainer.task.black_box
    for _ in range(3):  # no validation pass: only training queries reach the box
        trainer.step()
    # spsa's first query learns that the context is read outside any module's forward
    # and is repeated once with it swapped throughout: that repeat is counted too
    assert box.calls == trainer.queries == 3 * (16 + 16 * 4) + 16
    assert trainer.task.model.ctx.shape[0] == 10  # one context per class


def test_prompt_backprop_reference_has_gradients(clip_config):
    task = build_task(clip_config("clip_prompt"))
    with torch.enable_grad():
        task.backprop_loss(task.train_ids()[:8]).backward()
    assert task.model.ctx.grad is not None and task.model.ctx.grad.abs().sum() > 0


# ---- bad input: a clear error before training starts -------------------------------------


def _dataset(tmp_path, captions=True, class_names=("zero", "one")):
    images = np.random.default_rng(0).random((12, 1, 8, 8)).astype(np.float32)
    labels = np.arange(12) % 2
    for split, rows in (
        ("train", range(0, 6)),
        ("validation", range(6, 9)),
        ("test", range(9, 12)),
    ):
        rows = np.array(list(rows))
        write_image_parquet(
            tmp_path / f"{split}.parquet",
            ids=rows,
            images=images[rows],
            labels=labels[rows],
            captions=[
                f"a photo of the digit {class_names[y] if class_names else y}" for y in labels[rows]
            ]
            if captions
            else None,
        )
    (tmp_path / "dataset.json").write_text(
        json.dumps({"num_classes": 2, "class_names": list(class_names)})
    )
    return tmp_path


def test_missing_caption_column_is_refused(clip_config, tmp_path):
    data = {"dataset": "parquet", "dir": str(_dataset(tmp_path / "d", captions=False))}
    with pytest.raises((ValueError, DataError), match="caption"):
        build_task(clip_config(data=data, task={"contrast_size": 4}))


def test_empty_class_list_is_refused(clip_config, tmp_path):
    data = {"dataset": "parquet", "dir": str(_dataset(tmp_path / "d", class_names=()))}
    with pytest.raises(ValueError, match="empty class list"):
        build_task(clip_config("clip_prompt", data=data))


def test_unknown_open_clip_model_is_refused(clip_config):
    with pytest.raises(ValueError, match="unknown open_clip model 'no-such-clip'"):
        build_task(clip_config(model={"name": "no-such-clip", "kwargs": {}}))


def test_timm_kwargs_are_refused_for_clip(clip_config):
    with pytest.raises(ValueError, match="img_size"):
        build_task(clip_config(model={"name": "fqa-clip-tiny", "kwargs": {"img_size": 16}}))


@pytest.mark.parametrize("field", ["checkpoint", "pretrained"])
def test_unreadable_weights_file_is_refused(clip_config, tmp_path, field):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        build_task(clip_config(model={"name": "fqa-clip-tiny", "kwargs": TINY, field: str(bad)}))


def test_weights_of_another_model_are_refused(clip_config, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"clip.token_embedding.weight": torch.zeros(3, 3)}, str(other))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_task(
            clip_config(model={"name": "fqa-clip-tiny", "kwargs": TINY, "checkpoint": str(other)})
        )


def test_context_longer_than_the_text_tower_is_refused(clip_config):
    with pytest.raises(ValueError, match="context length is 16; lower task.n_ctx"):
        build_task(clip_config("clip_prompt", task={"ctx_init": None, "n_ctx": 14}))


def test_prompt_tuning_needs_the_loss_only_estimator(clip_config):
    with pytest.raises(ValueError, match="use estimator.name=spsa"):
        build_task(clip_config("clip_prompt", estimator={"name": "lr"}))


def test_queries_to_reach_reads_the_first_crossing(tmp_path):
    from jobs.experiment import backprop_notes, queries_to_reach

    path = tmp_path / "metrics.jsonl"
    records = [
        {"step": 0, "queries": 100},
        {"step": 1, "queries": 200, "val_i2t_r1": 0.4},
        {"step": 2, "queries": 300, "val_i2t_r1": 0.6},
        {"step": 3, "queries": 400, "val_i2t_r1": 0.7},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert queries_to_reach(path, "val_i2t_r1", 0.55) == 300
    assert queries_to_reach(path, "val_i2t_r1", 0.9) is None
    notes = backprop_notes(
        [
            {"run": "f", "estimator": "lr", "test_i2t_r1": 0.45},
            {"run": "b", "estimator": "backprop", "test_i2t_r1": 0.5},
        ],
        "i2t_r1",
    )
    assert notes == ["f: test i2t_r1 0.4500 = 90% of backpropagation's"]
