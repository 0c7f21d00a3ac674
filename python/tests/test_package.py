"""The package on its own (one process): exception types per status, constructor checks, sizing
without a job, the stubs, and a whole step on numpy arrays in a world of one."""

import pathlib
import pickle

import pytest

from conftest import SKIP_NO_TORCH

torch = pytest.importorskip("torch", reason=SKIP_NO_TORCH)

import ferry  # noqa: E402
from ferry import _ferry, launch  # noqa: E402

EP64_DECODE = dict(world_size=64, max_num_tokens=128, num_experts=256, hidden_dim=7168, hidden_dim_scale=56,
                   in_dtype=torch.float8_e4m3fn, out_dtype=torch.bfloat16, scale_dtype=torch.float32,
                   num_experts_per_token=8)


def test_every_status_has_its_exception_type_carrying_status_and_message():
    expected = {
        ferry.Status.INVALID_ARGUMENT: (ferry.FerryInvalidArgument, ValueError),
        ferry.Status.TIMEOUT: (ferry.FerryTimeout, ferry.FerryError),
        ferry.Status.PEER_FAILED: (ferry.FerryPeerFailed, ferry.FerryError),
        ferry.Status.TRANSPORT: (ferry.FerryTransportError, ferry.FerryError),
        ferry.Status.OUT_OF_MEMORY: (ferry.FerryOutOfMemory, MemoryError),
        ferry.Status.UNSUPPORTED: (ferry.FerryUnsupported, NotImplementedError),
        ferry.Status.INTERNAL: (ferry.FerryInternalError, ferry.FerryError),
    }
    for status, (cls, also) in expected.items():
        assert ferry.errors.error_type(status) is cls
        e = cls(int(status), "rank 3: count headers from rank 5 were refused")
        assert isinstance(e, ferry.FerryError) and isinstance(e, also)
        assert e.status == status and e.message.startswith("rank 3")
        assert str(e) == f"rank 3: count headers from rank 5 were refused [{_ferry.status_string(int(status))}]"
        assert e.ranks == [3, 5]
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is cls and again.status == status and again.message == e.message


def test_a_timeout_naming_the_peers_it_waited_for_is_also_a_peer_failure():
    missing = ("rank 0 step 1 dispatch: waiting for the count headers and private records: rank 0 wait: timed out "
               "after 6000 ms waiting for imm 0x51002 (tag 81, from rank 2): 1 of 1 missing")
    e = ferry.FerryTimeout(int(ferry.Status.TIMEOUT), missing)
    assert type(e) is ferry.FerryPeerTimeout
    assert isinstance(e, ferry.FerryPeerFailed) and isinstance(e, ferry.FerryTimeout)
    assert e.status == ferry.Status.TIMEOUT and e.ranks == [0, 0, 2]
    assert type(pickle.loads(pickle.dumps(e))) is ferry.FerryPeerTimeout
    busy = ferry.FerryTimeout(int(ferry.Status.TIMEOUT), "rank 0: operation queue full for 30000 ms")
    assert type(busy) is ferry.FerryTimeout and not isinstance(busy, ferry.FerryPeerFailed)


def test_sizing_ep64_decode_without_a_job_matches_the_c_api():
    s = ferry.buffer_sizes(**EP64_DECODE)
    assert s["record_bytes"] == 64 + 7168 + 56 * 4
    assert s["num_local_experts"] == 4
    assert s["max_rows_per_expert"] == 64 * 128
    assert s["total_registered_bytes"] == (s["send_bytes"] + s["recv_bytes"] + s["combine_send_bytes"]
                                           + s["combine_recv_bytes"])
    assert s["total_registered_bytes"] < 256 << 20


def test_library_config_errors_name_the_field():
    with pytest.raises(ferry.FerryInvalidArgument, match="num_experts 250"):
        ferry.buffer_sizes(**dict(EP64_DECODE, num_experts=250))
    with pytest.raises(ferry.FerryUnsupported, match="experts_per_token 9"):
        ferry.buffer_sizes(**dict(EP64_DECODE, num_experts_per_token=9))
    with pytest.raises(ValueError, match="num_experts 250"):  # FerryInvalidArgument is a ValueError
        ferry.buffer_sizes(**dict(EP64_DECODE, num_experts=250))


CONSTRUCTOR = dict(max_num_tokens=8, num_experts=4, hidden_dim=64, in_dtype=torch.bfloat16, out_dtype=torch.bfloat16,
                   num_experts_per_token=2)


@pytest.mark.parametrize("change,needle", [
    (dict(in_dtype=torch.int8), "in_dtype: torch.int8 is not a dtype Ferry moves"),
    (dict(out_dtype=torch.float8_e4m3fn), "out_dtype: torch.float8_e4m3fn, expected torch.bfloat16"),
    (dict(hidden_dim_scale=3, scale_dtype=torch.float32), "hidden_dim_scale: 3 does not divide hidden_dim 64"),
    (dict(hidden_dim_scale=2, scale_dtype=torch.bfloat16), "scale_dtype: torch.bfloat16, expected torch.float32"),
    (dict(hidden_dim_scale=2), "scale_dtype: None, expected torch.float32"),
    (dict(scale_dtype=torch.float32), "scale_dtype: torch.float32 without hidden_dim_scale"),
    (dict(max_num_tokens=0), "max_num_tokens: 0, expected an int >= 1"),
    (dict(expert_padding=1.5), "expert_padding: 1.5, expected an int >= 1"),
    (dict(max_private_tokens=-2), "max_private_tokens: -2, expected an int >= 0"),
    (dict(device="tpu:0"), "device: 'tpu:0', expected 'cpu', 'cuda' or 'cuda:N'"),
    (dict(device="cuda:x"), "device: 'cuda:x', expected 'cpu', 'cuda' or 'cuda:N'"),
    (dict(provider=3), "provider: 3, expected a libfabric provider name"),
    (dict(global_group=None), "global_group: torch.distributed is not initialized"),
    (dict(bootstrap="tcp://x"), "bootstrap: str, expected a ferry.Bootstrap"),
])
def test_constructor_arguments_are_checked_before_anything_is_created(change, needle):
    with pytest.raises(ValueError) as e:
        ferry.AllToAll(**dict(CONSTRUCTOR, **change))
    assert needle in str(e.value)


def test_stubs_name_exactly_what_the_extension_defines():
    stub = (pathlib.Path(ferry.__file__).parent / "_ferry.pyi").read_text()
    import ast

    tree = ast.parse(stub)
    declared = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            declared.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            declared.add(node.target.id)
    defined = {n for n in dir(_ferry) if not n.startswith("__")}
    assert declared == defined
    for cls in ("Config", "Bootstrap", "AllToAll"):
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        members = {n.name if not isinstance(n, ast.AnnAssign) else n.target.id for n in node.body
                   if isinstance(n, (ast.FunctionDef, ast.AnnAssign))} - {"__init__"}
        assert members == {n for n in dir(getattr(_ferry, cls)) if not n.startswith("_")}, cls
    assert (pathlib.Path(ferry.__file__).parent / "py.typed").exists()


def test_a_world_of_one_runs_numpy_arrays_on_the_host_backend(tmp_path):
    """numpy in (bf16 as raw uint16 bits), numpy out, compared with the torch reference."""
    import numpy as np
    import torch.distributed as dist

    import reference
    from a2a_cases import expert_fn

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        boot = ferry.Bootstrap.tcp("127.0.0.1", launch.free_port(), 0, 1)
        with ferry.AllToAll(**CONSTRUCTOR, bootstrap=boot, provider="tcp", expert_padding=2) as a2a:
            assert (a2a.rank, a2a.world_size, a2a.num_local_experts, a2a.max_tokens_per_expert) == (0, 1, 4, 8)
            gen = torch.Generator().manual_seed(7)
            x = torch.randn((6, 64), generator=gen).to(torch.bfloat16)
            idx = torch.tensor([[0, 1], [2, -1], [-1, -1], [3, 0], [1, 2], [0, 3]], dtype=torch.int32)
            w = torch.rand((6, 2), generator=gen)
            counts = np.zeros(4, dtype=np.int32)
            ex = np.zeros((4, 8, 64), dtype=np.uint16)
            a2a.dispatch(counts, ex, None, x.view(torch.uint16).numpy(), None, idx.numpy(), w.numpy())
            want = reference.dispatch(x, None, idx, w, num_experts=4, max_rows=8, expert_padding=2, dp_size=1)
            assert counts.tolist() == want.counts.tolist() == [3, 2, 2, 2]
            got = torch.from_numpy(ex).view(torch.bfloat16).reshape(32, 64)
            assert torch.equal(got.view(torch.uint8), want.expert_x.view(torch.uint8))
            y = expert_fn(got, None, 4, torch.bfloat16)
            out = np.full((6, 64), 0x5A5A, dtype=np.uint16)
            a2a.combine(out, idx.numpy(), w.numpy(), y.view(torch.uint16).numpy())
            ref = reference.combine(want, expert_fn(want.expert_x, None, 4, torch.bfloat16), 6, dp_size=1)
            assert torch.equal(torch.from_numpy(out), ref.view(torch.uint16))
            stats = a2a.stats()
            assert set(stats) == {"dispatch_bytes_sent", "combine_bytes_sent", "dispatch_records_sent",
                                  "overflow_records_sent"}
            assert a2a.buffer_sizes()["num_local_experts"] == 4
        assert a2a.closed
        boot.close()
        assert boot.closed
    finally:
        dist.destroy_process_group()
