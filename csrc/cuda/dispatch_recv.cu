// Dispatch, receive half: wait for the arrival flag, rank every received route per local expert,
// and unpack records into the expert-major layout (per local expert, rows ordered by source rank
// then source token; padding rows up to expert_alignment zeroed). Nothing a peer sent is trusted to
// index memory: counts, ranks and experts are checked before use.
#include <algorithm>

#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"
#include "csrc/dtype.h"

namespace ferry::cuda {
namespace {

// Dynamic shared memory of the ranking kernel, in ints.
struct RecvSmem {
  int cnt, base, obase, scratch, masks, total_ints;
};
__host__ __device__ inline RecvSmem recv_smem(const ep::Layout& L) {
  RecvSmem s{};
  s.cnt = 0;
  s.base = s.cnt + L.world_size;
  s.obase = s.base + L.world_size;
  s.scratch = s.obase + L.world_size;
  s.masks = s.scratch + kCopyThreads + 1;
  s.total_ints = s.masks + kCopyWarps * L.experts_per_rank;
  return s;
}

// The buffer holding sender s's private region: the engine's receive buffer, or the one IPC senders
// write into (sender_base); with sender_base there is no overflow region, so a record's offset names
// its sender.
__device__ __forceinline__ const uint8_t* sender_buffer(const DispatchRecvParams& p, int s) {
  return p.sender_base != nullptr ? p.sender_base[s] : p.recv_buf;
}
__device__ __forceinline__ const uint8_t* record_at(const DispatchRecvParams& p, uint64_t offset) {
  return p.sender_base != nullptr ? p.sender_base[offset / p.layout.private_stride()] + offset : p.recv_buf + offset;
}

// Received records are numbered sender-major (the row order), so ranking them in chunks of 32 by
// local expert gives every route its row: rows of chunks before + routes before it in its chunk.
__global__ void __launch_bounds__(kCopyThreads)
    dispatch_recv_route_kernel(DispatchRecvParams p, Workspace ws) {
  extern __shared__ int smem[];
  const ep::Layout& L = p.layout;
  const int R = L.world_size, EPR = L.experts_per_rank, me = L.rank;
  const RecvSmem lay = recv_smem(L);
  int* cnt = smem + lay.cnt;
  int* base = smem + lay.base;
  int* obase = smem + lay.obase;
  int* scratch = smem + lay.scratch;
  const int tid = threadIdx.x, warp = tid / kWarpSize, lane = lane_id();
  uint32_t* mask = reinterpret_cast<uint32_t*>(smem + lay.masks) + warp * EPR;

  if ((p.arrived != nullptr || p.num_ipc_senders > 0) && *ws.arrived == 0) {
    if (blockIdx.x == 0 && tid == 0) *ws.num_recv = 0;
    return;
  }
  for (int e = tid; e < kCopyWarps * EPR; e += blockDim.x) smem[lay.masks + e] = 0;
  __syncthreads();

  for (int s = tid; s < R; s += blockDim.x) {
    const int32_t* counts = ep::header_counts(sender_buffer(p, s) + L.recv_private_offset(s));
    int c = ld_cv_s32(counts + me);
    if (ld_cv_s32(counts) == ep::kPoisonCount) {
      if (blockIdx.x == 0) set_error(ws.error, kErrPeerPoisoned, s, 0, 0);
      c = 0;
    } else if (c < 0 || c > L.max_tokens) {
      if (blockIdx.x == 0) set_error(ws.error, kErrPeerCount, s, c, 0);
      c = 0;
    }
    cnt[s] = c;
    base[s] = c;
    obase[s] = ep::overflow_count(L, c);
  }
  __syncthreads();
  const int N = block_exclusive_scan(base, R, scratch);
  block_exclusive_scan(obase, R, scratch);
  if (blockIdx.x == 0) {
    for (int s = tid; s < R; s += blockDim.x) {
      ws.recv_count[s] = cnt[s];
      if (ws.host_recv_count != nullptr) ws.host_recv_count[s] = cnt[s];
    }
    if (tid == 0) *ws.num_recv = N;
    // The unpack kernel counts each route into it.
    if (p.out_num_tokens_per_rank != nullptr)
      for (int i = tid; i < EPR * R; i += blockDim.x) p.out_num_tokens_per_rank[i] = 0;
  }

  const int nchunks = (N + kChunk - 1) / kChunk;
  for (int c = blockIdx.x * kCopyWarps + warp; c < nchunks; c += gridDim.x * kCopyWarps) {
    const int g = c * kChunk + lane;
    int expert[ep::kMaxTopK];
    float weight[ep::kMaxTopK];
#pragma unroll
    for (int k = 0; k < ep::kMaxTopK; ++k) {
      expert[k] = -1;
      weight[k] = 0.f;
    }
    if (g < N) {
      // The sender owning record g: the last one whose run starts at or before g.
      int lo = 0, hi = R - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (base[mid] <= g) lo = mid;
        else hi = mid - 1;
      }
      const int s = lo, i = g - base[s];
      const uint64_t off = L.recv_record_offset(s, i, obase[s]);
      ws.recv_offset[g] = off;
      ws.recv_sender[g] = s;
      ep::RecordHeader h;
      uint4* hv = reinterpret_cast<uint4*>(&h);
#pragma unroll
      for (int v = 0; v < 4; ++v) hv[v] = ld_v4(sender_buffer(p, s) + off + 16 * v);
      int problem = 0;
      if (h.src_rank != s || h.src_token < 0 || h.src_token >= L.max_tokens) problem = kRecordSource;
      else if (h.num_routes < 1 || h.num_routes > L.max_routes_per_record()) problem = kRecordRoutes;
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) {
        if (problem || k >= h.num_routes) continue;
        const int e = h.local_expert[k];
        bool bad = e < 0 || e >= EPR;
#pragma unroll
        for (int j = 0; j < k; ++j) bad |= expert[j] == e;
        if (bad) problem = kRecordExpert;
        expert[k] = e;
        weight[k] = h.weight[k];
      }
      if (problem) {
        set_error(ws.error, kErrPeerRecord, s, i, problem);
#pragma unroll
        for (int k = 0; k < ep::kMaxTopK; ++k) expert[k] = -1;
      }
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k)
        if (expert[k] >= 0) atomicOr(&mask[expert[k]], 1u << lane);
    }
    __syncwarp();
    if (g < N) {
      int routes = 0;
#pragma unroll
      for (int k = 0; k < ep::kMaxTopK; ++k) {
        const int e = expert[k];
        routes += e >= 0 ? 1 : 0;
        ws.recv_expert[g * ep::kMaxTopK + k] = e;
        ws.recv_row[g * ep::kMaxTopK + k] = e >= 0 ? __popc(mask[e] & lanemask_lt()) : -1;
        ws.recv_weight[g * ep::kMaxTopK + k] = weight[k];
      }
      if (L.weights_at_combine && ws.host_record_routes != nullptr) ws.host_record_routes[g] = routes;
    }
    __syncwarp();
    for (int e = lane; e < EPR; e += kWarpSize) {
      ws.recv_chunk_base[c * EPR + e] = __popc(mask[e]);
      mask[e] = 0;
    }
    __syncwarp();
  }

  // The last block to finish ranking turns the per-chunk counts into first rows (an exclusive scan
  // over chunks per local expert) and the rows per expert: one launch fewer than a separate scan.
  __shared__ bool last;
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    last = atomicAdd(&ws.blocks_done[2], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  if (tid == 0) ws.blocks_done[2] = 0;
  __threadfence();
  chunk_scan(ws.recv_chunk_base, nchunks, EPR, ws.expert_rows);
  __syncthreads();
  for (int e = tid; e < EPR; e += blockDim.x) {
    const int rows = ws.expert_rows[e];
    if (int(ep::align_up(rows, L.expert_alignment)) > L.max_rows_per_expert)
      set_error(ws.error, kErrExpertOverflow, e, rows, L.max_rows_per_expert);
    p.out_expert_num_tokens[e] = rows < L.max_rows_per_expert ? rows : L.max_rows_per_expert;
  }
}

// One block per received record (grid-stride): its payload and scales are read once and stored into
// the row of each of its routes. The padding rows are zeroed after the records.
__global__ void __launch_bounds__(kCopyThreads)
    dispatch_unpack_kernel(DispatchRecvParams p, Workspace ws) {
  __shared__ int rows_s[ep::kMaxTopK];
  __shared__ int src_token_s;
  const ep::Layout& L = p.layout;
  const int EPR = L.experts_per_rank, max_rows = L.max_rows_per_expert, ns = L.num_scales;
  const int scale_slots = L.out_scale_slots(p.scale_layout);
  const int tid = threadIdx.x, lane = lane_id();
  const int N = *ws.num_recv;
  const int nvec = int(L.payload_bytes / 16);
  uint8_t* out_x = static_cast<uint8_t*>(p.out_expert_x);

  for (int g = blockIdx.x; g < N; g += gridDim.x) {
    const uint8_t* src = record_at(p, ws.recv_offset[g]);
    const uint8_t* payload = src + L.payload_offset();
    // The first payload loads are issued before the row lookups, so their latency overlaps them.
    uint4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = u * kCopyThreads + tid;
      if (i < nvec) v[u] = ld_v4(payload + 16 * uint64_t(i));
    }
    if (tid < ep::kMaxTopK) {
      int row = -1;
      const int e = ws.recv_expert[g * ep::kMaxTopK + tid];
      if (e >= 0) {
        const int r = ws.recv_chunk_base[(g / kChunk) * EPR + e] + ws.recv_row[g * ep::kMaxTopK + tid];
        if (r < max_rows) row = e * max_rows + r;
        if (p.out_num_tokens_per_rank != nullptr)
          atomicAdd(&p.out_num_tokens_per_rank[e * L.world_size + ws.recv_sender[g]], 1);
      }
      ws.recv_row[g * ep::kMaxTopK + tid] = row;
      rows_s[tid] = row;
    }
    if (tid == 0 && p.out_src_token != nullptr) src_token_s = ld_cv_s32(src);  // RecordHeader::src_token
    __syncthreads();
    if (tid < ep::kMaxTopK && p.out_src_token != nullptr && rows_s[tid] >= 0) p.out_src_token[rows_s[tid]] = src_token_s;
    int rows[ep::kMaxTopK];
#pragma unroll
    for (int j = 0; j < ep::kMaxTopK; ++j) rows[j] = rows_s[j];
    for (int b = 0; b < nvec; b += kCopyThreads * kCopyUnroll) {
      if (b > 0) {
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int i = b + u * kCopyThreads + tid;
          if (i < nvec) v[u] = ld_v4(payload + 16 * uint64_t(i));
        }
      }
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {
        if (rows[j] < 0) continue;
        uint8_t* dst = out_x + uint64_t(rows[j]) * L.payload_bytes;
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
          const int i = b + u * kCopyThreads + tid;
          if (i < nvec) st_v4(dst + 16 * uint64_t(i), v[u]);
        }
      }
    }
    if (p.out_expert_x_scale != nullptr) {
      const float* scales = reinterpret_cast<const float*>(src + L.scale_offset());
      for (int i = tid; i < scale_slots; i += kCopyThreads) {
        const float s = i < ns ? __int_as_float(ld_cv_s32(scales + i)) : 0.f;
#pragma unroll
        for (int j = 0; j < ep::kMaxTopK; ++j)
          if (rows[j] >= 0)
            ep::dtype::store_out_scale(p.out_expert_x_scale, p.scale_layout,
                                       L.out_scale_offset(p.scale_layout, rows[j], i), s);
      }
    }
    __syncthreads();  // rows_s is rewritten for the next record
  }

  const int gw = blockIdx.x * kCopyWarps + tid / kWarpSize;
  const int tw = gridDim.x * kCopyWarps;
  // Padding rows: local expert e's rows [count, align_up(count)) are zero.
  const int align = L.expert_alignment;
  if (align > 1) {
    for (int w = gw; w < EPR * (align - 1); w += tw) {
      const int e = w / (align - 1);
      const int rows = ws.expert_rows[e];
      const int r = rows + w % (align - 1);
      if (r >= int(ep::align_up(rows, align)) || r >= max_rows) continue;
      const uint64_t row = uint64_t(e) * max_rows + r;
      uint8_t* dst = out_x + row * L.payload_bytes;
      for (int i = lane; i < nvec; i += kWarpSize) st_v4(dst + 16 * uint64_t(i), make_uint4(0, 0, 0, 0));
      if (p.out_expert_x_scale != nullptr)
        for (int i = lane; i < scale_slots; i += kWarpSize)
          ep::dtype::store_out_scale(p.out_expert_x_scale, p.scale_layout, L.out_scale_offset(p.scale_layout, row, i),
                                     0.f);
    }
  }
}

}  // namespace

void prepare_dispatch_recv(const ep::Layout& layout) {
  const int bytes = recv_smem(layout).total_ints * 4;
  if (bytes > kRouteSmemBytes)
    raise(Status::unsupported, "cuda dispatch: " + std::to_string(layout.world_size) + " ranks with " +
                                   std::to_string(layout.experts_per_rank) +
                                   " local experts do not fit the receive kernel's shared memory");
  check_cuda(cudaFuncSetAttribute(dispatch_recv_route_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
             "cudaFuncSetAttribute(dispatch_recv_route_kernel)");
}

void dispatch_recv(const DispatchRecvParams& p, const Workspace& ws, int num_sms, cudaStream_t stream) {
  wait_step(p.arrived, p.sender_arrived, p.ipc_senders, p.num_ipc_senders, ws.dispatch_epoch, p.timeout_ns,
            kErrDispatchTimeout, ws, stream);
  const int bytes = recv_smem(p.layout).total_ints * 4;
  // Fewer blocks than the copy kernels: each one reads every sender's count header.
  const uint64_t max_chunks = (p.layout.max_recv_records() + kChunk - 1) / kChunk;
  const int route_blocks = int(std::min<uint64_t>(uint64_t(num_sms) * 2, (max_chunks + kCopyWarps - 1) / kCopyWarps));
  dispatch_recv_route_kernel<<<route_blocks, kCopyThreads, bytes, stream>>>(p, ws);
  check_cuda(cudaGetLastError(), "launch dispatch_recv_route_kernel");
  const uint64_t pad_blocks = (uint64_t(p.layout.experts_per_rank) * (p.layout.expert_alignment - 1) + kCopyWarps - 1) / kCopyWarps;
  dispatch_unpack_kernel<<<copy_grid(num_sms, std::max<uint64_t>(p.layout.max_recv_records(), pad_blocks)), kCopyThreads, 0,
                           stream>>>(p, ws);
  check_cuda(cudaGetLastError(), "launch dispatch_unpack_kernel");
}

}  // namespace ferry::cuda
