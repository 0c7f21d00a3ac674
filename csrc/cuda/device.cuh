// Device helpers shared by the kernels: lane masks, system-scope flags, errors, scans, conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "csrc/cuda/api.cuh"
#include "csrc/cuda/configs.cuh"

namespace ferry::cuda {

__device__ __forceinline__ int lane_id() { return threadIdx.x & (kWarpSize - 1); }
__device__ __forceinline__ uint32_t lanemask_lt() {
  uint32_t m;
  asm volatile("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Flags in mapped host memory are written by the CPU (engine worker) or read by it (proxy thread):
// system scope, acquire/release, so the data they guard is visible once the flag is.
__device__ __forceinline__ uint32_t ld_acquire_sys(const volatile uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(volatile uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void set_error(DeviceError* e, int32_t code, int32_t a, int32_t b, int32_t c) {
  if (atomicCAS(&e->code, kErrNone, code) == kErrNone) {
    e->a = a;
    e->b = b;
    e->c = c;
    __threadfence_system();
  }
}

// Spins until *flag reaches `epoch` (wrapping compare) or the deadline passes; true when it did.
__device__ __forceinline__ bool wait_epoch(const volatile uint32_t* flag, uint32_t epoch, uint64_t timeout_ns,
                                           uint32_t* seen) {
  const uint64_t start = global_timer_ns();
  uint32_t v = ld_acquire_sys(flag);
  while (int32_t(v - epoch) < 0) {
    if (global_timer_ns() - start > timeout_ns) {
      *seen = v;
      return false;
    }
    __nanosleep(64);
    v = ld_acquire_sys(flag);
  }
  *seen = v;
  return true;
}

// In-place exclusive prefix sum of n ints in shared memory by the whole block; returns the total.
// Each thread sums a contiguous segment; segment sums are scanned with warp shuffles, then the warp
// totals by the first warp. scratch holds at least blockDim.x / 32 + 1 ints.
__device__ inline int block_exclusive_scan(int* data, int n, int* scratch) {
  const int per = (n + blockDim.x - 1) / blockDim.x;
  const int begin = min(n, int(threadIdx.x) * per);
  const int end = min(n, begin + per);
  const int lane = lane_id(), warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  int sum = 0;
  for (int i = begin; i < end; ++i) sum += data[i];
  int incl = sum;
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += v;
  }
  if (lane == kWarpSize - 1) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int total = lane < warps ? scratch[lane] : 0;
    int wincl = total;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, wincl, off);
      if (lane >= off) wincl += v;
    }
    if (lane < warps) scratch[lane] = wincl - total;
    if (lane == kWarpSize - 1) scratch[warps] = wincl;
  }
  __syncthreads();
  int run = scratch[warp] + incl - sum;
  for (int i = begin; i < end; ++i) {
    const int v = data[i];
    data[i] = run;
    run += v;
  }
  const int total = scratch[warps];
  __syncthreads();
  return total;
}

// Exclusive prefix sums along the chunk axis of base[c * num_items + item] (c < num_chunks), one
// independent sum per item, by the whole block; totals[item] receives each sum. A group of up to 32
// lanes shares an item: each lane sums a contiguous run of chunks, then a segmented shuffle scan.
__device__ inline void chunk_scan(int* base, int num_chunks, int num_items, int* totals) {
  int tpi = kWarpSize;
  while (tpi > 1 && tpi * num_items > int(blockDim.x)) tpi >>= 1;
  const int groups = blockDim.x / tpi;
  const int q = threadIdx.x % tpi;
  const int per = (num_chunks + tpi - 1) / tpi;
  const int c0 = min(num_chunks, q * per), c1 = min(num_chunks, c0 + per);
  for (int round = 0; round * groups < num_items; ++round) {
    const int item = round * groups + int(threadIdx.x) / tpi;
    const bool valid = item < num_items;
    int sum = 0;
    if (valid)
      for (int c = c0; c < c1; ++c) sum += base[c * num_items + item];
    int incl = sum;
    for (int off = 1; off < tpi; off <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, off, tpi);
      if (q >= off) incl += v;
    }
    const int total = __shfl_sync(0xffffffffu, incl, tpi - 1, tpi);
    if (valid) {
      int run = incl - sum;
      for (int c = c0; c < c1; ++c) {
        const int v = base[c * num_items + item];
        base[c * num_items + item] = run;
        run += v;
      }
      if (q == 0) totals[item] = total;
    }
  }
}

// Grid-wide "all blocks done" followed by a release of `flag` = *value: every block's writes (also
// those to host memory) are visible to whoever sees the flag. One system fence per block: the barrier
// orders the block's writes before thread 0's fence, which is cumulative.
__device__ inline void release_when_grid_done(uint32_t* blocks_done, volatile uint32_t* flag, const uint32_t* value) {
  __syncthreads();
  if (threadIdx.x == 0 && flag != nullptr) {
    __threadfence_system();
    const uint32_t done = atomicAdd(blocks_done, 1u);
    if (done == gridDim.x - 1) {
      *blocks_done = 0;
      __threadfence_system();
      st_release_sys(flag, *value);
    }
  }
}

// Rounding to the output type is round-to-nearest-even, as on the host.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  __device__ static float load(float v) { return v; }
  __device__ static float store(float v) { return v; }
};
template <>
struct Elem<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Elem<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};

// 16 bytes of T as an array, for vector loads and stores.
template <typename T>
union Vec16 {
  static constexpr int kN = 16 / sizeof(T);
  uint4 raw;
  T v[kN];
};

__device__ __forceinline__ uint4 ld_nc_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}
// Loads of data another agent (the NIC, a peer GPU, the CPU) wrote since earlier steps read the same
// addresses: .cv fetches again instead of trusting a cached line.
__device__ __forceinline__ uint4 ld_v4(const void* p) {
  uint4 r;
  asm volatile("ld.global.cv.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ int32_t ld_cv_s32(const void* p) {
  int32_t r;
  asm volatile("ld.global.cv.s32 %0, [%1];" : "=r"(r) : "l"(p));
  return r;
}
__device__ __forceinline__ void st_v4(void* p, uint4 v) { *static_cast<uint4*>(p) = v; }

}  // namespace ferry::cuda
