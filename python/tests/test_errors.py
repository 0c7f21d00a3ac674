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


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_a_bad_route_on_one_rank_fails_every_rank_naming_it(provider):
    texts = launch.spawn(library_errors, 4, args=(provider, 1), timeout_s=120)
    assert "names expert" in texts[1]
    for rank in (0, 2, 3):
        assert "rank 1" in texts[rank], texts[rank]


@pytest.mark.parametrize("provider", ["tcp", "shm"])
def test_a_killed_peer_is_named_within_the_deadline(provider):
    texts = launch.spawn(killed_peer, 3, args=(provider, 2), timeout_s=120, may_exit=[2])
    assert texts[2] is None
    for rank in (0, 1):
        assert "rank 2" in texts[rank], texts[rank]
