// Dispatch, send half: route counting, prefix sums over destinations, and packing of records into
// the send buffer layout of plan.h (per destination: count header, then its run of records ordered
// by source token).
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"
#include "csrc/dtype.h"

namespace ferry::cuda {
namespace {

struct RouteSmem {
  // Offsets (in ints) of the arrays in dynamic shared memory.
  int expert_cnt, dest_cnt, dest_off, scratch, masks, total_ints;
};
__host__ __device__ inline RouteSmem route_smem(const ep::Layout& L, int mask_warps) {
  RouteSmem s{};
  s.expert_cnt = 0;
  s.dest_cnt = s.expert_cnt + L.num_experts;
  s.dest_off = s.dest_cnt + L.world_size;
  s.scratch = s.dest_off + L.world_size;
  s.masks = s.scratch + kRouteThreads + 1;
  s.total_ints = s.masks + mask_warps * L.world_size;
  return s;
}

int route_mask_warps(const ep::Layout& L) {
  const RouteSmem base = route_smem(L, 0);
  const int room = (kRouteSmemBytes / 4 - base.total_ints) / L.world_size;
  return room < 1 ? 0 : (room < kRouteWarps ? room : kRouteWarps);
}

// One block. Chunks of 32 tokens are ranked per destination with bitmasks (rank of token t in the
// run to d = tokens before t in its chunk that also go to d, plus the chunk's base), which keeps
// every run ordered by source token without sorting.
__global__ void __launch_bounds__(kRouteThreads, 1)
    dispatch_route_kernel(DispatchSendParams p, Workspace ws, int mask_warps) {
  extern __shared__ int smem[];
  __shared__ int poisoned;
  const ep::Layout& L = p.layout;
  const int R = L.world_size, E = L.num_experts, K = L.top_k, EPR = L.experts_per_rank;
  const RouteSmem lay = route_smem(L, mask_warps);
  int* expert_cnt = smem + lay.expert_cnt;
  int* dest_cnt = smem + lay.dest_cnt;
  int* dest_off = smem + lay.dest_off;
  int* scratch = smem + lay.scratch;
  uint32_t* masks = reinterpret_cast<uint32_t*>(smem + lay.masks);
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = lane_id();

  int T = p.num_tokens;
  if (p.bound_m != nullptr) {
    const int b = *p.bound_m;
    if (b < 0 || b > p.num_tokens) {
      if (tid == 0) set_error(ws.error, kErrBoundTooLarge, b, p.num_tokens, 0);
      T = b < 0 ? 0 : p.num_tokens;
    } else {
      T = b;
    }
  }
  for (int i = tid; i < lay.masks + mask_warps * R; i += blockDim.x) smem[i] = 0;
  if (tid == 0) {
    poisoned = 0;
    *ws.num_tokens = T;
    *ws.dispatch_epoch += 1;
  }
  __syncthreads();

  const int nchunks = (T + kChunk - 1) / kChunk;
  if (warp < mask_warps) {
    uint32_t* mask = masks + warp * R;
    for (int c = warp; c < nchunks; c += mask_warps) {
      const int t = c * kChunk + lane;
      // Everything in registers (constant indices only): the token's routes, their owner ranks,
      // which route is the first to each rank, and that rank's position among the distinct ones.
      int e[ep::kMaxTopK];
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) e[k] = (t < T && k < K) ? p.indices[t * K + k] : -1;
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) {
        if (e[k] < -1 || e[k] >= E) {
          set_error(ws.error, kErrInvalidExpert, t, k, e[k]);
          poisoned = 1;
          e[k] = -1;
        }
#pragma unroll
        for (int j = 0; j < k; ++j) {
          if (e[k] >= 0 && e[j] == e[k]) {
            set_error(ws.error, kErrRepeatedExpert, t, k, e[k]);
            poisoned = 1;
            e[k] = -1;
          }
        }
        if (e[k] >= 0) atomicAdd(&expert_cnt[e[k]], 1);
      }
      constexpr int kNone = 0x7fffffff;
      int r[ep::kMaxTopK];
      bool first[ep::kMaxTopK];
      int pos[ep::kMaxTopK];
      int nd = 0;
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) r[k] = e[k] >= 0 ? ep::owner_rank(e[k], EPR) : kNone;
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) {
        first[k] = r[k] != kNone;
#pragma unroll
        for (int j = 0; j < k; ++j) first[k] &= r[j] != r[k];
        nd += first[k];
      }
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) {
        pos[k] = 0;
#pragma unroll
        for (int j = 0; j < ep::kMaxTopK; ++j) pos[k] += first[j] && r[j] < r[k];
        if (first[k]) atomicOr(&mask[r[k]], 1u << lane);
      }
      __syncwarp();
      if (t < T) {
        // Destinations ascending, as ep::token_destinations lists them; -1 past the last.
#pragma unroll
        for (int k = 0; k < ep::kMaxTopK; ++k) {
          if (!first[k]) continue;
          ws.token_dest[t * ep::kMaxTopK + pos[k]] = r[k];
          ws.token_slot[t * ep::kMaxTopK + pos[k]] = __popc(mask[r[k]] & lanemask_lt());
        }
        for (int j = nd; j < ep::kMaxTopK; ++j) {
          ws.token_dest[t * ep::kMaxTopK + j] = -1;
          ws.token_slot[t * ep::kMaxTopK + j] = -1;
        }
      }
      __syncwarp();
      for (int d = lane; d < R; d += kWarpSize) {
        ws.send_chunk_base[c * R + d] = __popc(mask[d]);
        mask[d] = 0;
      }
      __syncwarp();
    }
  }
  __syncthreads();

  // Per destination, an exclusive scan over chunks; the totals are the destination counts.
  chunk_scan(ws.send_chunk_base, nchunks, R, dest_cnt);
  __syncthreads();
  for (int d = tid; d < R; d += blockDim.x) {
    dest_off[d] = dest_cnt[d];
    ws.dest_count[d] = dest_cnt[d];
    if (ws.host_dest_count != nullptr) ws.host_dest_count[d] = dest_cnt[d];
  }
  __syncthreads();
  block_exclusive_scan(dest_off, R, scratch);
  for (int d = tid; d < R; d += blockDim.x) ws.dest_offset[d] = dest_off[d];

  // Count headers, one warp per destination. A rank whose input was bad poisons every header so
  // its peers fail at once naming it.
  const int header_ints = int(L.count_header_bytes / 4);
  for (int d = warp; d < R; d += kRouteWarps) {
    int32_t* header = reinterpret_cast<int32_t*>(p.send_buf + L.send_section_offset(d, dest_off[d]));
    for (int i = lane; i < header_ints; i += kWarpSize) {
      int v = 0;
      if (i < R) v = (i == 0 && poisoned) ? ep::kPoisonCount : dest_cnt[i];
      else if (i < R + EPR) v = expert_cnt[d * EPR + (i - R)];
      header[i] = v;
    }
  }
  // The headers and the count mirror may live in host memory that the proxy thread and the NIC read
  // once the pack kernel's release of send_ready is seen: push them out before this kernel ends (the
  // barrier orders every thread's writes before thread 0's cumulative fence).
  __syncthreads();
  if (tid == 0) __threadfence_system();
}

// Quantize on dispatch, fused into the copy: 16 bytes of bf16 (8 elements) per lane become 8 bytes of
// fp8 in every destination record. The lanes of one scale block are `group` consecutive lanes of a
// warp (vector i is held by lane i % 32 and a block is scale_block / 8 consecutive vectors), so the
// block's amax is a shuffle reduction among them; the first of them stores the scale. Every lane of
// the warp takes part in the shuffles (lanes past the row hold zeros and form whole blocks of their
// own). The numbers are dtype.h's: amax_term, fp8_block_scale, the fp8 conversion.
__device__ __forceinline__ void quantize_vector(const uint4& v, int i, bool valid, int group, bool round_scale,
                                                uint8_t* const* dst, int nd, const ep::Layout& L) {
  const auto* h = reinterpret_cast<const uint16_t*>(&v);
  float f[8];
  float amax = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    f[k] = ep::dtype::bf16_to_f32(h[k]);
    amax = fmaxf(amax, ep::dtype::amax_term(f[k]));
  }
  for (int offset = group >> 1; offset > 0; offset >>= 1)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  const ep::dtype::BlockScale bs = ep::dtype::fp8_block_scale(amax, round_scale);
  uint2 q;
  auto* q16 = reinterpret_cast<uint16_t*>(&q);
#pragma unroll
  for (int k = 0; k < 4; ++k)
    q16[k] = ep::dtype::f32x2_to_fp8e4m3x2(__fmul_rn(f[2 * k], bs.multiplier), __fmul_rn(f[2 * k + 1], bs.multiplier));
  if (!valid) return;
  const bool first_of_block = (lane_id() & (group - 1)) == 0;
#pragma unroll
  for (int j = 0; j < ep::kMaxTopK; ++j) {
    if (j >= nd) break;
    *reinterpret_cast<uint2*>(dst[j] + L.payload_offset() + 8 * uint64_t(i)) = q;
    if (first_of_block) reinterpret_cast<float*>(dst[j] + L.scale_offset())[i / group] = bs.scale;
  }
}

// One block per token (grid-stride): the token's payload and scales are read once and stored into
// the record of each of its destinations (with quantize, cast once on the way). A block rather than
// a warp per token keeps the whole GPU busy at decode sizes (128 tokens), where a warp each would
// leave most SMs idle.
__global__ void __launch_bounds__(kCopyThreads)
    dispatch_pack_kernel(DispatchSendParams p, Workspace ws) {
  __shared__ uint8_t* dst_s[ep::kMaxTopK];
  __shared__ int nd_s;
  const ep::Layout& L = p.layout;
  const int R = L.world_size, E = L.num_experts, K = L.top_k, EPR = L.experts_per_rank;
  const int tid = threadIdx.x;
  const int T = *ws.num_tokens;
  // 16-byte vectors of a source row: payload bytes, or with quantize bf16 rows of twice the fp8 size.
  const uint64_t src_row_bytes = p.quantize ? uint64_t(L.hidden) * 2 : L.payload_bytes;
  const int nvec = int(src_row_bytes / 16);
  const int group = L.scale_block / 8;  // lanes per scale block when quantizing
  const int ns = L.num_scales;
  const uint64_t tail_begin = L.scale_offset() + L.scale_bytes;
  const int pad_words = int((L.record_bytes - tail_begin) / 4);
  const uint8_t* x = static_cast<const uint8_t*>(p.x);

  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    const uint8_t* src = x + uint64_t(t) * src_row_bytes;
    // The first batch of payload loads is issued before the header work, so its latency overlaps it.
    uint4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = u * kCopyThreads + tid;
      v[u] = i < nvec ? ld_nc_v4(src + 16 * uint64_t(i)) : make_uint4(0, 0, 0, 0);
    }
    if (tid < kWarpSize) {
      // Warp 0 builds the headers: lane k holds route k (expert, weight), lane j < 8 destination j;
      // routes reach the destination lanes by shuffles, without further loads.
      const int lane = tid;
      const int e_mine = lane < K ? p.indices[t * K + lane] : -1;
      const float w_mine = lane < K && p.weights != nullptr ? p.weights[t * K + lane] : 0.f;  // null: at combine
      bool repeated = false;  // a repeated expert was reported by the routing kernel; skip it here
      for (int k = 0; k < K; ++k) {
        const int e = __shfl_sync(0xffffffffu, e_mine, k);
        repeated |= k < lane && e == e_mine;
      }
      const bool usable = e_mine >= 0 && e_mine < E && !repeated;
      const int d = lane < ep::kMaxTopK ? ws.token_dest[t * ep::kMaxTopK + lane] : -1;
      ep::RecordHeader h;
      h.src_token = t;
      h.src_rank = L.rank;
      h.num_routes = 0;
      h.reserved = 0;
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {  // unused routes are zero, as on the host
        h.local_expert[j] = 0;
        h.weight[j] = 0.f;
      }
      for (int k = 0; k < K; ++k) {
        const int e = __shfl_sync(0xffffffffu, usable ? e_mine : -1, k);
        const float w = __shfl_sync(0xffffffffu, w_mine, k);
        if (d >= 0 && e >= 0 && ep::owner_rank(e, EPR) == d) {
#pragma unroll
          for (int j = 0; j < ep::kMaxTopK; ++j)  // constant indices keep the header in registers
            if (j == h.num_routes) {
              h.local_expert[j] = int16_t(ep::local_expert(e, EPR));
              h.weight[j] = w;
            }
          ++h.num_routes;
        }
      }
      uint8_t* rec = nullptr;
      int slot = -1;
      if (d >= 0) {
        slot = ws.dest_offset[d] + ws.send_chunk_base[(t / kChunk) * R + d] + ws.token_slot[t * ep::kMaxTopK + lane];
        ws.token_slot[t * ep::kMaxTopK + lane] = slot;
        rec = p.send_buf + L.send_section_offset(d, 0) + L.count_header_bytes + uint64_t(slot) * L.record_bytes;
        const uint4* hv = reinterpret_cast<const uint4*>(&h);
#pragma unroll
        for (int i = 0; i < 4; ++i) st_v4(rec + 16 * i, hv[i]);
      }
      if (L.weights_at_combine) {
        // Each route's combine row (ep::SendPlan::route_row): its record's slot times the rows per
        // slot, plus its place among the token's routes to that rank in top-k order (the header's).
        const int my_dest = usable ? ep::owner_rank(e_mine, EPR) : -1;
        int position = 0, my_slot = -1;
        for (int k = 0; k < K; ++k) {
          const int other = __shfl_sync(0xffffffffu, my_dest, k);
          position += k < lane && other == my_dest ? 1 : 0;
        }
#pragma unroll
        for (int j = 0; j < ep::kMaxTopK; ++j) {
          const int dj = __shfl_sync(0xffffffffu, d, j), sj = __shfl_sync(0xffffffffu, slot, j);
          if (dj >= 0 && dj == my_dest) my_slot = sj;
        }
        if (lane < K) {
          ws.route_dest[t * ep::kMaxTopK + lane] = my_dest;
          ws.route_row[t * ep::kMaxTopK + lane] = my_dest >= 0 ? my_slot * L.combine_rows + position : -1;
        }
        if (d >= 0 && ws.host_slot_routes != nullptr) ws.host_slot_routes[slot] = h.num_routes;
      }
      if (lane < ep::kMaxTopK) dst_s[lane] = rec;
      const int nd = __popc(__ballot_sync(0xffffffffu, d >= 0));
      if (lane == 0) nd_s = nd;
    }
    __syncthreads();
    const int nd = nd_s;
    uint8_t* dst[ep::kMaxTopK];
#pragma unroll
    for (int j = 0; j < ep::kMaxTopK; ++j) dst[j] = dst_s[j];

    for (int b = 0; b < nvec; b += kCopyThreads * kCopyUnroll) {
      if (b > 0) {
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int i = b + u * kCopyThreads + tid;
          v[u] = i < nvec ? ld_nc_v4(src + 16 * uint64_t(i)) : make_uint4(0, 0, 0, 0);
        }
      }
      if (p.quantize) {
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int i = b + u * kCopyThreads + tid;
          quantize_vector(v[u], i, i < nvec, group, p.round_scale, dst, nd, L);
        }
        continue;
      }
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {
        if (j >= nd) break;
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int i = b + u * kCopyThreads + tid;
          if (i < nvec) st_v4(dst[j] + L.payload_offset() + 16 * uint64_t(i), v[u]);
        }
      }
    }
    for (int i = tid; i < ns && !p.quantize; i += kCopyThreads) {
      const float s = p.x_scale[uint64_t(t) * ns + i];
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j)
        if (j < nd) reinterpret_cast<float*>(dst[j] + L.scale_offset())[i] = s;
    }
    for (int i = tid; i < pad_words; i += kCopyThreads) {
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j)
        if (j < nd) reinterpret_cast<uint32_t*>(dst[j] + tail_begin)[i] = 0;
    }
    __syncthreads();  // dst_s is rewritten for the next token
  }

  // The last block to finish tells the proxy thread that its buffer is complete.
  release_when_grid_done(&ws.blocks_done[0], ws.send_ready, ws.dispatch_epoch);
}

}  // namespace

void prepare_dispatch_send(const ep::Layout& layout) {
  const int warps = route_mask_warps(layout);
  if (warps < 1)
    raise(Status::unsupported, "cuda dispatch: " + std::to_string(layout.world_size) + " ranks and " +
                                   std::to_string(layout.num_experts) +
                                   " experts do not fit the routing kernel's shared memory");
  const int bytes = route_smem(layout, warps).total_ints * 4;
  check_cuda(cudaFuncSetAttribute(dispatch_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute(dispatch_route_kernel)");
}

void dispatch_send(const DispatchSendParams& p, const Workspace& ws, int num_sms, cudaStream_t stream) {
  const int warps = route_mask_warps(p.layout);
  const int bytes = route_smem(p.layout, warps).total_ints * 4;
  dispatch_route_kernel<<<1, kRouteThreads, bytes, stream>>>(p, ws, warps);
  check_cuda(cudaGetLastError(), "launch dispatch_route_kernel");
  dispatch_pack_kernel<<<copy_grid(num_sms, p.layout.max_tokens), kCopyThreads, 0, stream>>>(p, ws);
  check_cuda(cudaGetLastError(), "launch dispatch_pack_kernel");
}

}  // namespace ferry::cuda
