/* Ferry: MoE expert-parallel dispatch/combine over libfabric (EFA, ConnectX, tcp, shm).
 * Stable C ABI. Every function returns a ferry_status_t; on failure ferry_last_error() gives text
 * naming the rank, the peer and the operation. */
#ifndef FERRY_FERRY_H
#define FERRY_FERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FERRY_VERSION_MAJOR 0
#define FERRY_VERSION_MINOR 1

typedef enum ferry_status {
  FERRY_OK = 0,
  FERRY_ERR_INVALID_ARGUMENT = 1,
  FERRY_ERR_TIMEOUT = 2,
  FERRY_ERR_PEER_FAILED = 3,
  FERRY_ERR_TRANSPORT = 4,
  FERRY_ERR_OUT_OF_MEMORY = 5,
  FERRY_ERR_UNSUPPORTED = 6,
  FERRY_ERR_INTERNAL = 7,
} ferry_status_t;

/* Text of the last error on this thread ("" if none). */
const char* ferry_last_error(void);
const char* ferry_status_string(ferry_status_t status);

typedef enum ferry_dtype {
  FERRY_BF16 = 0,
  FERRY_F16 = 1,
  FERRY_F32 = 2,
  FERRY_FP8_E4M3 = 3,
} ferry_dtype_t;

typedef enum ferry_device {
  FERRY_DEVICE_HOST = 0,
  FERRY_DEVICE_CUDA = 1,
} ferry_device_t;

/* Flags for dispatch/combine: SEND posts this rank's data, RECV waits for and unpacks the peers'.
 * Both together is one blocking call; separately, the caller may compute in between. */
enum { FERRY_SEND = 1, FERRY_RECV = 2, FERRY_SEND_RECV = 3 };

/* ---- bootstrap ---------------------------------------------------------------------------- */
typedef struct ferry_bootstrap* ferry_bootstrap_t;

/* torchrun env (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK) or an mpirun/srun launch. */
ferry_status_t ferry_bootstrap_from_env(int timeout_ms, ferry_bootstrap_t* out);
ferry_status_t ferry_bootstrap_tcp(const char* master_addr, int master_port, int rank, int world_size,
                                   int timeout_ms, ferry_bootstrap_t* out);
ferry_status_t ferry_bootstrap_mpi(ferry_bootstrap_t* out);
/* The caller's process group: allgather(context, in, bytes, out) fills out[world_size * bytes],
 * rank-major, and returns 0 on success. */
typedef int (*ferry_allgather_fn)(void* context, const void* in, size_t bytes, void* out);
ferry_status_t ferry_bootstrap_callback(int rank, int world_size, ferry_allgather_fn allgather,
                                        void* context, ferry_bootstrap_t* out);
ferry_status_t ferry_bootstrap_destroy(ferry_bootstrap_t bootstrap);

/* ---- all-to-all ----------------------------------------------------------------------------- */
typedef struct ferry_a2a_config {
  int rank;                    /* must match the bootstrap's */
  int world_size;
  int num_experts;             /* global; a multiple of world_size (expert e on rank e / (num_experts / world_size)) */
  int experts_per_token;       /* top-k, 1..8 */
  int max_tokens_per_rank;
  int hidden_dim;
  ferry_dtype_t in_dtype;      /* dispatch payload type */
  int scale_block;             /* >0: one fp32 scale per scale_block elements travels with each token */
  ferry_dtype_t out_dtype;     /* combine output / expert_y type: bf16, f16 or f32 */
  int expert_alignment;        /* rows per expert padded to a multiple of this (>=1) */
  ferry_device_t device;
  int cuda_device;             /* for FERRY_DEVICE_CUDA; -1: current device */
  int nets_per_rank;           /* NICs per rank (>=1) */
  const char* provider;        /* NULL: "tcp" unless FERRY_PROVIDER is set */
  int timeout_ms;              /* every wait's deadline; 0: 30000 */
  int dp_size;                 /* ranks of one attention-TP group holding the same tokens (>=1, divides
                                  world_size): ranks g*dp_size .. g*dp_size+dp_size-1 pass identical
                                  inputs, member m sends tokens t % dp_size == m, and every member
                                  receives the whole combine output */
  int private_tokens;          /* records per sender written speculatively with the counts, 0..max_tokens;
                                  the rest follows once counts are known. -1: automatic (max_tokens:
                                  the receive region has the same size whatever the split) */
} ferry_a2a_config_t;

/* Fills a config with defaults (bf16 in/out, alignment 1, host, 1 NIC, dp_size 1, timeout 30 s). */
void ferry_a2a_config_init(ferry_a2a_config_t* config);

typedef struct ferry_a2a* ferry_a2a_t;

typedef struct ferry_buffer_sizes {
  uint64_t record_bytes;        /* one token record on the wire (payload + scales + header) */
  uint64_t send_bytes;          /* dispatch send staging */
  uint64_t recv_bytes;          /* dispatch receive region (private + overflow) */
  uint64_t combine_send_bytes;
  uint64_t combine_recv_bytes;
  uint64_t total_registered_bytes;
  int max_rows_per_expert;      /* row capacity of one local expert in the batched layout */
  int num_local_experts;
} ferry_buffer_sizes_t;

/* Sizes for a config, without creating anything (any world size: sizing EP64 from a laptop). */
ferry_status_t ferry_a2a_buffer_sizes(const ferry_a2a_config_t* config, ferry_buffer_sizes_t* out);

ferry_status_t ferry_a2a_create(const ferry_a2a_config_t* config, ferry_bootstrap_t bootstrap,
                                ferry_a2a_t* out);
ferry_status_t ferry_a2a_destroy(ferry_a2a_t a2a);
ferry_status_t ferry_a2a_buffer_bytes(ferry_a2a_t a2a, ferry_buffer_sizes_t* out);

/* Dispatch (pplx-kernels AllToAll contract).
 *  out_expert_num_tokens [num_local_experts] int32: rows received per local expert.
 *  out_expert_x          expert-major rows: local expert e starts at row e * max_rows_per_expert
 *                        (batched layout; rows beyond the count are padding up to expert_alignment
 *                        and are zero), each row hidden_dim elements of in_dtype.
 *  out_expert_x_scale    [num_local_experts * max_rows_per_expert][hidden_dim / scale_block] f32, or
 *                        NULL when scale_block == 0.
 *  dp_x [num_tokens][hidden_dim] in_dtype; dp_x_scale [num_tokens][hidden/scale_block] f32 or NULL.
 *  indices [num_tokens][experts_per_token] int32 in [0, num_experts) or -1 (no route).
 *  weights [num_tokens][experts_per_token] f32.
 *  bound_m: pointer to the token count (device memory for the CUDA backend, so it can come from a
 *  kernel and be captured in a graph); num_tokens is the host-side upper bound (<= max_tokens).
 * Pointers are host memory for FERRY_DEVICE_HOST, device memory for FERRY_DEVICE_CUDA. */
typedef struct ferry_dispatch_args {
  int32_t* out_expert_num_tokens;
  void* out_expert_x;
  float* out_expert_x_scale;
  const void* dp_x;
  const float* dp_x_scale;
  const int32_t* indices;
  const float* weights;
  const int32_t* bound_m;       /* NULL: num_tokens is exact */
  int num_tokens;
  int flags;                    /* FERRY_SEND | FERRY_RECV */
} ferry_dispatch_args_t;

/* Combine: out_tokens[num_tokens][hidden_dim] out_dtype (= or += when accumulate) receives
 * sum_k weights[t][k] * expert_y[row of (t, k)]. expert_y has the layout of out_expert_x with
 * out_dtype elements. indices/weights/num_tokens are those of the matching dispatch. */
typedef struct ferry_combine_args {
  void* out_tokens;
  const int32_t* indices;
  const float* weights;
  const void* expert_y;
  const int32_t* bound_m;
  int num_tokens;
  int accumulate;
  int flags;
} ferry_combine_args_t;

ferry_status_t ferry_a2a_dispatch(ferry_a2a_t a2a, const ferry_dispatch_args_t* args, void* stream);
ferry_status_t ferry_a2a_combine(ferry_a2a_t a2a, const ferry_combine_args_t* args, void* stream);

typedef struct ferry_a2a_stats {
  uint64_t dispatch_bytes_sent;   /* last dispatch, this rank, over the network */
  uint64_t combine_bytes_sent;
  uint64_t dispatch_records_sent;
  uint64_t overflow_records_sent;
} ferry_a2a_stats_t;
ferry_status_t ferry_a2a_stats(ferry_a2a_t a2a, ferry_a2a_stats_t* out);

#ifdef __cplusplus
}
#endif
#endif
