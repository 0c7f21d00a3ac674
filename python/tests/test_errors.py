"""Every bad argument raises the documented exception, library errors reach every rank as FerryError
subclasses naming the rank at fault, and a killed peer is named within the deadline (nothing hangs)."""

import pytest

from conftest import SKIP_NO_TORCH

pytest.importorskip("torch", reason=SKIP_NO_TORCH)

from a2a_cases import argument_errors, killed_peer, library_errors  # noqa: E402
from ferry import launch  # noqa: E402


def test_bad_arguments_raise_value_error_naming_the_argument():
    checked = launch.spawn(argument_errors, 2, args=("tcp",), timeout_s=120)
    assert checked[0] == checked[1] > 20


def test_a_bad_route_on_one_rank_fails_every_rank_naming_it():
    texts = launch.spawn(library_errors, 4, args=(1,), timeout_s=120)
    for tcp_and_shm in texts:
        assert len(tcp_and_shm) == 2
    for rank in (0, 2, 3):
        assert all("rank 1" in t for t in texts[rank]), texts[rank]


def test_a_killed_peer_is_named_within_the_deadline():
    texts = launch.spawn(killed_peer, 3, args=(2,), timeout_s=120, may_exit=[2])
    assert texts[2] is None
    for rank in (0, 1):
        assert len(texts[rank]) == 2 and all("rank 2" in t for t in texts[rank]), texts[rank]
