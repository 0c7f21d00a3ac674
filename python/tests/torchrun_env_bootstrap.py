"""Run under torchrun: the job's process group holds MASTER_PORT (torchrun's store), and
ferry.Bootstrap.from_env still meets, beside it; one step against the group's own all-gather."""
import torch
import torch.distributed as dist

import ferry

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
boot = ferry.Bootstrap.from_env(timeout_ms=20000)
assert (boot.rank, boot.world_size) == (rank, world), (boot.rank, boot.world_size)
with ferry.AllToAll(max_num_tokens=4, num_experts=2 * world, hidden_dim=16, in_dtype=torch.float32,
                    out_dtype=torch.float32, num_experts_per_token=1, bootstrap=boot, provider="tcp",
                    timeout_ms=20000) as a2a:
    x = torch.full((4, 16), float(rank + 1))
    indices = torch.tensor([[2 * ((rank + 1) % world)]] * 4, dtype=torch.int32)  # the next rank's expert
    weights = torch.ones((4, 1), dtype=torch.float32)
    num_tokens = torch.zeros(2, dtype=torch.int32)
    expert_x = torch.empty((2, a2a.max_tokens_per_expert, 16))
    a2a.dispatch(num_tokens, expert_x, None, x, None, indices, weights)
    out = torch.empty((4, 16))
    assert num_tokens.tolist() == [4, 0], num_tokens
    assert torch.equal(expert_x[0, :4], torch.full((4, 16), float((rank - 1) % world + 1)))
    a2a.combine(out, indices, weights, expert_x)
    assert torch.equal(out, x), (out, x)
print(f"rank {rank} PASS", flush=True)
dist.destroy_process_group()
