"""ferry.deep_ep on CUDA tensors (CUDA backend; every rank on the one GPU, same-node peers through CUDA
IPC): 2, 4 and 8 processes equal the pure-torch model of DeepEP's low-latency semantics, and DeepEP's
test shape (128 tokens, hidden 7168, top-8 of 256 experts, fp8 with UE8M0 scales) captured in
torch.cuda.graph replays like eager steps, printing the replay times of dispatch and combine."""

import pytest

from conftest import SKIP_NO_CUDA, SKIP_NO_TORCH

torch = pytest.importorskip("torch", reason=SKIP_NO_TORCH)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=SKIP_NO_CUDA)

import torch.distributed as dist  # noqa: E402

import deep_ep_reference as ref  # noqa: E402
from deep_ep_cases import Case, run_cases  # noqa: E402
from ferry import deep_ep, launch  # noqa: E402

CASES = [
    ("tcp", Case("fp8")),
    ("tcp", Case("ue8m0_hooks_dropped", round_scale=True, use_ue8m0=True, hook=True, drop=0.2, steps=2)),
    ("tcp", Case("bf16_two_in_flight_zero_copy", use_fp8=False, interleave=True, zero_copy=True, steps=4)),
    ("tcp", Case("top8_hidden_7168_zero_token_rank", experts_per_rank=8, top_k=8, hidden=7168, max_tokens=16,
                 empty_ranks=(1,))),
]


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_cuda_tensors_equal_deep_eps_semantics(world):
    ran = launch.spawn(run_cases, world, args=(CASES, "cuda"), timeout_s=500)
    assert ran == [[f"{p}/{c.name}" for p, c in CASES]] * world


def graph_replays(rank: int, world: int, replays: int) -> dict:
    """Dispatch and combine of DeepEP's test shape, each captured in its own CUDA graph on the same
    static inputs; every replay's output equals an eager step on the same inputs. Returns the median
    replay times (us)."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    T, H, E, K = 128, 7168, 256, 8
    buffer = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, provider="tcp", timeout_ms=60000)
    gen = torch.Generator().manual_seed(rank + 1)
    x = torch.empty((T, H), dtype=torch.bfloat16, device=dev)
    topk_idx = torch.empty((T, K), dtype=torch.int64, device=dev)
    weights = torch.empty((T, K), dtype=torch.float32, device=dev)

    def load() -> None:
        x.copy_(torch.randn((T, H), generator=gen).to(torch.bfloat16))
        topk_idx.copy_(torch.rand((T, E), generator=gen).topk(K, dim=1).indices)
        weights.copy_(torch.rand((T, K), generator=gen))

    def expert(recv_x: tuple) -> torch.Tensor:
        q, s = recv_x
        exps = s.clone(memory_format=torch.contiguous_format).view(torch.uint8)[:, :, :H // 128].to(torch.int32)
        values = ref.dequant(q.reshape(-1, H), (exps << 23).view(torch.float32).reshape(q.shape[0] * q.shape[1], -1))
        return (values * 0.5).to(torch.bfloat16).reshape(q.shape)

    def dispatch() -> tuple:
        return buffer.low_latency_dispatch(x, topk_idx, T, E, use_fp8=True, round_scale=True, use_ue8m0=True)

    load()
    recv_x, _, handle, _, _ = dispatch()  # the first call of the shape creates Ferry's buffers (collective)
    buffer.low_latency_combine(expert(recv_x), topk_idx, weights, handle)
    torch.cuda.synchronize()

    dispatch_graph, combine_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(dispatch_graph):
        g_recv_x, _, g_handle, _, _ = dispatch()
    with torch.cuda.graph(combine_graph):
        g_y = expert(g_recv_x)
        g_out, _, _ = buffer.low_latency_combine(g_y, topk_idx, weights, g_handle)

    times = {"dispatch": [], "combine": []}
    start, middle, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), \
        torch.cuda.Event(enable_timing=True)
    for i in range(replays):
        load()
        start.record()
        dispatch_graph.replay()
        middle.record()
        combine_graph.replay()
        end.record()
        end.synchronize()
        times["dispatch"].append(start.elapsed_time(middle) * 1000)
        times["combine"].append(middle.elapsed_time(end) * 1000)
        if i % 10 == 0:  # an eager step on the same inputs, in the same buffers once the replays are done
            recv_x, _, handle, _, _ = dispatch()
            want, _, _ = buffer.low_latency_combine(expert(recv_x), topk_idx, weights, handle)
            assert torch.equal(g_out.view(torch.int16), want.view(torch.int16)), f"replay {i} differs"
    buffer.destroy()
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


@pytest.mark.parametrize("world", [2, 4, 8], ids=lambda w: f"{w}ranks")
def test_deep_eps_test_shape_replays_in_a_cuda_graph_like_eager_steps(world):
    medians = launch.spawn(graph_replays, world, args=(50,), timeout_s=500)
    for rank, m in enumerate(medians):
        print(f"[rank {rank} of {world}] graph replay: dispatch {m['dispatch']:.1f} us, combine {m['combine']:.1f} us")
