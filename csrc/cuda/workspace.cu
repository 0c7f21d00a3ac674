// Carving of the device-side state (api.cuh Workspace) out of one device and one mapped host allocation.
#include <string>

#include "csrc/cuda/api.cuh"
#include "csrc/cuda/configs.cuh"

namespace ferry::cuda {
namespace {

// Walks the arrays in a fixed order; with null bases it only measures.
struct Carver {
  uint8_t* base;
  size_t used = 0;
  template <typename T>
  T* take(size_t count) {
    used = (used + 255) / 256 * 256;
    T* p = base ? reinterpret_cast<T*>(base + used) : nullptr;
    used += count * sizeof(T);
    return p;
  }
};

Workspace carve(const ep::Layout& L, void* device, void* host, size_t* device_bytes, size_t* host_bytes) {
  const size_t R = L.world_size, EPR = L.experts_per_rank, T = L.max_tokens, K = ep::kMaxTopK;
  const size_t N = L.max_recv_records();
  const size_t send_chunks = (T + kChunk - 1) / kChunk, recv_chunks = (N + kChunk - 1) / kChunk;
  Workspace ws{};
  Carver d{static_cast<uint8_t*>(device)};
  ws.num_tokens = d.take<int32_t>(1);
  ws.dispatch_epoch = d.take<uint32_t>(1);
  ws.dest_count = d.take<int32_t>(R);
  ws.dest_offset = d.take<int32_t>(R);
  ws.send_chunk_base = d.take<int32_t>(send_chunks * R);
  ws.token_dest = d.take<int32_t>(T * K);
  ws.token_slot = d.take<int32_t>(T * K);
  ws.route_dest = d.take<int32_t>(T * K);
  ws.route_row = d.take<int32_t>(T * K);
  ws.num_recv = d.take<int32_t>(1);
  ws.recv_count = d.take<int32_t>(R);
  ws.recv_chunk_base = d.take<int32_t>(recv_chunks * EPR);
  ws.expert_rows = d.take<int32_t>(EPR);
  ws.recv_offset = d.take<uint64_t>(N);
  ws.recv_sender = d.take<int32_t>(N);
  ws.recv_expert = d.take<int32_t>(N * K);
  ws.recv_row = d.take<int32_t>(N * K);
  ws.recv_weight = d.take<float>(N * K);
  ws.combine_epoch = d.take<uint32_t>(1);
  ws.blocks_done = d.take<uint32_t>(3);
  ws.arrived = d.take<int32_t>(1);
  Carver h{static_cast<uint8_t*>(host)};
  ws.error = h.take<DeviceError>(1);
  ws.send_ready = h.take<uint32_t>(1);
  ws.partials_ready = h.take<uint32_t>(1);
  ws.host_dest_count = h.take<int32_t>(R);
  ws.host_recv_count = h.take<int32_t>(R);
  ws.host_record_routes = h.take<int32_t>(N);
  ws.host_slot_routes = h.take<int32_t>(size_t(L.max_send_records()));
  if (device_bytes) *device_bytes = d.used;
  if (host_bytes) *host_bytes = h.used;
  return ws;
}

}  // namespace

size_t workspace_device_bytes(const ep::Layout& layout) {
  size_t bytes = 0;
  carve(layout, nullptr, nullptr, &bytes, nullptr);
  return bytes;
}

size_t workspace_host_bytes(const ep::Layout& layout) {
  size_t bytes = 0;
  carve(layout, nullptr, nullptr, nullptr, &bytes);
  return bytes;
}

Workspace carve_workspace(const ep::Layout& layout, void* device, void* host_dev) {
  return carve(layout, device, host_dev, nullptr, nullptr);
}

void prepare_kernels(const ep::Layout& layout) {
  prepare_dispatch_send(layout);
  prepare_dispatch_recv(layout);
}

const char* device_error_name(int32_t code) {
  switch (code) {
    case kErrNone: return "no error";
    case kErrInvalidExpert: return "expert id outside [0, num_experts) and not -1";
    case kErrBoundTooLarge: return "bound_m outside [0, num_tokens]";
    case kErrDispatchTimeout: return "dispatch data did not arrive before the deadline";
    case kErrCombineTimeout: return "combine partials did not arrive before the deadline";
    case kErrPeerCount: return "a peer announced more records than max_tokens";
    case kErrPeerRecord: return "a peer's record header is invalid";
    case kErrExpertOverflow: return "rows for a local expert exceed its capacity";
    case kErrRepeatedExpert: return "a token names the same expert twice";
    case kErrPeerPoisoned: return "a peer's own step failed (poisoned count header)";
    default: return "unknown device error";
  }
}

}  // namespace ferry::cuda
