from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mia_ptq_bench.data import load_dataset
from mia_ptq_bench.errors import CacheError
from mia_ptq_bench.pool import PoolStore, build_pool, pool_keep_masks
from mia_ptq_bench.pool import build as build_module
from mia_ptq_bench.data.augment import augment, crop_and_flip
from mia_ptq_bench.pool.train import (init_model, make_schedule, steps_per_epoch, train_sequential,
                                      train_stacked)
from mia_ptq_bench.spec import load_task


def test_augment_crop_and_flip() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    centred = torch.tensor([[2, 2], [2, 2]])
    no_flip = torch.tensor([False, False])
    assert torch.equal(augment(images, centred, no_flip, padding=2), images)
    shifted = augment(images, torch.tensor([[0, 0], [4, 4]]), no_flip, padding=2)
    assert torch.equal(shifted[0, 0, 2:, 2:], images[0, 0, :2, :2]) and (shifted[0, 0, :2] == 0).all()
    assert torch.equal(shifted[1, 0, :2, :2], images[1, 0, 2:, 2:]) and (shifted[1, 0, 2:] == 0).all()
    flipped = augment(images, centred, torch.tensor([True, False]), padding=2)
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])


def test_augment_equals_pad_crop_then_flip_per_image() -> None:
    """Every shift at the edges and both flips, on several channels, against the plain per-image recipe."""
    padding, height, width = 2, 5, 4
    shifts = torch.tensor([[r, c] for r in range(2 * padding + 1) for c in range(2 * padding + 1)] * 2)
    flips = torch.arange(len(shifts)) >= len(shifts) // 2
    images = torch.randint(1, 256, (len(shifts), 3, height, width), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    out = augment(images, shifts, flips, padding)
    for image, (row, col), flip, got in zip(images, shifts.tolist(), flips.tolist(), out):
        crop = torch.nn.functional.pad(image, (padding,) * 4)[:, row:row + height, col:col + width]
        assert torch.equal(got, crop.flip(-1) if flip else crop)
    assert torch.equal(augment(images, shifts, flips, 0), torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images))
    assert augment(images, shifts, torch.zeros_like(flips), 0) is images


def test_crop_and_flip_lays_a_group_out_as_the_wide_networks_input() -> None:
    """Image b*G+g of the drawn batch lands in channel block g of row b, in channels_last memory, and reads
    the pool image its index names, cropped and flipped as the per-image recipe does."""
    padding, group, channels, height, width = 2, 3, 2, 5, 4
    pool = torch.randint(1, 256, (7, channels, height, width), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)
    index = torch.tensor([6, 0, 3, 3, 5, 1])  # two rows of three models, one image drawn twice
    shifts = torch.tensor([[0, 4], [1, 2], [4, 0], [2, 2], [3, 1], [0, 0]])
    flips = torch.tensor([True, False, True, False, False, True])
    out = crop_and_flip(torch.nn.functional.pad(pool, (padding,) * 4), index, shifts, flips, (height, width), group)
    assert out.shape == (2, group * channels, height, width)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i, ((row, col), flip) in enumerate(zip(shifts.tolist(), flips.tolist())):
        crop = torch.nn.functional.pad(pool[index[i]], (padding,) * 4)[:, row:row + height, col:col + width]
        b, g = divmod(i, group)
        assert torch.equal(out[b, g * channels:(g + 1) * channels], crop.flip(-1) if flip else crop), i


def test_schedule_draws_only_members_and_is_seeded(tiny_task) -> None:
    keep = pool_keep_masks(tiny_task, 400)
    members = np.flatnonzero(keep[3])
    a = make_schedule(tiny_task, members, 400, 3)
    b = make_schedule(tiny_task, members, 400, 3)
    assert torch.equal(a.batches, b.batches)
    assert set(a.batches.flatten().tolist()) <= set(members.tolist())
    assert a.batches.shape == (tiny_task.training.epochs * steps_per_epoch(tiny_task, 400), 32)
    # the first epoch's worth of the stream is a permutation prefix: no repeats
    first = a.batches.flatten()[: len(members)]
    assert len(set(first.tolist())) == len(first)
    assert not torch.equal(make_schedule(tiny_task, members, 400, 4).batches, a.batches)


def test_stacked_training_equals_sequential(tiny_task) -> None:
    data = load_dataset(tiny_task.dataset)
    keep = pool_keep_masks(tiny_task, len(data.pool))
    indices = [0, 1, 2]
    schedules = [make_schedule(tiny_task, np.flatnonzero(keep[i]), len(data.pool), i) for i in indices]
    sequential = [train_sequential(tiny_task, data, init_model(tiny_task, data, i), s, torch.device("cpu"))
                  for i, s in zip(indices, schedules)]
    stacked = train_stacked(tiny_task, data, [init_model(tiny_task, data, i) for i in indices], schedules,
                            torch.device("cpu"))
    for a, b in zip(sequential, stacked, strict=True):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    untrained = init_model(tiny_task, data, 0)
    assert not torch.allclose(untrained.state_dict()["1.weight"], stacked[0].state_dict()["1.weight"])


def test_pool_learns_and_caches(tiny_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    assert pool.scores.shape == (8, 400, 2) and pool.scores.dtype == np.float64
    assert pool.test_accuracy.min() > 0.5  # far above 10% chance after 4 epochs
    members = pool.scores[..., 0][pool.keep].mean()
    non_members = pool.scores[..., 0][~pool.keep].mean()
    assert members > non_members  # the gap every membership attack feeds on

    def no_training(*args, **kwargs):
        raise AssertionError("a cached pool must not retrain")

    monkeypatch.setattr(build_module, "train_stacked", no_training)
    monkeypatch.setattr(build_module, "train_sequential", no_training)
    again = build_pool(tiny_task, data, tmp_path)
    assert np.array_equal(again.scores, pool.scores)
    model = again.load_model(5)
    assert torch.equal(model.state_dict()["1.weight"], pool.load_model(5).state_dict()["1.weight"])


class Interrupt(Exception):
    pass


def interrupt_after_saving(models: int, monkeypatch: pytest.MonkeyPatch, build) -> None:
    """Run ``build`` until it has saved ``models`` pool models, then kill it (an Interrupt)."""
    original_save = build_module.PoolStore.save_model
    saved = []

    def save_then_maybe_die(self, index, *args, **kwargs):
        original_save(self, index, *args, **kwargs)
        saved.append(index)
        if len(saved) == models:
            raise Interrupt

    monkeypatch.setattr(build_module.PoolStore, "save_model", save_then_maybe_die)
    with pytest.raises(Interrupt):
        build()
    monkeypatch.setattr(build_module.PoolStore, "save_model", original_save)


@pytest.mark.parametrize("trainer", ["stacked", "sequential"])
def test_interrupted_build_resumes_to_identical_pool(tiny_task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     trainer: str) -> None:
    data = load_dataset(tiny_task.dataset)
    reference = build_pool(tiny_task, data, tmp_path / "reference", trainer=trainer, stack=3)

    interrupt_after_saving(4, monkeypatch, lambda: build_pool(tiny_task, data, tmp_path / "resumed", trainer=trainer,
                                                              stack=3))

    trained_again = []
    original_schedule = build_module.make_schedule
    monkeypatch.setattr(build_module, "make_schedule",
                        lambda s, m, n, i: trained_again.append(i) or original_schedule(s, m, n, i))
    resumed = build_pool(tiny_task, data, tmp_path / "resumed", trainer=trainer, stack=3)
    # finished groups are not trained again; the group in flight ([3, 4, 5] when stacked by 3) is retrained whole
    assert trained_again == ([3, 4, 5, 6, 7] if trainer == "stacked" else [4, 5, 6, 7])
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    np.testing.assert_array_equal(resumed.test_accuracy, reference.test_accuracy)


def test_a_build_resumed_where_another_group_size_is_chosen_keeps_its_groups(tiny_task, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """auto_stack follows the machine's memory: resumed elsewhere, the automatic choice changed the groups."""
    data = load_dataset(tiny_task.dataset)
    reference = build_pool(tiny_task, data, tmp_path / "reference", trainer="stacked", stack=3)
    monkeypatch.setattr(build_module, "auto_stack", lambda *args: 3)  # the first machine's choice
    interrupt_after_saving(4, monkeypatch, lambda: build_pool(tiny_task, data, tmp_path / "resumed"))
    monkeypatch.setattr(build_module, "auto_stack", lambda *args: 2)  # the second machine's
    trained_again = []
    original_schedule = build_module.make_schedule
    monkeypatch.setattr(build_module, "make_schedule",
                        lambda s, m, n, i: trained_again.append(i) or original_schedule(s, m, n, i))
    log = Logged()
    resumed = build_pool(tiny_task, data, tmp_path / "resumed", progress=log)
    assert trained_again == [3, 4, 5, 6, 7]  # groups of 3 as started ([3, 4, 5], [6, 7]), not [2, 3], [4, 5], ...
    assert any(line.startswith("resuming in groups of 3 models, as this pool was started (this machine would choose "
                               "groups of 2 models; delete ") for line in log.lines)
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    # an explicit choice is followed, and said to change the bits
    PoolStore(tmp_path / "resumed", tiny_task).discard(7)
    log = Logged()
    build_pool(tiny_task, data, tmp_path / "resumed", progress=log, trainer="sequential")
    assert any("training in groups of 1 models, where this pool was started in groups of 3" in line
               for line in log.lines)


def test_interrupted_batchnorm_build_resumes_to_identical_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    reference = build_pool(spec, data, tmp_path / "reference", trainer="stacked", stack=2)
    interrupt_after_saving(3, monkeypatch, lambda: build_pool(spec, data, tmp_path / "resumed", trainer="stacked", stack=2))
    resumed = build_pool(spec, data, tmp_path / "resumed", trainer="stacked", stack=2)
    np.testing.assert_array_equal(resumed.scores, reference.scores)  # group [2, 3] retrained whole: same bits
    for index in range(4):
        a, b = resumed.load_model(index).state_dict(), reference.load_model(index).state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a)  # BatchNorm running statistics included


class Logged:
    """A Progress that keeps the log lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, key, description, total) -> None:
        pass

    def advance(self, key, amount=1) -> None:
        pass

    def log(self, message: str) -> None:
        self.lines.append(message)


def test_corrupted_cache_files_are_detected_and_rebuilt(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    digest = pool.store.digest()
    scores = pool.store.scores_path(2)
    scores.write_bytes(scores.read_bytes()[:-8] + b"garbage!")
    weights = pool.store.weights_path(5)
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    log = Logged()
    rebuilt = build_pool(tiny_task, data, tmp_path, trainer="sequential", progress=log)
    assert len(log.lines) == 2
    assert "model 2" in log.lines[0] and "model-0002.npy: sha256" in log.lines[0]
    assert "model 5" in log.lines[1] and "model-0005.safetensors" in log.lines[1]
    np.testing.assert_array_equal(rebuilt.scores, pool.scores)  # retrained to the same bits
    assert torch.equal(rebuilt.load_model(5).state_dict()["1.weight"], pool.load_model(5).state_dict()["1.weight"])
    # the same bits make the same files (safetensors' metadata order is not left to chance): the same pool digest
    assert rebuilt.store.digest() == digest
    reseeded = tiny_task.training.model_copy(update={"seed": tiny_task.training.seed + 1})
    other = build_pool(tiny_task.model_copy(update={"training": reseeded}), data, tmp_path / "other",
                       trainer="sequential")
    assert other.store.digest() != digest


def test_the_pool_digest_names_weights_and_scores(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    store, digest = pool.store, pool.store.digest()
    model = pool.load_model(3)
    for _ in range(8):  # safetensors orders a map's entries by chance: the same weights must give the same file
        store.save_model(3, model, store.load_scores(3), store.record(3).test_accuracy, autocast=False)
        assert store.digest() == digest
    record = json.loads(store.record_path(3).read_text())
    for field in ("weights_sha256", "scores_sha256"):
        store.record_path(3).write_text(json.dumps({**record, field: "0" * 64}))
        assert store.digest() != digest, field
    store.record_path(3).write_text(json.dumps(record))
    assert store.digest() == digest


@pytest.mark.parametrize("index", ["1e400", "3.0", "true", "\"3\""])
def test_a_record_whose_index_is_not_a_whole_number_is_one_error_and_the_model_is_retrained(
        tiny_task, tmp_path: Path, index: str) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    path = pool.store.record_path(3)
    saved = path.read_text()
    path.write_text(re.sub(r'"index": 3\b', f'"index": {index}', saved))  # 1e400 reads as inf, which int() refuses
    with pytest.raises(CacheError, match=r"model-0003\.json: index: .* is not a whole number: malformed completion"):
        pool.store.record(3)
    log = Logged()
    rebuilt = build_pool(tiny_task, data, tmp_path, trainer="sequential", progress=log)
    assert len(log.lines) == 1 and "rebuilding model 3" in log.lines[0]
    assert path.read_text() == saved
    np.testing.assert_array_equal(rebuilt.scores, pool.scores)


def test_an_empty_or_foreign_typed_npy_in_a_pool_is_one_cache_error(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    store, keep = pool.store, pool.store.root / "keep.npy"
    saved = keep.read_bytes()
    keep.write_bytes(b"")  # truncated to nothing: numpy raises EOFError
    with pytest.raises(CacheError, match=r"keep\.npy: unreadable cache file \(No data left in file\)"):
        build_pool(tiny_task, data, tmp_path, trainer="sequential")
    masks = np.load(io.BytesIO(saved))
    np.save(keep, np.zeros(masks.shape, dtype=[("a", "i4"), ("b", "f8")]))  # numpy cannot compare it with the masks
    with pytest.raises(CacheError, match=r"keep\.npy: masks differ from the task's"):
        build_pool(tiny_task, data, tmp_path, trainer="sequential")
    keep.write_bytes(saved)
    # an empty scores file that its record vouches for (a pulled pool's record can): one error, not EOFError
    scores, record = store.scores_path(2), store.record_path(2)
    scores.write_bytes(b"")
    record.write_text(json.dumps({**json.loads(record.read_text()), "scores_sha256": hashlib.sha256(b"").hexdigest()}))
    with pytest.raises(CacheError, match=r"model-0002\.npy: unreadable cache file \(No data left in file\)"):
        store.load_scores(2)


def test_weights_corrupted_after_the_build_are_refused(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    weights = pool.store.weights_path(1)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CacheError, match=r"model-0001\.safetensors: sha256 .*corrupted cache file"):
        pool.load_model(1)


def test_foreign_cache_folder_is_refused(tiny_task, tmp_path: Path) -> None:
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    header = pool.store.root / "pool.json"
    header.write_text(header.read_text().replace(tiny_task.pool_hash, "f" * 64))
    with pytest.raises(CacheError, match="pool_hash: belongs to pool"):
        build_pool(tiny_task, data, tmp_path)


def test_a_pool_trained_on_other_data_is_refused(tiny_task, tmp_path: Path) -> None:
    from mia_ptq_bench.data import ImageDataset, Split

    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    header = pool.store.root / "pool.json"
    assert json.loads(header.read_text())["data_sha256"] == data.digest()
    images = data.pool.images.clone()
    images[0, 0, 0, 0] ^= 1  # one pixel of one image: other files under the same task
    other = ImageDataset(data.name, Split(images, data.pool.labels), data.test, data.num_classes, data.mean, data.std)
    assert other.digest() != data.digest()
    with pytest.raises(CacheError, match=r"pool\.json: data_sha256: this pool was trained on other data"):
        build_pool(tiny_task, other, tmp_path)
    # a header written before pools recorded their data takes the data of its next use
    info = json.loads(header.read_text())
    del info["data_sha256"]
    header.write_text(json.dumps(info))
    build_pool(tiny_task, data, tmp_path)
    assert json.loads(header.read_text())["data_sha256"] == data.digest()
    assert json.loads(header.read_text())["data_hash_version"] == 2
    # A header from before the hash's definition changed (no data_hash_version) that names another hash
    # may be of these very files: the refusal says so rather than that the data differs.
    info = json.loads(header.read_text())
    del info["data_hash_version"]
    header.write_text(json.dumps(info))  # an earlier version's header whose hash this version gives too
    build_pool(tiny_task, data, tmp_path)
    assert json.loads(header.read_text())["data_hash_version"] == 2
    header.write_text(json.dumps({**info, "data_sha256": "c" * 64}))
    with pytest.raises(CacheError, match=r"pool\.json: data_sha256: recorded by an earlier mia-ptq-bench \(cccccccccccc…\), "
                                          r"whose hash of the same files could differ"):
        build_pool(tiny_task, data, tmp_path)


def test_a_pulled_pool_with_a_model_retrained_here_no_longer_names_the_hub(tiny_task, tmp_path: Path) -> None:
    from mia_ptq_bench.pool.hub import pool_source

    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    source = pool.store.root / "source.json"
    source.write_text(json.dumps({"repo": "someorg/digits-pool", "revision": "0" * 40}))  # as a pull leaves it
    assert pool_source(pool.store).repo == "someorg/digits-pool"
    weights = pool.store.weights_path(5)
    weights.write_bytes(weights.read_bytes()[:100])
    rebuilt = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    assert not source.exists() and pool_source(rebuilt.store) is None


@pytest.mark.parametrize("name, text", [("pool.json", "[]"), ("source.json", "{oops"), ("source.json", "[1]"),
                                        ("source.json", "[" * 100_000)])
def test_malformed_pool_bookkeeping_is_one_clear_error(tiny_task, tmp_path: Path, name: str, text: str) -> None:
    from mia_ptq_bench.pool.hub import pool_source

    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    (pool.store.root / name).write_text(text)
    with pytest.raises(CacheError, match=f"{name}: unreadable cache record"):
        build_pool(tiny_task, data, tmp_path) if name == "pool.json" else pool_source(pool.store)


def test_special_files_in_a_pool_cache_are_refused_without_blocking(tiny_task, tmp_path: Path) -> None:
    # A FIFO blocks whoever opens it for reading until someone writes; a folder cannot be unlinked.
    # A FIFO record used to hang the build and a folder to raise a traceback: now one is redone, the other refused.
    import signal

    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path, trainer="sequential")
    record, keep = pool.store.record_path(2), pool.store.root / "keep.npy"
    saved = {path: path.read_bytes() for path in (record, keep)}

    def stuck(signum, frame):
        raise TimeoutError("reading a FIFO in the cache blocked")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        record.unlink()
        os.mkfifo(record)  # a model's record: that model is retrained, as for any damaged file
        log = Logged()
        build_pool(tiny_task, data, tmp_path, trainer="sequential", progress=log)
        assert any("model-0002.json: unreadable cache record (not a regular file" in line for line in log.lines)
        assert record.is_file() and record.read_bytes() == saved[record]
        keep.unlink()
        os.mkfifo(keep)  # the pool's masks: nothing to retrain from
        with pytest.raises(CacheError, match=r"keep\.npy: not a regular file"):
            build_pool(tiny_task, data, tmp_path, trainer="sequential")
        keep.unlink()
        keep.write_bytes(saved[keep])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    weights = pool.store.weights_path(3)
    weights.unlink()
    weights.mkdir()
    with pytest.raises(CacheError, match=r"model-0003\.safetensors: a folder where model 3's file belongs"):
        build_pool(tiny_task, data, tmp_path, trainer="sequential")


def test_batchnorm_models_build_in_stacked_groups(tmp_path: Path) -> None:
    from mia_ptq_bench.pool.train import auto_stack

    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    pool = build_pool(spec, data, tmp_path, trainer="stacked", stack=2)
    assert pool.scores.shape == (spec.membership.n_models, 300, 2) and np.isfinite(pool.scores).all()
    assert 2 <= auto_stack(spec, data, torch.device("cpu"), force=True) <= spec.membership.n_models
    # stacking was measured on the CPU only: elsewhere the automatic choice trains one at a time
    assert auto_stack(spec, data, torch.device("cuda")) == 1


@pytest.mark.slow
def test_our_trainer_learns_as_well_as_the_reference_loop() -> None:
    """Same recipe, same members: the study-style DataLoader loop and ours reach the same accuracy."""
    from study_loop import train_reference
    from mia_ptq_bench.inference import accuracy

    spec = load_task("tiny-cnn")
    spec = spec.model_copy(update={
        "training": spec.training.model_copy(update={"epochs": 10, "lr": 0.01}),
        "model": spec.model.model_copy(update={"width": 0.5}),
        "dataset": spec.dataset.model_copy(update={"pool_size": 1000, "test_size": 400}),
    })
    data = load_dataset(spec.dataset)
    keep = pool_keep_masks(spec, len(data.pool))
    ours, reference = [], []
    for i in range(4):
        members = np.flatnonzero(keep[i])
        model = train_sequential(spec, data, init_model(spec, data, i), make_schedule(spec, members, 1000, i),
                                 torch.device("cpu"))
        ours.append(accuracy(model, data, data.test))
        reference.append(accuracy(train_reference(spec, data, init_model(spec, data, i), members, seed=i), data, data.test))
    assert min(np.mean(ours), np.mean(reference)) > 0.6  # both learn (10% is chance)
    assert abs(np.mean(ours) - np.mean(reference)) < 0.06  # and equally well, within 6 points over 4 models


def _tested(pool) -> int:
    """How many test images a pool's quantized models are scored on (the cached predictions' length)."""
    from mia_ptq_bench.data.splits import evaluation_test_split

    return len(evaluation_test_split(pool.spec.calibration, pool.dataset))


def test_quantized_outputs_of_other_pool_weights_are_redone(tiny_task, tmp_path: Path) -> None:
    """A retrained pool keeps its cache folder's name; its old quantized outputs must not be reused."""
    import dataclasses

    from mia_ptq_bench.quantize import QUANTIZERS
    from mia_ptq_bench.quantize.outputs import ModelOutputs, OutputStore, environment_key
    from mia_ptq_bench.spec import PrecisionPlan

    from mia_ptq_bench.models import quantizable_layers
    from mia_ptq_bench.spec.audit import LayerAudit

    pool = build_pool(tiny_task, load_dataset(tiny_task.dataset), tmp_path)
    plan = PrecisionPlan.parse("w2")
    store = OutputStore(tmp_path, pool, QUANTIZERS.get("rtn")(), plan, environment_key("cpu"))
    layers = quantizable_layers(pool.load_model(0, "cpu"))
    audit = [LayerAudit.measured(name, plan.bits_for(i, len(layers)), 4, int(layer.weight.shape[0]))
             for i, (name, layer) in enumerate(layers)]
    outputs = ModelOutputs(np.zeros((pool.keep.shape[1], len(tiny_task.queries))), np.zeros(_tested(pool), dtype=np.int64), audit)
    store.save(0, outputs)
    assert store.load(0) is not None
    record = pool.store.record(0)
    retrained = dataclasses.replace(record, weights_sha256="0" * 64)
    pool.store.record = lambda index: retrained  # the pool model now has other weights
    assert store.load(0) is None and not store.path(0).exists()


def test_quantized_outputs_of_another_environment_are_kept_apart(tiny_task, tmp_path: Path, monkeypatch) -> None:
    """A result records the environment it ran in: outputs cached under another one (a torch upgrade, another
    processor, another device) are neither reused nor deleted, and this environment's are made beside them."""
    from mia_ptq_bench.environment import environment
    from mia_ptq_bench.models import quantizable_layers
    from mia_ptq_bench.quantize import QUANTIZERS, outputs as outputs_module
    from mia_ptq_bench.quantize.outputs import ModelOutputs, OutputStore, environment_key
    from mia_ptq_bench.spec import PrecisionPlan
    from mia_ptq_bench.spec.audit import LayerAudit

    pool = build_pool(tiny_task, load_dataset(tiny_task.dataset), tmp_path)
    plan = PrecisionPlan.parse("w2")
    layers = quantizable_layers(pool.load_model(0, "cpu"))
    audit = [LayerAudit.measured(name, plan.bits_for(i, len(layers)), 4, int(layer.weight.shape[0]))
             for i, (name, layer) in enumerate(layers)]
    here = OutputStore(tmp_path, pool, QUANTIZERS.get("rtn")(), plan, environment_key("cpu"))
    here.save(0, ModelOutputs(np.zeros((pool.keep.shape[1], len(tiny_task.queries))), np.zeros(_tested(pool), dtype=np.int64), audit))
    assert OutputStore(tmp_path, pool, QUANTIZERS.get("rtn")(), plan, environment_key("cpu")).load(0) is not None

    upgraded = {**environment("cpu"), "packages": {**environment("cpu")["packages"], "torch": "99.0"}}
    monkeypatch.setattr(outputs_module, "environment", lambda device, workers=1: upgraded)
    there = OutputStore(tmp_path, pool, QUANTIZERS.get("rtn")(), plan, environment_key("cpu"))
    assert there.root != here.root and there.load(0) is None
    assert here.path(0).exists()  # the other environment's outputs stay for it
    # a file moved into this environment's folder is refused by the key it records, and redone
    there.root.mkdir(parents=True)
    here.path(0).rename(there.path(0))
    assert there.load(0) is None and not there.path(0).exists()


def test_a_unit_writes_its_outputs_under_the_key_its_driver_hands_it(tiny_task, tmp_path: Path) -> None:
    """A worker process may see another environment than its driver (threads, settings): the driver's key
    decides where the outputs go, so that the driver finds them."""
    from mia_ptq_bench.context import RunContext
    from mia_ptq_bench.quantize import QUANTIZERS
    from mia_ptq_bench.quantize.outputs import OutputStore, environment_key, quantize_unit
    from mia_ptq_bench.spec import PrecisionPlan

    pool = build_pool(tiny_task, load_dataset(tiny_task.dataset), tmp_path)
    driver_key = "d" * 64  # not this process's environment_key
    assert environment_key("cpu") != driver_key
    rtn = QUANTIZERS.get("rtn")()
    assert quantize_unit(RunContext(tiny_task, tmp_path), rtn, "w2", driver_key, (1,)) == [1]
    store = OutputStore(tmp_path, pool, rtn, PrecisionPlan.parse("w2"), driver_key)
    assert store.root.name.endswith(f"-env{'d' * 8}-v3") and store.load(1) is not None
    assert OutputStore(tmp_path, pool, rtn, PrecisionPlan.parse("w2"), environment_key("cpu")).load(1) is None


def test_hflip_query_mirrors_left_right_and_the_pool_scores_it(tiny_task, tmp_path: Path) -> None:
    from mia_ptq_bench.inference import QUERIES

    images = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)  # no symmetry along any axis
    mirrored = torch.empty_like(images)
    for column in range(4):
        mirrored[..., column] = images[..., 3 - column]
    assert torch.equal(QUERIES.get("hflip")(images), mirrored)
    assert torch.equal(QUERIES.get("identity")(images), images)

    assert list(tiny_task.queries) == ["identity", "hflip"]
    data = load_dataset(tiny_task.dataset)
    pool = build_pool(tiny_task, data, tmp_path)
    raw = data.pool.images
    side = raw.shape[-1]
    flipped = raw[..., [side - 1 - column for column in range(side)]]
    labels = data.pool.labels.long()
    for index in (0, 5):
        model = pool.load_model(index).eval()
        with torch.no_grad():
            for query, batch in enumerate((raw, flipped)):
                logits = model(data.normalize(batch)).double()
                true = logits.gather(1, labels[:, None])[:, 0]
                others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
                np.testing.assert_allclose(pool.scores[index, :, query], (true - others).numpy(), rtol=1e-5, atol=1e-5)
        assert np.abs(pool.scores[index, :, 1] - pool.scores[index, :, 0]).max() > 0.1  # the mirror is seen


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdg: str) -> None:
    """As the XDG spec says: else the cache would follow the working directory, and a rerun elsewhere recompute."""
    from mia_ptq_bench.cache import CACHE_ENV, default_cache_dir

    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert default_cache_dir() == tmp_path / ".cache" / "mia-ptq-bench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mia-ptq-bench"


def test_a_bookkeeping_file_removed_mid_run_says_so(tmp_path: Path) -> None:
    # `cache clear` during an evaluate removed a record the run then read: the advice was to delete it.
    with pytest.raises(CacheError, match=r"model-0000\.json: missing \(removed while this run used the cache, by "
                                         r"`cache clear` or another process\?\); rerun to redo that work"):
        PoolStore.read_record(tmp_path / "model-0000.json")


def test_process_executor_returns_in_job_order_and_raises_a_units_error() -> None:
    from mia_ptq_bench.errors import BenchError
    from mia_ptq_bench.executor import ProcessExecutor
    from worker_units import dies, raises_bench_error

    executor = ProcessExecutor(2)
    assert executor.map(raises_bench_error, [3, 1, 4]) == [9, 1, 16]
    with pytest.raises(BenchError, match="two: refused input"):
        executor.map(raises_bench_error, [1, 2, 3])
    with pytest.raises(BenchError, match="job 1: a worker process died"):
        executor.map(dies, [0, 1], describe=lambda job: f"job {job}")
    with pytest.raises(BenchError, match="worker processes: 0"):
        ProcessExecutor(0)


def test_process_executor_reports_each_unit_as_it_ends_not_all_at_the_end(tmp_path: Path) -> None:
    from mia_ptq_bench.executor import ProcessExecutor
    from mia_ptq_bench.progress import SilentProgress
    from worker_units import sees_the_first_reported

    flag = tmp_path / "first unit reported"

    class Reported(SilentProgress):
        def advance(self, key: str, amount: int = 1) -> None:
            flag.touch()

    jobs = [(str(flag), 0), (str(flag), 1)]
    assert ProcessExecutor(2).map(sees_the_first_reported, jobs, progress=Reported(), key="k") == [True, True]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_ends_when_its_driver_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves the driver no chance to stop its workers: each must not go on with a unit nobody waits for."""
    import signal
    import subprocess
    import time

    driver = subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                               "from mia_ptq_bench.executor import ProcessExecutor; import worker_units; "
                               "ProcessExecutor(1).map(worker_units.writes_its_pid_then_sleeps, [sys.argv[2]])",
                               str(Path(__file__).parent), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("*.pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
        (found,) = tmp_path.glob("*.pid")
        worker = int(found.stem)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent (init, here) has yet to reap it


def test_groups_trained_in_worker_processes_are_the_groups_trained_here(tmp_path: Path) -> None:
    """Two processes of one thread (the driver's two shared out) train the same bits as this process with one
    thread: BatchNorm, stacked. The workers train on the data as the driver holds it, not as they would load it
    again; and the last group of a resumed build, trained in the driver, gets a worker's thread, so its bits."""
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    data.pool.images[:40] = 255 - data.pool.images[:40]  # not what loading the task's data gives
    log = Logged()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        apart = build_pool(spec, data, tmp_path / "workers", trainer="stacked", stack=2, workers=2, progress=log)
        assert "training 4 groups in 2 processes of 1 thread(s) each" in log.lines
        assert not data.pool.images.is_shared()  # handed over by value, not through /dev/shm
        PoolStore(tmp_path / "workers", spec).discard(7)
        resumed = build_pool(spec, data, tmp_path / "workers", trainer="stacked", stack=2, workers=2)
        assert torch.get_num_threads() == 2  # given back
        torch.set_num_threads(1)
        here = build_pool(spec, data, tmp_path / "here", trainer="stacked", stack=2, workers=1)
    finally:
        torch.set_num_threads(threads)
    for pool in (apart, resumed):
        np.testing.assert_array_equal(pool.scores, here.scores)
        np.testing.assert_array_equal(pool.test_accuracy, here.test_accuracy)
        for index in range(spec.membership.n_models):
            a, b = pool.load_model(index).state_dict(), here.load_model(index).state_dict()
            assert all(torch.equal(a[name], b[name]) for name in a), index


def test_a_pool_started_in_one_process_resumes_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """groups.json of a build from before workers were recorded says nothing of them: it trained every group in
    one process with all the threads, and its remaining groups must too, or they would round differently."""
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reference = build_pool(spec, data, tmp_path / "reference", trainer="stacked", stack=2, workers=1)
        interrupt_after_saving(3, monkeypatch, lambda: build_pool(spec, data, tmp_path / "resumed", stack=2, workers=1))
        groups = PoolStore(tmp_path / "resumed", spec).root / "groups.json"
        groups.write_text(json.dumps({"models_per_group": 2, "device": "cpu"}))  # as written before workers
        monkeypatch.setattr(build_module, "auto_stack", lambda *args: 2)
        monkeypatch.setattr(build_module, "auto_workers", lambda *args: 2)  # this machine would use workers now
        log = Logged()
        resumed = build_pool(spec, data, tmp_path / "resumed", progress=log)
    finally:
        torch.set_num_threads(threads)
    assert any(line.startswith("resuming in groups of 2 models, as this pool was started (this machine would choose "
                               "groups of 1 models in 2 worker processes; delete ") for line in log.lines), log.lines
    np.testing.assert_array_equal(resumed.scores, reference.scores)
    assert json.loads(groups.read_text())["workers"] == 1


def test_a_complete_pool_loads_without_a_word_of_its_layout(tmp_path: Path) -> None:
    """Nothing is left to train, so no layout is resumed or departed from, whatever this machine would choose."""
    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    build_pool(spec, data, tmp_path, trainer="stacked", stack=2, workers=1)
    log = Logged()
    build_pool(spec, data, tmp_path, stack=4, workers=2, progress=log)
    assert not [line for line in log.lines if "groups of" in line], log.lines


def test_workers_are_chosen_for_much_training_on_a_cpu_with_threads_to_share() -> None:
    from mia_ptq_bench.pool.train import WORKER_WORK, auto_workers

    cpu = torch.device("cpu")
    assert auto_workers(cpu, 2, WORKER_WORK) == 2 and auto_workers(cpu, 8, WORKER_WORK) == 2
    assert auto_workers(cpu, 2, WORKER_WORK / 2) == 1  # starting the workers would cost more than they gain
    assert auto_workers(cpu, 1, 10 * WORKER_WORK) == 1
    assert auto_workers(torch.device("cuda"), 2, 10 * WORKER_WORK) == 1


def test_the_tasks_training_flops_are_counted_once_per_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    from mia_ptq_bench.pool import train

    spec = load_task("tiny-cnn")
    data = load_dataset(spec.dataset)
    counted = []
    count = train.training_flops
    monkeypatch.setattr(train, "_TASK_FLOPS", {})
    monkeypatch.setattr(train, "training_flops", lambda *args: counted.append(1) or count(*args))
    first = train.task_training_flops(spec, data)
    assert first == count(init_model(spec, data, 3), data.input_shape) > 0  # the weights do not change the count
    assert train.task_training_flops(spec, data) == first and len(counted) == 1
    wider = spec.model_copy(update={"model": spec.model.model_copy(update={"width": spec.model.width * 2})})
    assert train.task_training_flops(wider, data) > first and len(counted) == 2
