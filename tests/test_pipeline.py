"""Input pipeline: shapes, process sharding, resumable state, flips, global batches."""

import json
import multiprocessing

import numpy as np
import pytest
from ml_collections import ConfigDict

from sdsup import parallel
from sdsup.data import pipeline, registry, scenes, tokenizers
from sdsup.evaluation.images import stretch_labels

NUM_TRAIN = 96


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = ConfigDict(dict(name="scenes", data_dir=str(tmp_path_factory.mktemp("tfds")), image_size=32,
                             seed=0, num_train=NUM_TRAIN, num_validation=20, num_test=12))
    builder = registry.prepare(registry.SCENES, config)
    return config, builder


@pytest.fixture(scope="module")
def tok():
    return tokenizers.WordTokenizer.scenes(64)


def _train(builder, tok, **kw):
    source = registry.data_source(registry.SCENES, builder, "train")
    args = dict(tokenizer=tok, global_batch_size=8, seed=5, num_threads=0)
    args.update(kw)
    return pipeline.train_dataset(source, **args)


def test_dataset_metadata_and_verification(dataset):
    _, builder = dataset
    meta = builder.info.metadata
    assert meta["class_names"] == list(scenes.CLASS_NAMES)
    assert len(meta["palette"]) == len(scenes.CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == NUM_TRAIN
    registry.verify(registry.SCENES, builder)
    source = registry.data_source(registry.SCENES, builder, "test")
    for i in range(len(source)):
        scene = scenes.Scene.from_json(source[i]["scene"])
        assert scenes.facts(scene) & scenes.HELD_OUT


def test_records_equal_the_generator(dataset):
    config, builder = dataset
    source = registry.data_source(registry.SCENES, builder, "validation")
    for i in (0, 7, 19):
        record = source[i]
        expected = scenes.make_example(config.seed, "validation", int(record["index"]), 32)
        assert np.array_equal(record["image"], expected["image"])
        assert np.array_equal(record["label"], expected["label"])
        assert record["caption"].decode() == expected["caption"]


def test_batches_are_batched_tokenized_and_typed(dataset, tok):
    batch = next(iter(_train(dataset[1], tok)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8, 32, 32) and batch["label"].dtype == np.uint8
    assert batch["tokens"].shape == (8, 64) and batch["tokens"].dtype == np.int32
    assert (batch["tokens"][:, 0] == tok.bos_id).all()


def _epoch_indices(builder, tok, process_index, process_count, epochs=1):
    ds = _train(builder, tok, process_index=process_index, process_count=process_count, flip=False,
                global_batch_size=4 * process_count, num_epochs=epochs, keep_metadata=True)
    return [int(i) for b in ds for i in b["index"]]


def test_processes_read_disjoint_shards_whose_union_is_the_epoch(dataset, tok):
    shards = [_epoch_indices(dataset[1], tok, p, 2) for p in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(NUM_TRAIN))
    assert len(shards[0]) == len(shards[1]) == NUM_TRAIN // 2


def test_each_epoch_is_reshuffled(dataset, tok):
    two = _epoch_indices(dataset[1], tok, 0, 1, epochs=2)
    first, second = two[:NUM_TRAIN], two[NUM_TRAIN:]
    assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
    assert first != second


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_resumes_at_the_same_example(dataset, tok, num_threads):
    ds = _train(dataset[1], tok, num_threads=num_threads)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
    expected = [next(it) for _ in range(15)]  # crosses an epoch boundary (12 batches/epoch)
    resumed = iter(_train(dataset[1], tok, num_threads=num_threads))
    resumed.set_state(state)
    for a, b in zip(expected, (next(resumed) for _ in range(15))):
        for key in ("image", "label", "tokens"):
            assert np.array_equal(a[key], b[key])


def test_worker_processes_give_the_same_stream_and_resume_exactly(dataset, tok):
    """grain worker processes (`input.num_workers`) change where batches are made, not which batches."""
    threads = iter(_train(dataset[1], tok))
    expected = [next(threads) for _ in range(9)]
    workers = iter(_train(dataset[1], tok, num_workers=2))
    try:
        first = [next(workers) for _ in range(4)]
        state = json.loads(json.dumps(workers.get_state()))
    finally:
        workers.close()
    resumed = iter(_train(dataset[1], tok, num_workers=2))
    try:
        resumed.set_state(state)
        rest = [next(resumed) for _ in range(5)]
    finally:
        resumed.close()
    for a, b in zip(expected, first + rest):
        for key in ("image", "label", "tokens"):
            assert np.array_equal(a[key], b[key])


def test_flip_keeps_image_map_and_caption_consistent(dataset, tok):
    source = registry.data_source(registry.SCENES, dataset[1], "train")

    class AlwaysFlip:
        def random(self):
            return 0.0

    pre = pipeline.Preprocess(tok, flip=True, keep_metadata=True, flip_caption=registry.SCENES.flip_caption)
    checked = 0
    for i in range(len(source)):
        record = source[i]
        out = pre.random_map(record, AlwaysFlip())
        assert np.array_equal(out["image"], record["image"][:, ::-1])
        assert np.array_equal(out["label"], record["label"][:, ::-1])
        assert out["caption"] == scenes.swap_left_right(record["caption"].decode())
        assert tok.decode(out["tokens"]) == out["caption"]
        # A thing the flipped caption puts "on the left" is now on the left.
        scene = scenes.Scene.from_json(record["scene"])
        for g in scene.groups:
            ys, xs = np.nonzero(out["label"] == scenes.CLASS_ID[g.cls])
            if g.ref is None and g.slot != 1 and len(xs) >= 3:
                side = "on the left" if xs.mean() < 16 else "on the right"
                if g.layer == "sky":
                    side = "at the top left" if xs.mean() < 16 else "at the top right"
                assert side in out["caption"], (out["caption"], g.cls)
                checked += 1
    assert checked > 20


def test_eval_batches_cover_the_split_once_with_padding(dataset, tok):
    source = registry.data_source(registry.SCENES, dataset[1], "validation")  # 20 examples
    seen = []
    counts = []
    for p in range(3):
        batches = list(pipeline.eval_batches(source, tokenizer=tok, global_batch_size=12,
                                             process_index=p, process_count=3))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 4 and len(b["caption"]) == 4
            seen += [int(i) for i, m in zip(b["index"], b["mask"]) if m]
    assert len(set(counts)) == 1  # every process yields the same number of batches
    assert sorted(seen) == list(range(20))


def test_bad_batch_sizes_are_clear_errors(dataset, tok):
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        _train(dataset[1], tok, global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="must be positive"):
        _train(dataset[1], tok, global_batch_size=0)


def test_global_batch_on_an_8_device_mesh(dataset, tok):
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    it = iter(_train(dataset[1], tok, global_batch_size=16))
    prefetch = parallel.DevicePrefetch(it, mesh, size=2)
    first = next(prefetch)
    assert first["image"].shape == (16, 32, 32, 3)
    assert len(first["image"].sharding.device_set) == 8
    assert first["image"].sharding.spec[0] == ("data", "fsdp")
    # The reported state is that after the batch handed out, not the prefetched ones.
    state = prefetch.get_state()
    second = next(prefetch)
    again = iter(_train(dataset[1], tok, global_batch_size=16))
    again.set_state(state)
    assert np.array_equal(np.asarray(second["tokens"]), next(again)["tokens"])


def test_corrupt_dataset_directory_is_a_clear_error(tmp_path):
    config = ConfigDict(dict(name="scenes", data_dir=str(tmp_path), image_size=16, seed=0,
                             num_train=8, num_validation=4, num_test=4))
    builder = registry.prepare(registry.SCENES, config)
    train_file = [p for p in builder.data_path.iterdir() if "train.array_record" in p.name][0]
    train_file.write_bytes(train_file.read_bytes()[:100])
    with pytest.raises(registry.DatasetError, match="incomplete or corrupt.*delete"):
        registry.prepare(registry.SCENES, config)
    (builder.data_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(registry.DatasetError, match="cannot open"):
        registry.prepare(registry.SCENES, config)


def test_unknown_dataset_and_split():
    with pytest.raises(registry.DatasetError, match="unknown dataset 'ade21k'"):
        registry.get("ade21k")
    with pytest.raises(registry.DatasetError, match="no split 'dev'"):
        registry.data_source(registry.SCENES, None, "dev")


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_real_records_are_decoded_resized_and_cropped_at_read_time():
    """Encoded files -> the square the models see: stretch (ALDM's ADE20K, COCO-Stuff) or resize + crop (Cityscapes)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)
    label = np.zeros((20, 40), np.uint8)
    label[:, 20:] = 3  # right half class 3
    record_image, record_label = _png(image), _png(label)

    square = pipeline.Geometry(16)
    img, lab = square.apply(record_image, record_label, None)
    assert img.shape == (16, 16, 3) and lab.shape == (16, 16) and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0, 3}  # nearest neighbour: no blended ids
    np.testing.assert_array_equal(lab[:, :8], 0)
    np.testing.assert_array_equal(lab[:, 8:], 3)

    wide = pipeline.Geometry(8, resize=(8, 16))  # Cityscapes-like: 1:2, then an 8x8 crop
    centre, centre_lab = wide.apply(record_image, record_label, None)
    assert centre.shape == (8, 8, 3) and set(np.unique(centre_lab)) == {0, 3}
    crops = {tuple(np.unique(wide.apply(record_image, record_label, np.random.default_rng(s))[1]))
             for s in range(200)}
    assert {(0,), (3,)} <= crops  # random crops reach both halves

    whole, whole_lab = wide.apply(record_image, record_label, None, crop=False)  # full-frame evaluation
    assert whole.shape == (8, 16, 3) and np.array_equal(whole_lab[:, :8], np.zeros((8, 8))) and (whole_lab[:, 8:] == 3).all()
    source = [{"image": record_image, "label": record_label, "caption": b"sky.", "index": 0}]
    framed = next(pipeline.eval_batches(source, tokenizer=tokenizers.WordTokenizer.scenes(8), global_batch_size=1,
                                        geometry=wide, full_frame=True))
    assert framed["image"].shape == (1, 8, 16, 3) and framed["label"].shape == (1, 8, 16)

    keep = pipeline.Geometry(10, mode="keep_aspect")
    img, lab = keep.apply(record_image, record_label, None)  # 20x40 -> 10x20, centre 10x10
    assert img.shape == (10, 10, 3) and set(np.unique(lab)) == {0, 3}

    # Arrays of the final size (the scenes) pass unchanged.
    same = np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8)
    out = square.apply(*same, np.random.default_rng(0))
    assert out[0] is same[0] and out[1] is same[1]
    with pytest.raises(ValueError, match="smaller than"):
        pipeline.Geometry(16, resize=(8, 32))


def test_one_of_several_captions_is_drawn_per_example_and_epoch(tok):
    """COCO's five captions: training draws one with the example's rng (reproducible), evaluation takes the first."""
    import json

    record = {"image": np.zeros((8, 8, 3), np.uint8), "label": np.zeros((8, 8), np.uint8), "caption": "a",
              "captions": json.dumps(["sky over grass.", "sky over sand.", "sky over snow."])}
    train = pipeline.Preprocess(tok, flip=False, keep_metadata=True, geometry=pipeline.Geometry(8))
    drawn = [train.random_map(record, np.random.default_rng(s))["caption"] for s in range(30)]
    assert set(drawn) == {"sky over grass.", "sky over sand.", "sky over snow."}
    assert drawn == [train.random_map(record, np.random.default_rng(s))["caption"] for s in range(30)]
    evaluation = pipeline.Preprocess(tok, flip=False, keep_metadata=True, geometry=pipeline.Geometry(8), train=False)
    assert evaluation.random_map(record, None)["caption"] == "sky over grass."


def test_a_square_layout_is_stretched_onto_a_whole_frame():
    square = np.array([[[0, 1], [2, 3]]])
    np.testing.assert_array_equal(stretch_labels(square, (2, 4)), [[[0, 0, 1, 1], [2, 2, 3, 3]]])
    np.testing.assert_array_equal(stretch_labels(square, (4, 2)), [[[0, 1], [0, 1], [2, 3], [2, 3]]])
    assert stretch_labels(square, (2, 2)) is square


def _build_in_child(data_dir, queue):
    config = ConfigDict(dict(name="scenes", data_dir=data_dir, image_size=16, seed=3, num_train=64, num_validation=8,
                             num_test=8))
    builder = registry.prepare(registry.SCENES, config)
    queue.put(len(builder.as_data_source("train")))


def test_runs_sharing_a_data_dir_build_a_dataset_once(tmp_path):
    """Two runs starting at once on a fresh data_dir: one builds, the other waits and reads the same files
    (unlocked, the second build replaced the first one's shards under it)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    children = [context.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(300)
    assert [child.exitcode for child in children] == [0, 0]
    assert [queue.get(timeout=5) for _ in children] == [64, 64]
    versions = list((tmp_path / "sdsup_scenes").glob("*/1.0.0"))
    assert len(versions) == 1 and not list((tmp_path / "sdsup_scenes").glob("*/incomplete*"))
