// Entry points of the CUDA backend's kernels and the device-side state they share.
//
// A step is four halves, each a short sequence of kernels on the caller's stream:
//   dispatch_send   route counting, prefix sums over destinations, pack records (plan.h layout)
//   dispatch_recv   wait for the arrival flag, rank received routes per local expert, unpack rows
//   combine_send    per received record, the weighted partial sum over this rank's experts
//   combine_recv    wait for the partials, sum them per token into out_tokens
// Everything a later half needs (token count, slots, rows, epochs) stays in device memory, so a whole
// step can be captured in a CUDA graph and replayed with new inputs in the same buffers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "csrc/plan.h"
#include "ferry/ferry.h"

namespace ferry::cuda {

// The first problem a kernel saw in a step (first writer wins); lives in pinned mapped host memory
// so the host reads it without a copy. a/b/c say where, per code.
enum DeviceErrorCode : int32_t {
  kErrNone = 0,
  kErrInvalidExpert = 1,     // a = token, b = route, c = expert id
  kErrBoundTooLarge = 2,     // a = *bound_m, b = num_tokens
  kErrDispatchTimeout = 3,   // a = epoch waited for, b = flag value seen
  kErrCombineTimeout = 4,    // a = epoch waited for, b = flag value seen
  kErrPeerCount = 5,         // a = sender, b = count it announced
  kErrPeerRecord = 6,        // a = sender, b = record index within its run, c = what (below)
  kErrExpertOverflow = 7,    // a = local expert, b = rows received, c = row capacity
  kErrRepeatedExpert = 8,    // a = token, b = route, c = expert id
  kErrPeerPoisoned = 9,      // a = sender whose own step failed
};
enum PeerRecordProblem : int32_t {
  kRecordRoutes = 1,         // route count out of range
  kRecordExpert = 2,         // local expert out of range or repeated
  kRecordSource = 3,         // names another source rank, a token out of range or out of order
};
struct DeviceError {
  int32_t code;
  int32_t a;
  int32_t b;
  int32_t c;
};

// Device-side state of one all-to-all (POD view of device and mapped host memory; copied by value
// into every kernel). Sizes: R = world_size, L = experts_per_rank, T = max_tokens, K = kMaxTopK,
// N = max_recv_records = R * T.
struct Workspace {
  // -- written by dispatch_send
  int32_t* num_tokens;        // [1] this step's token count (*bound_m, validated)
  uint32_t* dispatch_epoch;   // [1] dispatch steps begun; dispatch_recv waits for this value
  int32_t* dest_count;        // [R] records per destination
  int32_t* dest_offset;       // [R] exclusive prefix sum of dest_count
  int32_t* send_chunk_base;   // [ceil(T/32) * R] per chunk of tokens and destination
  int32_t* token_dest;        // [T * K] ascending destination ranks, -1 past the last
  int32_t* token_slot;        // [T * K] rank within its chunk, then the record index in the
                              // send buffer (= combine slot)
  int32_t* route_dest;        // [T * K] with weights at combine: destination of route k, -1: none
  int32_t* route_row;         // [T * K] with weights at combine: its combine row (ep::SendPlan::route_row)
  // -- written by dispatch_recv
  int32_t* num_recv;          // [1] records received this step
  int32_t* recv_count;        // [R] records from each sender
  int32_t* recv_chunk_base;   // [ceil(N/32) * L]
  int32_t* expert_rows;       // [L] rows received per local expert
  uint64_t* recv_offset;      // [N] byte offset of received record g in the receive buffer
  int32_t* recv_sender;       // [N] the rank that sent record g
  int32_t* recv_expert;       // [N * K] local expert of each route, -1 past the last
  int32_t* recv_row;          // [N * K] rank within its chunk, then the row in out_expert_x
  float* recv_weight;         // [N * K]
  // -- written by combine_send
  uint32_t* combine_epoch;    // [1] combine steps begun; combine_recv waits for this value
  uint32_t* blocks_done;      // [3] last-block-done counters (pack, combine partials, receive ranking)
  int32_t* arrived;           // [1] 1 once the last wait_arrival saw its flag, 0 after a timeout
  // -- pinned mapped host memory (device pointers); the proxy thread reads them
  DeviceError* error;
  volatile uint32_t* send_ready;     // epoch, stored once the dispatch send buffer is complete
  volatile uint32_t* partials_ready; // epoch, stored once the combine partials are complete
  int32_t* host_dest_count;          // [R] copy of dest_count for the proxy
  int32_t* host_recv_count;          // [R] copy of recv_count for the proxy
  // With weights at combine, for the proxy's post_combine and wait_combine: routes of each received
  // record (receive order) and of each of this rank's send slots.
  int32_t* host_record_routes;       // [N]
  int32_t* host_slot_routes;         // [max_send_records]
};

struct DispatchSendParams {
  ep::Layout layout;
  const void* x;              // [num_tokens][hidden] in_dtype, or bf16 with quantize
  const float* x_scale;       // [num_tokens][num_scales], or null without scales and with quantize
  const int32_t* indices;     // [num_tokens][top_k]
  const float* weights;       // [num_tokens][top_k]
  const int32_t* bound_m;     // device token count, or null: num_tokens is exact
  int num_tokens;             // host-side upper bound
  uint8_t* send_buf;          // send_buffer_bytes(), device or mapped host memory
  // Quantize on dispatch (ferry.h): the pack kernel casts each bf16 token to fp8 with its block
  // scales as it loads it (needs a power-of-two scale_block in [8, 256]).
  bool quantize = false;
  bool round_scale = false;
};

struct DispatchRecvParams {
  ep::Layout layout;
  const uint8_t* recv_buf;            // recv_buffer_bytes(), device or mapped host memory
  const volatile uint32_t* arrived;   // raised to the epoch once every sender's data is in; null:
                                      // the data is already there (stream-ordered copies)
  uint64_t timeout_ns;
  int32_t* out_expert_num_tokens;     // [L]
  void* out_expert_x;                 // [L * max_rows_per_expert][hidden] in_dtype
  float* out_expert_x_scale;          // [L * max_rows_per_expert][num_scales] or null
  // Senders reached through CUDA IPC raise their own epoch in sender_arrived[sender]; the receive half
  // waits for those listed in ipc_senders as well as for `arrived` (when set), which covers the rest.
  const volatile uint32_t* sender_arrived = nullptr;  // [R]
  const int32_t* ipc_senders = nullptr;               // [num_ipc_senders] device memory
  int num_ipc_senders = 0;
  // [R] device table: the buffer holding sender s's private region (at recv_private_offset(s)), when IPC
  // senders write into another buffer than the engine's; null: recv_buf for every sender. Only with
  // private_tokens >= max_tokens (no overflow region).
  const uint8_t* const* sender_base = nullptr;
  int scale_layout = ep::kScaleRowMajor;  // of out_expert_x_scale (ferry_scale_layout_t)
  int32_t* out_src_token = nullptr;            // [L * max_rows_per_expert] or null (ferry.h)
  int32_t* out_num_tokens_per_rank = nullptr;  // [L][R] or null
};

struct CombineSendParams {
  ep::Layout layout;
  const void* expert_y;        // layout of out_expert_x, out_dtype elements
  uint8_t* partial_buf;        // combine_send_bytes(): partial of received record g at g * partial_bytes
};

struct CombineRecvParams {
  ep::Layout layout;
  const uint8_t* partial_buf;         // combine_recv_bytes(): partial of send slot s at s * partial_bytes
  const volatile uint32_t* arrived;   // raised to the epoch once every partial is in; null: already there
  uint64_t timeout_ns;
  void* out_tokens;                   // [num_tokens][hidden] out_dtype
  bool accumulate;
  const float* weights = nullptr;     // [num_tokens][top_k] with weights at combine: summed here
  const volatile uint32_t* sender_arrived = nullptr;  // [R] as in DispatchRecvParams
  const int32_t* ipc_senders = nullptr;
  int num_ipc_senders = 0;
  // [R] device table: the buffer holding the partials destination d sent back (at the slots of d's
  // run); null: partial_buf for every destination.
  const uint8_t* const* dest_base = nullptr;
};

// Device memory (bytes) the workspace of a layout needs, and how to carve it. `device` is the
// start of one cudaMalloc of workspace_device_bytes; `host`/`host_dev` one pinned mapped allocation
// of workspace_host_bytes (host and device addresses).
size_t workspace_device_bytes(const ep::Layout& layout);
size_t workspace_host_bytes(const ep::Layout& layout);
Workspace carve_workspace(const ep::Layout& layout, void* device, void* host_dev);

// Dynamic shared memory and launch attributes; call once per device and layout before the first
// launch. Throws Status::unsupported when a layout does not fit the kernels.
void prepare_kernels(const ep::Layout& layout);
void prepare_dispatch_send(const ep::Layout& layout);
void prepare_dispatch_recv(const ep::Layout& layout);

void dispatch_send(const DispatchSendParams& p, const Workspace& ws, int num_sms, cudaStream_t stream);
void dispatch_recv(const DispatchRecvParams& p, const Workspace& ws, int num_sms, cudaStream_t stream);
void combine_send(const CombineSendParams& p, const Workspace& ws, int num_sms, cudaStream_t stream);
void combine_recv(const CombineRecvParams& p, const Workspace& ws, int num_sms, cudaStream_t stream);

// One thread waits for *flag to reach *epoch (or the deadline: error `timeout_code`) and records
// the outcome in ws.arrived; the receive kernels after it on the stream read that instead of each
// block polling host memory.
void wait_arrival(const volatile uint32_t* flag, const uint32_t* epoch, uint64_t timeout_ns,
                  int32_t timeout_code, const Workspace& ws, cudaStream_t stream);
// Like wait_arrival, for the proxy's flag (null: none) and the epochs of the listed IPC senders
// together, under one deadline; a timeout's error names the first sender missing (c), or c = -1
// when the proxy's flag (the engine peers) is what is missing.
void wait_step(const volatile uint32_t* proxy_flag, const volatile uint32_t* sender_flags, const int32_t* senders,
               int num_senders, const uint32_t* epoch, uint64_t timeout_ns, int32_t timeout_code, const Workspace& ws,
               cudaStream_t stream);

// Same-node peers through CUDA IPC (device pointers, the IPC peers' regions mapped into this process;
// this rank's own entries are its own regions; entries of ranks reached through the engine are null).
// flags[r] is rank r's flag array: [R] dispatch epochs by sender, then [R] combine epochs by sender.
struct IpcPeers {
  uint8_t* const* recv;      // [R] receive regions (recv_buffer_bytes)
  uint8_t* const* combine;   // [R] combine regions (combine_recv_bytes)
  uint32_t* const* flags;    // [R] flag arrays
  uint32_t* blocks_done;     // [2] this rank's last-block counters of the two push kernels
  const int32_t* ranks;      // [num_ranks] the IPC peers, this rank included, ascending
  int num_ranks;
};
// After dispatch_send: every IPC peer's section into its receive region at this rank's private
// offset (the layout must have private_tokens >= max_tokens), then this rank's dispatch slot raised
// to the step's epoch in every IPC peer's flags.
void ipc_dispatch_push(const ep::Layout& layout, const uint8_t* send_buf, const IpcPeers& peers, const Workspace& ws,
                       int num_sms, cudaStream_t stream);
// After combine_send: every partial of a record from an IPC peer into that sender's combine region at
// the sender's send slot, then this rank's combine slot raised in every IPC peer's flags. recv_buf is
// the buffer the IPC senders' records arrived in (their count headers give the slots).
void ipc_combine_push(const ep::Layout& layout, const uint8_t* partial_buf, const uint8_t* recv_buf,
                      const IpcPeers& peers, const Workspace& ws, int num_sms, cudaStream_t stream);

// Human-readable text for a device error, naming this rank.
const char* device_error_name(int32_t code);

}  // namespace ferry::cuda
