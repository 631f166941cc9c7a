"""A process's ring of batch buffers when the server has no room for another:
it waits for one of its own to come back, and says so at once when it has none."""
import threading

import pytest

from psana_ipc.client.batch_ring import BatchRing, MemfdBuffer
from psana_ipc.protocol.errors import NO_MEMORY, ServerError


def _one_then_no_room():
    made = []

    def make(nbytes, pinned):
        if made:
            raise ServerError(NO_MEMORY, "no room for a batch buffer")
        made.append(MemfdBuffer(nbytes))
        return made[0]
    return make


def test_without_room_a_ring_waits_for_its_own_buffer_to_come_back():
    ring = BatchRing(_one_then_no_room())
    first = ring.lease(4096, handed_over=True)
    hold = first.hold()                           # its batch, in the DataLoader's main process
    threading.Timer(0.2, hold.close).start()      # which lets it go once its loop used it
    assert ring.lease(4096, handed_over=True) is first
    ring.close()


def test_without_room_and_without_buffers_of_its_own_the_error_is_at_once():
    ring = BatchRing(_one_then_no_room())
    ring.lease(4096, handed_over=True)
    with pytest.raises(ServerError) as err:
        ring.lease(1 << 20, handed_over=True)     # none of its own is that large
    assert err.value.code == NO_MEMORY
    ring.close()
