"""`psana-ipc position` and `position.where` tell where a saved loader position stands, from the state, a JSON checkpoint or a torch one, and refuse what holds none in one coded line."""
import json

import pytest
import torch

from psana_ipc.client.position import EpochCursor, StateError, where

from conftest import psana_ipc


def saved_state():
    cursor = EpochCursor(40, lambda: range(40), 3, True, "none", False, 4, 0, 2)
    cursor.set_epoch(5)
    cursor.begin()
    cursor.consumed(8)
    return cursor.state_dict()


def position(*args):
    return psana_ipc("position", *args)


@pytest.mark.parametrize("write", [
    lambda path, ck: path.write_text(json.dumps(ck)),
    lambda path, ck: torch.save(dict(ck, weights=torch.zeros(3)), path)])
def test_it_says_the_epoch_and_events_done_of_a_checkpoint(tmp_path, write):
    path = tmp_path / "checkpoint"
    write(path, {"step": 17, "loader": saved_state()})
    done = position(str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("epoch 5: 16 of 40 events done (40%), 2 batches of 4 per rank "
                                  "on 2 ranks; seed 3, shuffled")
    as_json = json.loads(position(str(path), "--json").stdout)
    assert (as_json["epoch"], as_json["events_done"]) == (5, 16)
    assert where(path).events_done == 16


@pytest.mark.parametrize("content, says", [(b"\x00not a checkpoint", "neither JSON nor"),
                                           (b'{"model": 1}', "no psana-ipc loader position")])
def test_a_file_without_a_position_is_one_coded_line(tmp_path, content, says):
    path = tmp_path / "f"
    path.write_bytes(content)
    done = position(str(path))
    assert done.returncode == 4
    assert done.stderr.startswith(f"psana-ipc: {path}: ") and says in done.stderr
    assert done.stderr.rstrip().endswith("[not_a_state]") and done.stderr.count("\n") == 1
    with pytest.raises(StateError):
        where(path)
