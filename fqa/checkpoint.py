"""Checkpoints: tensors in safetensors, state in JSON, a checksum manifest, atomic writes.

Layout of one checkpoint directory::

    step-000100/
      model.safetensors      the model's full state dict
      optimizer.safetensors  optimizer tensors; optimizer.json holds the rest
      stats.parquet          per-datapoint variance statistics (fqa.stats)
      state.json             step, queries, allocator state, config, counters
      manifest.json          sha256 of every file above (verified on load)

A local checkpoint is written into a temporary directory and renamed into place, then
the ``latest`` pointer is replaced atomically, so a crash mid-write leaves the previous
checkpoint as the latest. Nothing is unpickled on load.

On object storage (``s3://``, ``gs://``; see fqa.storage) there is no rename, so the order
of writes carries the guarantee instead: every file is uploaded first, then
``manifest.json`` (the checksums), then the ``latest`` pointer. A reader trusts a
checkpoint only once it has downloaded it and every checksum matches its manifest; one
without a manifest, with a torn manifest or with a mismatching file (a driver killed
mid-upload) is skipped, with a warning, for the newest complete one before it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fqa.storage import Remote, process_cache, scratch_dir


class CheckpointError(ValueError):
    """A weights file or checkpoint that is missing, unreadable or belongs to another model."""


log = logging.getLogger(__name__)

_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "stats.parquet",
    "state.json",
)


@dataclass
class CheckpointData:
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    stats_path: Path  # a local file (a remote checkpoint's is its verified download)
    state: dict[str, Any]
    path: Path | Remote


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_files(
    target: Path, step: int, model: torch.nn.Module, optimizer, stats, state: dict[str, Any]
) -> None:
    """The checkpoint's files and their manifest, written into a local directory."""
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_state, str(target / "model.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(target / "optimizer.safetensors"))
    _write_json(target / "optimizer.json", opt_meta)
    stats.save(target / "stats.parquet")
    _write_json(target / "state.json", {**state, "step": step})
    manifest = {name: _sha256(target / name) for name in _FILES}
    _write_json(target / "manifest.json", manifest)


def save_checkpoint(
    directory: Path | Remote,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stats,
    state: dict[str, Any],
    keep: int = 2,
) -> Path | Remote:
    if isinstance(directory, Remote):
        return _save_remote(directory, step, model, optimizer, stats, state, keep)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    # half-written directories of a writer that was killed (one driver per run directory)
    for stale in directory.glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".step-{step:06d}.tmp-{os.getpid()}"
    tmp.mkdir()
    _write_files(tmp, step, model, optimizer, stats, state)
    for name in (*_FILES, "manifest.json"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    if final.exists():  # rewriting a step: never leave a moment with no copy at all
        old = final.with_name(f".{final.name}.tmp-old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    write_text_atomic(directory / "latest", final.name)
    _prune(directory, keep)
    return final


def publish_checkpoint(source: Path, final: Remote) -> None:
    """Upload a complete local checkpoint directory: files, manifest, then ``latest``."""
    (final / "manifest.json").unlink(missing_ok=True)
    for name in _FILES:
        (final / name).upload(source / name)
    (final / "manifest.json").upload(source / "manifest.json")
    (final.parent / "latest").write_text(final.name)


def _save_remote(directory: Remote, step, model, optimizer, stats, state, keep) -> Remote:
    """No rename on object storage: files, then the manifest, then ``latest`` (each object
    write is atomic), so a reader never trusts a checkpoint before all of it is there."""
    final = directory / f"step-{step:06d}"
    staging = scratch_dir("fqa-checkpoint-")
    try:
        _write_files(staging, step, model, optimizer, stats, state)
        # a rewritten step is untrusted until its new manifest lands (keep >= 2 leaves an older one)
        publish_checkpoint(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    steps = sorted((p for p in directory.iterdir() if p.name.startswith("step-")), key=str)
    for old in steps[:-keep]:
        old.rmtree()
    return final


def _prune(directory: Path, keep: int) -> None:
    steps = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory: Path | Remote) -> Path | Remote | None:
    """The checkpoint ``latest`` names; if a crash left it dangling (or missing while
    checkpoints exist), the newest complete one. On object storage, the newest one whose
    download matches its manifest."""
    if isinstance(directory, Remote):
        return _latest_remote(directory)
    pointer = directory / "latest"
    if pointer.is_file():
        path = directory / pointer.read_text().strip()
        if (path / "manifest.json").is_file():
            return path
    complete = sorted(p for p in directory.glob("step-*") if (p / "manifest.json").is_file())
    return complete[-1] if complete else None


def _latest_remote(directory: Remote) -> Remote | None:
    candidates = sorted(
        (p for p in directory.iterdir() if p.name.startswith("step-")),
        key=lambda p: p.name,
        reverse=True,
    )
    pointer = directory / "latest"
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        try:
            _download_verified(candidate)
            return candidate
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", candidate, exc)
    return None


def _download_verified(path: Remote) -> Path:
    """A verified local copy of a remote checkpoint (cached for the process by manifest)."""
    try:
        text = (path / "manifest.json").read_text()
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} has no manifest.json: its upload did not finish"
        ) from None
    try:
        manifest = json.loads(text)
        if set(manifest) != set(_FILES) or not all(isinstance(v, str) for v in manifest.values()):
            raise ValueError(f"lists {sorted(manifest)}")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has a torn manifest.json ({exc})") from None
    local = process_cache() / "checkpoints" / path.scheme / path.path
    if (local / "manifest.json").is_file() and (local / "manifest.json").read_text() == text:
        return local
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for name, digest in manifest.items():
        try:
            (path / name).download(local / name)
        except FileNotFoundError:
            raise CheckpointError(
                f"checkpoint {path}: {name} listed in the manifest is missing"
            ) from None
        if _sha256(local / name) != digest:
            shutil.rmtree(local, ignore_errors=True)
            raise CheckpointError(
                f"checkpoint {path}: {name} does not match its manifest checksum (torn write)"
            )
    (local / "manifest.json").write_text(text)  # last: marks the copy complete
    return local


def load_checkpoint(path: Path | Remote) -> CheckpointData:
    if isinstance(path, Remote):
        data = load_checkpoint(_download_verified(path))
        data.path = path
        return data
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no manifest.json; it is incomplete — delete it"
        )
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest.items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise CheckpointError(
                f"checkpoint {path}: {name} is missing or its checksum does not match the "
                "manifest (truncated or corrupted); delete this checkpoint to resume from an earlier one"
            )
    try:
        optimizer = _unflatten_optimizer(
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "optimizer.json").read_text()),
        )
        return CheckpointData(
            model=load_file(str(path / "model.safetensors")),
            optimizer=optimizer,
            stats_path=path / "stats.parquet",
            state=json.loads((path / "state.json").read_text()),
            path=path,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted names of the config fields whose values differ."""
    fields = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict) and not name.endswith("kwargs"):
            fields += config_differences(a, b, f"{name}.")
        elif a != b:
            fields.append(f"{name} ({a!r} -> {b!r})")
    return fields


def stats_file(path: Path | Remote) -> Path:
    """The checkpoint's statistics as a local file (a remote one's verified copy)."""
    return (_download_verified(path) if isinstance(path, Remote) else path) / "stats.parquet"
