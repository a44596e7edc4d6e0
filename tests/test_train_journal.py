"""The training-crash journal: crashes in a row with a record in the batch condemn it; a trained batch clears."""

from __future__ import annotations

import json
from pathlib import Path

from streamkd.ingest.journal import TRAIN_JOURNAL_FILE, TrainJournal, batch_ranges


def restart(directory: Path, resume: dict[int, int] | None = None) -> TrainJournal:
    """What the next process sees after this one died (nothing is closed: a crash)."""
    return TrainJournal(directory, resume)


def test_batch_ranges_cover_each_partition_of_the_batch():
    assert batch_ranges({0: 10, 2: 5}, {0: 14, 2: 6}) == [(0, 10, 13), (2, 5, 5)]


def test_three_crashes_in_a_row_condemn_the_records_in_flight(tmp_path):
    j = TrainJournal(tmp_path)
    for _crash in range(3):
        assert not j.condemned(0, 12)
        j.begin_step([(0, 10, 14)])  # the batch that takes the process down
        j = restart(tmp_path)
    assert j.condemned(0, 12) and j.crashes(0, 12) == 3
    assert not j.condemned(0, 15) and not j.condemned(1, 12)


def test_batches_that_differ_between_restarts_condemn_only_what_every_crash_held(tmp_path):
    j = TrainJournal(tmp_path)
    for lo, hi in ((8, 14), (10, 16), (9, 12)):  # batch boundaries move with timing; the culprit is 11
        j.begin_step([(0, lo, hi)])
        j = restart(tmp_path)
    assert [o for o in range(6, 18) if j.condemned(0, o)] == [10, 11, 12]


def test_a_batch_that_trains_resets_the_count(tmp_path):
    j = TrainJournal(tmp_path)
    j.begin_step([(0, 0, 9)])
    j = restart(tmp_path)
    j.begin_step([(0, 0, 9)])
    j = restart(tmp_path)
    token = j.begin_step([(0, 0, 9)])
    j.end_step(token)  # this time it trained: the two crashes were not the data's fault
    j.begin_step([(0, 0, 9)])
    j = restart(tmp_path)
    assert j.crashes(0, 5) == 1 and not j.condemned(0, 5)


def test_steps_in_flight_are_tracked_separately(tmp_path):
    j = TrainJournal(tmp_path)
    a = j.begin_step([(0, 0, 9)])
    j.begin_step([(0, 10, 19)])  # on CUDA the next step is launched before the previous one is read
    j.end_step(a)
    assert json.loads((tmp_path / TRAIN_JOURNAL_FILE).read_text())["inflight"] == [[0, 10, 19]]
    j = restart(tmp_path)
    assert j.crashes(0, 15) == 1 and j.crashes(0, 5) == 0


def test_condemned_records_stay_condemned_until_a_checkpoint_covers_them(tmp_path):
    j = TrainJournal(tmp_path)
    for _ in range(3):
        j.begin_step([(0, 0, 3)])
        j = restart(tmp_path)
    for o in range(4):
        assert j.condemned(0, o)
        j.passed(0, o)  # dead-lettered by the batcher
    j.end_step(j.begin_step([(0, 0, 3)]))  # the (empty) batch that carried them trained
    assert restart(tmp_path).condemned(0, 2)  # a crash before the checkpoint: dead-lettered again, not trained
    assert not restart(tmp_path, resume={0: 4}).condemned(0, 2)  # the checkpoint covers them: forgotten


def test_a_crash_with_decoding_in_flight_too_is_left_to_the_decode_journal(tmp_path):
    """The batcher decodes ahead while the loop trains: a decoder crash finds a batch in training too.
    That batch must not be condemned for it (the decode journal finds the culprit one record at a time)."""
    j = TrainJournal(tmp_path)
    for _ in range(4):
        j.begin_step([(0, 0, 31)])
        j = TrainJournal(tmp_path, decoding_died=True)
    assert j.crashes(0, 5) == 0 and not j.condemned(0, 5)


def test_a_step_that_raises_counts_at_once_whatever_else_was_in_flight(tmp_path):
    j = TrainJournal(tmp_path)
    for _ in range(3):
        j.step_failed(j.begin_step([(0, 0, 31)]))
        j = TrainJournal(tmp_path, decoding_died=True)  # the decoder happened to be busy as the process stopped
    assert j.condemned(0, 5)
