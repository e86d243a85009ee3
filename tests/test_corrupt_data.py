"""A record damaged in the middle of a built dataset: an error naming the split and the index, never a hang.

Policy (sdsup.data.registry.CheckedSource): stop, never skip. array_record
keeps a hash per chunk of records, so damaged bytes fail the read of the
records in that chunk; sdsup turns that failure into a DatasetError naming
the dataset, the split, the record's index and the directory to delete
(rebuild). The dataset's own check when it is opened reads only each split's
first and last record, so the damage here passes it and is found when the
record is read: by the training stream (grain reader threads or worker
processes), by the ordered evaluation pass, and by the data stage's
statistics, which `sdsup.train` prints as one `error: ...` line.
"""

import os
import threading

import numpy as np
import pytest
from ml_collections import ConfigDict

import smoke_workdir
from cli_harness import assert_clear_error, block_real_work, call_in_process
from sdsup.data import pipeline, registry, tokenizers

SPLIT_SIZES = dict(num_train=64, num_validation=8, num_test=8)
NEVER_A_HANG_S = 120  # the bound on any read of a damaged record (a worker process starts within it)


def _config(data_dir):
    return ConfigDict(dict(name="scenes", data_dir=str(data_dir), image_size=16, seed=0, **SPLIT_SIZES))


def damage_the_middle(path: str) -> None:
    """Overwrites 16 bytes a third of the way into the file's records (not its index), keeping its size."""
    data = bytearray(open(path, "rb").read())
    used = int(np.nonzero(np.frombuffer(bytes(data), np.uint8))[0].max())  # the file ends in zero padding
    start = used // 3
    data[start:start + 16] = b"\xab" * 16
    with open(path, "wb") as f:
        f.write(bytes(data))


def train_file(builder) -> str:
    return str(next(p for p in builder.data_path.iterdir() if "train.array_record" in p.name))


def unreadable_indices(builder) -> list:
    """Which train records the raw tfds source fails to read (the records of the damaged chunk)."""
    raw = builder.as_data_source("train")
    bad = []
    for i in range(len(raw)):
        try:
            raw[i]
        except Exception:  # noqa: BLE001 (whatever riegeli raises: the test only needs the indices)
            bad.append(i)
    return bad


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """(builder, indices of unreadable train records) of a tiny scenes dataset damaged after it was built."""
    config = _config(tmp_path_factory.mktemp("tfds"))
    builder = registry.prepare(registry.SCENES, config)
    damage_the_middle(train_file(builder))
    builder = registry.prepare(registry.SCENES, config)  # the open-time check (first and last records) passes
    bad = unreadable_indices(builder)
    assert bad and 0 not in bad and len(builder.as_data_source("train")) - 1 not in bad
    return builder, bad


def _message(index: int) -> str:
    return f"record {index} of split 'train' cannot be read"


def test_reading_a_damaged_record_names_split_and_index(damaged):
    builder, bad = damaged
    source = registry.data_source(registry.SCENES, builder, "train")
    with pytest.raises(registry.DatasetError, match=_message(bad[0])) as error:
        source[bad[0]]
    assert str(builder.data_dir) in str(error.value) and "delete" in str(error.value)
    good = next(i for i in range(len(source)) if i not in bad)
    assert source[good]["image"].shape == (16, 16, 3)  # the rest of the split still reads


def _first_error(make_iterator, batches: int):
    """The exception that reading `batches` batches raises, from a thread with a deadline (a hang fails)."""
    outcome = {}

    def read():
        iterator = make_iterator()
        try:
            for _ in range(batches):
                next(iterator)
        except Exception as e:  # noqa: BLE001 (returned to the test to check)
            outcome["error"] = e
        finally:
            if hasattr(iterator, "close"):
                iterator.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(NEVER_A_HANG_S)
    assert not reader.is_alive(), f"reading a damaged dataset hung for {NEVER_A_HANG_S} s"
    return outcome.get("error")


@pytest.mark.parametrize("readers", [dict(num_threads=2), dict(num_threads=2, num_workers=1)],
                         ids=["threads", "worker_process"])
def test_the_training_stream_stops_with_the_split_and_index(damaged, readers):
    builder, bad = damaged
    source = registry.data_source(registry.SCENES, builder, "train")
    tok = tokenizers.WordTokenizer.scenes(64)
    epoch = len(source) // 8
    error = _first_error(lambda: iter(pipeline.train_dataset(source, tokenizer=tok, global_batch_size=8, seed=0,
                                                              prefetch=2, **readers)), epoch)
    assert isinstance(error, registry.DatasetError), repr(error)
    assert any(_message(i) in str(error) for i in bad), str(error)


def test_the_evaluation_pass_stops_with_the_split_and_index(damaged):
    builder, bad = damaged
    source = registry.data_source(registry.SCENES, builder, "train")
    tok = tokenizers.WordTokenizer.scenes(64)
    error = _first_error(lambda: pipeline.eval_batches(source, tokenizer=tok, global_batch_size=8), 8)
    assert isinstance(error, registry.DatasetError) and _message(bad[0]) in str(error)


def test_train_prints_one_line_naming_the_record(tmp_path, monkeypatch):
    """`sdsup.train --only=data` on a dataset damaged since it was built: its statistics read every record."""
    data_dir, workdir = tmp_path / "tfds", tmp_path / "wd"
    args = [f"--config={smoke_workdir.SMOKE_CONFIG}", f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            "--only=data", "--config.data.image_size=16", "--config.layout.resolution=8"] + \
        [f"--config.data.{key}={value}" for key, value in SPLIT_SIZES.items()]
    block_real_work(monkeypatch, allow=("run_all",))  # the data stage runs; nothing compiles
    first = call_in_process("train", args)
    assert first.status == 0, first.stderr[-3000:]
    builder = registry.prepare(registry.SCENES, _config(data_dir))
    damage_the_middle(train_file(builder))
    bad = unreadable_indices(builder)
    os.remove(workdir / "data" / "DONE.json")
    line = assert_clear_error(call_in_process("train", args), _message(bad[0]), "train --only=data")
    assert str(builder.data_dir) in line
