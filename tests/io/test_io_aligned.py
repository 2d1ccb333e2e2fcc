import threading

import numpy as np
import pytest

from vmsnap.io import PAGE_SIZE, AlignedBuffer, BufferPool, is_aligned
from vmsnap.io.aligned import buffer_address


def test_aligned_buffer_views():
    with AlignedBuffer(10000) as b:
        assert b.size == 3 * PAGE_SIZE
        assert buffer_address(b.view) % PAGE_SIZE == 0
        assert is_aligned(b.view)
        b.array[:5] = [1, 2, 3, 4, 5]
        assert bytes(b.view[:5]) == b"\x01\x02\x03\x04\x05"
        assert not is_aligned(b.view[1:PAGE_SIZE + 1])
        assert not is_aligned(b.view[:100])


def test_unaligned_bytes_detected():
    data = bytearray(PAGE_SIZE * 2 + 1)
    mv = memoryview(data)
    # at most one of the two slices can be aligned
    assert not (is_aligned(mv[:PAGE_SIZE]) and is_aligned(mv[1:PAGE_SIZE + 1]))


def test_pool_bounded_and_blocking():
    with BufferPool(PAGE_SIZE, 2) as pool:
        a = pool.acquire()
        b = pool.acquire()
        assert pool.available == 0
        with pytest.raises(TimeoutError):
            pool.acquire(timeout=0.05)
        got = []

        def waiter():
            got.append(pool.acquire(timeout=5))

        t = threading.Thread(target=waiter)
        t.start()
        pool.release(a)
        t.join(5)
        assert got == [a]
        with pytest.raises(ValueError):
            pool.release(AlignedBuffer(PAGE_SIZE))
        pool.release(b)
        with pytest.raises(ValueError):
            pool.release(b)
        with pool.buffer() as buf:
            assert isinstance(buf.array, np.ndarray) and buf.size == PAGE_SIZE
