/* Ferry: MoE expert-parallel dispatch/combine over libfabric (EFA, ConnectX, tcp, shm).
 * Stable C ABI. Every function returns a ferry_status_t; on failure ferry_last_error() gives text
 * naming the rank, the step, the operation and, where one is to blame, the peer.
 *
 * Threads. ferry_last_error() is per thread: read it on the thread whose call failed. The calls on
 * one ferry_a2a_t must not overlap (one thread at a time; the caller serializes them); different
 * handles may be used from different threads. Collective calls on one bootstrap (ferry_a2a_create,
 * ferry_bootstrap_allgather) must be made by every rank, in the same order, one at a time.
 *
 * Handles. A destroyed handle, one of the other kind, or any value this library did not return is
 * refused with FERRY_ERR_INVALID_ARGUMENT naming it (destroying one twice included); NULL is
 * refused by every call but the destroy functions, for which it is a no-op. */
#ifndef FERRY_FERRY_H
#define FERRY_FERRY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FERRY_VERSION_MAJOR 0
#define FERRY_VERSION_MINOR 1

/* Defaults: every wait of an all-to-all (ferry_a2a_config_t.timeout_ms 0), and a bootstrap's
 * rendezvous and allgathers (timeout_ms <= 0). */
#define FERRY_DEFAULT_TIMEOUT_MS 30000
#define FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS 60000

/* Limits the library enforces (ferry_a2a_create and ferry_a2a_buffer_sizes refuse configs beyond them). */
#define FERRY_MAX_TOP_K 8                  /* experts_per_token */
#define FERRY_MAX_RANKS 4096               /* world_size (immediates carry the sender in 12 bits) */
#define FERRY_MAX_EXPERTS_PER_RANK 32767   /* num_experts / world_size (records carry it in 16 bits) */
#define FERRY_MAX_NETS_PER_RANK 8          /* nets_per_rank */
#define FERRY_ROW_ALIGN_BYTES 16           /* hidden_dim * element size must be a multiple */

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

/* Text of the last error on this thread ("" after a call that succeeded). */
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

/* Quantize on dispatch (ferry_dispatch_args_t.quantize): the caller passes bf16 tokens and Ferry
 * casts them to the all-to-all's fp8 wire format while packing (no separate pass over the tokens).
 * FERRY_QUANTIZE_FP8_BLOCK needs in_dtype FERRY_FP8_E4M3 and a scale_block that is a power of two
 * in [FERRY_QUANTIZE_MIN_BLOCK, FERRY_QUANTIZE_MAX_BLOCK] (DeepEP's low-latency dispatch: 128).
 *
 * Numerics, per token and per block of scale_block consecutive elements x_i (bf16, exact in fp32),
 * in fp32 arithmetic, each operation rounded to nearest even:
 *  amax  = max(FERRY_QUANTIZE_AMAX_FLOOR, max_i |x_i| over the finite x_i)
 *  without round_scale: scale = amax * (1.0f / 448.0f)   (the fp32 constant nearest 1/448)
 *                       mult  = 448.0f / amax
 *  with round_scale:    scale = 2^e, e = the least integer with 2^e >= amax * (1.0f / 448.0f)
 *                       mult  = 2^-e
 *  q_i   = fp8 e4m3 (the "fn" variant) nearest to x_i * mult, ties to even mantissa, saturating:
 *          beyond +-448 gives +-448 (infinities too), a NaN gives 0x7f (the canonical NaN, as
 *          the GPUs' conversion gives it), the sign of zero is kept.
 * scale travels with the token and lands in out_expert_x_scale; q * scale approximates x. A block
 * of zeros gets scale 1e-4 / 448 (2^-22 with round_scale) and zero bytes. For finite inputs these
 * are the bytes of DeepEP's low-latency cast (fp8 values and fp32 scales). */
typedef enum ferry_quantize {
  FERRY_QUANTIZE_NONE = 0,        /* dp_x holds in_dtype elements; scales come from dp_x_scale */
  FERRY_QUANTIZE_FP8_BLOCK = 1,   /* dp_x holds bf16 elements; Ferry computes q and the scales */
} ferry_quantize_t;
#define FERRY_QUANTIZE_MIN_BLOCK 8
#define FERRY_QUANTIZE_MAX_BLOCK 256
#define FERRY_QUANTIZE_AMAX_FLOOR 1e-4f

/* Where combine's weights come from (ferry_a2a_config_t.combine_weights). */
typedef enum ferry_combine_weights {
  /* dispatch carries each token's weights; every destination rank returns one partial per token,
   * the weighted sum over its own experts (the fewest bytes; see ferry_combine_args_t's numerics). */
  FERRY_WEIGHTS_AT_DISPATCH = 0,
  /* combine RECV takes the weights (ferry_combine_args_t.weights): every destination returns each
   * of the token's expert rows unweighted, and the source sums them. DeepEP's low-latency combine,
   * whose dispatch knows no weights. Dispatch's weights are not read (may be NULL). */
  FERRY_WEIGHTS_AT_COMBINE = 1,
} ferry_combine_weights_t;

/* Layout of the scales a dispatch writes into out_expert_x_scale (ferry_dispatch_args_t.
 * out_scale_layout), with L = num_local_experts, M = max_rows_per_expert, S = hidden_dim /
 * scale_block; row r of local expert e is the row of out_expert_x at e * M + r. */
typedef enum ferry_scale_layout {
  /* f32 [L][M][S]: scale s of row r of expert e at (e * M + r) * S + s. */
  FERRY_SCALE_ROW_MAJOR = 0,
  /* f32 [L][S][M]: at (e * S + s) * M + r. Per expert, the rows are the fastest index: DeepEP's
   * low-latency recv_x_scales (shape [L, M, S], strides (M * S, 1, M)), DeepGEMM's MN-major scales. */
  FERRY_SCALE_COLUMN_MAJOR = 1,
  /* UE8M0: the exponent byte of each fp32 scale (bits 30..23; the scale itself when it is a power
   * of two, as every scale is with round_scale; otherwise the scale rounded down to one), four
   * scales to a 32-bit word, byte j of word g holding scale 4g + j (bytes past S are 0), words
   * laid out as int32 [L][G][M] with G = ceil(S / 4): at (e * G + g) * M + r. DeepEP's
   * use_ue8m0 recv_x_scales (shape [L, M, G], strides (M * G, 1, M)). */
  FERRY_SCALE_UE8M0_COLUMN_MAJOR = 2,
} ferry_scale_layout_t;

/* Flags for dispatch/combine: SEND posts this rank's data, RECV waits for and unpacks the peers'.
 * Both together is one blocking call; separately, the caller may compute in between. The halves
 * alternate strictly on a handle: dispatch SEND, dispatch RECV, combine SEND, combine RECV, then the
 * next step's dispatch SEND (FERRY_SEND_RECV is two of them in one call). Any other flags value, or
 * a half out of this order, is refused (FERRY_ERR_INVALID_ARGUMENT, nothing done). */
enum { FERRY_SEND = 1, FERRY_RECV = 2, FERRY_SEND_RECV = 3 };

/* ---- bootstrap ---------------------------------------------------------------------------- */
typedef struct ferry_bootstrap* ferry_bootstrap_t;

/* From the launcher's environment: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
 * MASTER_ADDR, MASTER_PORT), Slurm's srun without MPI (SLURM_PROCID, SLURM_NTASKS, ...: rank 0 on the
 * step's first node, at a port derived from the job id), or an MPI launch without MASTER_ADDR (then as
 * ferry_bootstrap_mpi). The TCP rendezvous listens on FERRY_BOOTSTRAP_PORT when set, else on
 * MASTER_PORT, except under torchrun (TORCHELASTIC_RUN_ID set) whose store holds MASTER_PORT: there on
 * MASTER_PORT + 1. timeout_ms <= 0: FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS.
 * TCP bootstraps (this one and ferry_bootstrap_tcp) admit only ranks that prove the job key:
 * FERRY_JOB_KEY when set (the same secret on every rank), else a key derived from the rendezvous port
 * and the launcher's job id, which keeps out other jobs and stray connections but not someone who can
 * read the job's environment. Rank 0 listens only on the address MASTER_ADDR names (loopback for
 * 127.0.0.1); FERRY_BOOTSTRAP_BIND_ADDR overrides it (e.g. 0.0.0.0 behind NAT). */
ferry_status_t ferry_bootstrap_from_env(int timeout_ms, ferry_bootstrap_t* out);
ferry_status_t ferry_bootstrap_tcp(const char* master_addr, int master_port, int rank, int world_size,
                                   int timeout_ms, ferry_bootstrap_t* out);
/* MPI_COMM_WORLD, through a duplicate of it (Ferry's collectives never match the application's).
 * When MPI is not initialized yet, Ferry calls MPI_Init_thread(MPI_THREAD_SERIALIZED) here and
 * MPI_Finalize when the bootstrap goes (the last of ferry_bootstrap_destroy and the destroys of the
 * all-to-alls created from it); when the application initialized MPI, Ferry neither initializes nor
 * finalizes it. Ferry calls MPI only from the threads that call ferry_bootstrap_* and
 * ferry_a2a_create/destroy (never from its own threads), so an application initialized with
 * MPI_THREAD_FUNNELED makes those calls from its main thread. Refused once MPI is finalized. */
ferry_status_t ferry_bootstrap_mpi(ferry_bootstrap_t* out);
/* The caller's process group: allgather(context, in, bytes, out) fills out[world_size * bytes],
 * rank-major, and returns 0 on success. */
typedef int (*ferry_allgather_fn)(void* context, const void* in, size_t bytes, void* out);
ferry_status_t ferry_bootstrap_callback(int rank, int world_size, ferry_allgather_fn allgather,
                                        void* context, ferry_bootstrap_t* out);
/* Releases the handle. An all-to-all created from it keeps the bootstrap until it is destroyed too. */
ferry_status_t ferry_bootstrap_destroy(ferry_bootstrap_t bootstrap);
/* The bootstrap's own collective, for the caller's setup exchanges: every rank contributes `bytes`
 * bytes from `in`; `out` receives world_size * bytes, rank-major. Collective: every rank calls it,
 * in the same order relative to its other collective calls on this bootstrap (ferry_a2a_create).
 * bytes 0 is a barrier (in and out may then be NULL). timeout_ms <= 0:
 * FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS; a callback bootstrap's deadline is its callback's. */
ferry_status_t ferry_bootstrap_allgather(ferry_bootstrap_t bootstrap, const void* in, size_t bytes, void* out,
                                         int timeout_ms);
ferry_status_t ferry_bootstrap_rank(ferry_bootstrap_t bootstrap, int* rank);
ferry_status_t ferry_bootstrap_world_size(ferry_bootstrap_t bootstrap, int* world_size);

/* ---- all-to-all -----------------------------------------------------------------------------
 * Config: each field is checked at ferry_a2a_create (and by ferry_a2a_buffer_sizes) against the
 * limits above, with an error naming it. Every rank must pass the same value of each field that
 * shapes the wire or the buffers: world_size, num_experts, experts_per_token, max_tokens_per_rank,
 * hidden_dim, in_dtype, scale_block, out_dtype, private_tokens (-1 counting as max_tokens_per_rank),
 * dp_size, device, nets_per_rank, provider (after FERRY_PROVIDER) and combine_weights.
 * ferry_a2a_create compares them across ranks before building anything and, if any differs, or one
 * rank's config is invalid, or
 * two builds of different wire versions meet, fails on every rank with FERRY_ERR_INVALID_ARGUMENT
 * naming the field and the ranks' values (a rank whose own config fails its checks while the
 * others agree gets that failure's status). rank, cuda_device, expert_alignment and timeout_ms are
 * each rank's own. */
typedef struct ferry_a2a_config {
  int rank;                    /* must match the bootstrap's */
  int world_size;              /* must match the bootstrap's; 1..FERRY_MAX_RANKS */
  int num_experts;             /* global; a multiple of world_size (expert e on rank e / (num_experts /
                                  world_size)), at most FERRY_MAX_EXPERTS_PER_RANK per rank */
  int experts_per_token;       /* top-k, 1..FERRY_MAX_TOP_K */
  int max_tokens_per_rank;     /* world_size * max_tokens_per_rank <= 2^30 */
  int hidden_dim;              /* hidden_dim * element size of in_dtype a multiple of FERRY_ROW_ALIGN_BYTES
                                  (hidden 7 of f32 or 100 of bf16 are refused); for FERRY_DEVICE_CUDA
                                  that of out_dtype too */
  ferry_dtype_t in_dtype;      /* dispatch payload type */
  int scale_block;             /* >0: one fp32 scale per scale_block elements travels with each token;
                                  it must divide hidden_dim */
  ferry_dtype_t out_dtype;     /* combine output / expert_y type: bf16, f16 or f32 */
  int expert_alignment;        /* rows per expert padded to a multiple of this (1..2^30) */
  ferry_device_t device;       /* the backend; FERRY_DEVICE_CUDA needs dp_size 1 */
  int cuda_device;             /* for FERRY_DEVICE_CUDA; -1: current device */
  int nets_per_rank;           /* NICs per rank (1..FERRY_MAX_NETS_PER_RANK) */
  const char* provider;        /* NULL: "tcp" unless FERRY_PROVIDER is set */
  int timeout_ms;              /* every wait's deadline; 0: FERRY_DEFAULT_TIMEOUT_MS */
  int dp_size;                 /* ranks of one attention-TP group holding the same tokens (>=1, divides
                                  world_size): ranks g*dp_size .. g*dp_size+dp_size-1 pass identical
                                  inputs, member m sends tokens t % dp_size == m, and every member
                                  receives the whole combine output */
  int private_tokens;          /* records per sender written speculatively with the counts, 0..max_tokens;
                                  the rest follows once counts are known. -1: automatic (max_tokens:
                                  the receive region has the same size whatever the split) */
  ferry_combine_weights_t combine_weights;  /* FERRY_WEIGHTS_AT_COMBINE needs dp_size 1; its combine
                                  buffers hold min(experts_per_token, experts per rank) rows per
                                  record instead of one partial */
} ferry_a2a_config_t;

/* Fills a config with defaults (bf16 in/out, alignment 1, host, 1 NIC, dp_size 1, timeout
 * FERRY_DEFAULT_TIMEOUT_MS, private_tokens -1, weights at dispatch). */
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

/* Collective over the bootstrap: every rank calls it with agreeing configs (see above). */
ferry_status_t ferry_a2a_create(const ferry_a2a_config_t* config, ferry_bootstrap_t bootstrap,
                                ferry_a2a_t* out);
/* Local (not collective). Peers still in a step with this rank see it fail. */
ferry_status_t ferry_a2a_destroy(ferry_a2a_t a2a);
ferry_status_t ferry_a2a_buffer_bytes(ferry_a2a_t a2a, ferry_buffer_sizes_t* out);

/* Dispatch (pplx-kernels AllToAll contract).
 *  out_expert_num_tokens [num_local_experts] int32: rows received per local expert.
 *  out_expert_x          expert-major rows: local expert e starts at row e * max_rows_per_expert
 *                        (batched layout), each row hidden_dim elements of in_dtype. Within an
 *                        expert, rows are ordered by source rank, then by source token index; rows
 *                        from the count up to the count rounded up to expert_alignment are zero;
 *                        rows after those are not written.
 *  out_expert_x_scale    [num_local_experts * max_rows_per_expert][hidden_dim / scale_block] f32, or
 *                        NULL when scale_block == 0; rows as out_expert_x (FERRY_SCALE_ROW_MAJOR;
 *                        out_scale_layout picks another layout of the same scales).
 *  dp_x [num_tokens][hidden_dim] in_dtype (bf16 with quantize); dp_x_scale [num_tokens][hidden /
 *  scale_block] f32, or NULL without scales and with quantize.
 *  indices [num_tokens][experts_per_token] int32 in [0, num_experts) or -1 (no route); a token
 *          naming one expert twice is an error.
 *  weights [num_tokens][experts_per_token] f32 (not read with FERRY_WEIGHTS_AT_COMBINE).
 *  bound_m: pointer to the token count m (device memory for the CUDA backend, so it can come from a
 *  kernel and be captured in a graph), read once by the SEND half; num_tokens is the host-side
 *  upper bound (<= max_tokens_per_rank) and m must be in [0, num_tokens]. Tokens m..num_tokens-1
 *  are not sent, and combine leaves their rows of out_tokens untouched.
 * Pointers are host memory for FERRY_DEVICE_HOST, device memory for FERRY_DEVICE_CUDA.
 *
 * Errors and the handle. Checked before anything moves, leaving the handle as it was (the call may
 * be made again, corrected; the peers keep waiting for this rank within their deadline): a dead or
 * foreign handle, NULL args, flags or a half out of order, num_tokens outside [0,
 * max_tokens_per_rank], NULL buffers the call needs (dp_x, indices, weights unless they come at
 * combine, and dp_x_scale with scales unless Ferry quantizes, when num_tokens > 0; the out_ buffers for RECV; expert_y for combine SEND; out_tokens, and
 * weights with FERRY_WEIGHTS_AT_COMBINE, for combine RECV when num_tokens > 0), quantize, round_scale or out_scale_layout values the
 * all-to-all cannot honour (quantize without an fp8 in_dtype or with a scale_block it does not
 * support, a dp_x_scale given with quantize, round_scale without quantize, a scale layout
 * without scales), and a combine num_tokens other than its dispatch's. Every
 * other error fails the step: an expert id out of range or repeated, or m outside [0, num_tokens],
 * found while the step runs (FERRY_ERR_INVALID_ARGUMENT on this rank, the peers fail at once with
 * FERRY_ERR_PEER_FAILED naming it), a peer's failure or bad data, a deadline, a transport error.
 * After a failed step the handle is dead: dispatch and combine return FERRY_ERR_INTERNAL; destroy it
 * and create another (every rank). */
typedef struct ferry_dispatch_args {
  int32_t* out_expert_num_tokens;
  void* out_expert_x;
  float* out_expert_x_scale;    /* f32, or int32 words with FERRY_SCALE_UE8M0_COLUMN_MAJOR */
  const void* dp_x;
  const float* dp_x_scale;
  const int32_t* indices;
  const float* weights;
  const int32_t* bound_m;       /* NULL: num_tokens is exact */
  int num_tokens;
  int flags;                    /* FERRY_SEND | FERRY_RECV */
  /* Read by SEND. FERRY_QUANTIZE_FP8_BLOCK: dp_x is [num_tokens][hidden_dim] bf16, Ferry computes
   * the fp8 payload and the scales (see ferry_quantize_t) and dp_x_scale must be NULL. */
  ferry_quantize_t quantize;
  int round_scale;              /* SEND, with quantize only: 1 rounds each scale up to a power of two */
  /* Read by RECV: how out_expert_x_scale is laid out (scale_block > 0 only; 0 is the row-major
   * layout above). The receiver decides it alone: a peer's scales arrive as fp32 either way. */
  ferry_scale_layout_t out_scale_layout;
  /* Written by RECV when not NULL: where each row came from. out_expert_src_token [num_local_experts
   * * max_rows_per_expert] int32: the row's token index on its source rank (rows from the count on
   * not written). out_expert_num_tokens_per_rank [num_local_experts][world_size] int32: the rows
   * each local expert got from each rank; rows are source-rank major, so expert e's rows from rank
   * s start at the sum of its counts from ranks before s (DeepEP's recv_src_info, layout_range). */
  int32_t* out_expert_src_token;
  int32_t* out_expert_num_tokens_per_rank;
} ferry_dispatch_args_t;

/* Combine: out_tokens[num_tokens][hidden_dim] out_dtype (= or += when accumulate) receives
 * sum_k weights[t][k] * expert_y[row of (t, k)]. expert_y has the layout of out_expert_x with
 * out_dtype elements. num_tokens must be the matching dispatch's (checked by RECV); combine uses
 * the routes and token count (m) its dispatch carried: indices and bound_m here are not read, and
 * weights are the dispatch's (not read here) unless the config takes them at combine.
 * Numerics with FERRY_WEIGHTS_AT_DISPATCH, in this order (fp32 arithmetic, a multiply then an add,
 * never fused):
 *  1. each destination rank d of token t forms one partial: acc = 0, then for each of t's routes
 *     to d's experts in top-k order acc += weights[t][k] * expert_y[row], rounded once to out_dtype;
 *  2. the source: acc = 0 (or out_tokens[t] with accumulate), then acc += partial_d for each
 *     destination d in ascending rank order, rounded once to out_dtype (round to nearest even).
 * With FERRY_WEIGHTS_AT_COMBINE, weights [num_tokens][experts_per_token] f32 is read by RECV (NULL
 * only with num_tokens 0), and the source computes acc = 0 (or out_tokens[t]), then for k in top-k
 * order over t's routes acc += weights[t][k] * expert_y[row of (t, k)], rounded once to out_dtype
 * (DeepEP's low-latency combine).
 *  A token with no route gets 0 (keeps its value with accumulate). Rows m..num_tokens-1 are not
 *  written. */
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

/* What this rank sent to other ranks in the last step (over the network, and to same-node peers
 * through CUDA IPC with the CUDA backend); records and bytes a rank sends to itself are not
 * counted. overflow_records_sent is the part of dispatch_records_sent sent after the counts. */
typedef struct ferry_a2a_stats {
  uint64_t dispatch_bytes_sent;   /* last dispatch, this rank, to other ranks */
  uint64_t combine_bytes_sent;
  uint64_t dispatch_records_sent;
  uint64_t overflow_records_sent;
} ferry_a2a_stats_t;
ferry_status_t ferry_a2a_stats(ferry_a2a_t a2a, ferry_a2a_stats_t* out);

#ifdef __cplusplus
}
#endif
#endif
