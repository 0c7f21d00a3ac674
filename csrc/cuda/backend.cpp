// The CUDA backend: kernels on the caller's stream for pack/unpack/partial sums, a proxy thread per
// GPU driving the Protocol over the transfer engine, and the buffers the engine moves: pinned host
// memory mapped into the GPU (host-staged: any provider, e.g. tcp or shm) or device memory
// registered with FI_HMEM/dmabuf (GPUDirect RDMA on efa and verbs).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "csrc/argcheck.h"
#include "csrc/backend.h"
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/configs.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/locality.h"
#include "csrc/cuda/memory.h"
#include "csrc/cuda/proxy.h"
#include "csrc/errors.h"
#include "csrc/protocol.h"
#include "transfer_engine/engine.h"

namespace ferry::ep {
namespace {

using cuda::DeviceBuffer;
using cuda::IpcMapping;
using cuda::MappedHostBuffer;

// FERRY_CUDA_IPC=0|1: same-node peers through CUDA IPC where possible (default) or never.
bool ipc_wanted() {
  const char* env = std::getenv("FERRY_CUDA_IPC");
  if (!env || !*env) return true;
  const std::string v = env;
  if (v == "1") return true;
  if (v == "0") return false;
  raise(Status::invalid_argument, "FERRY_CUDA_IPC=" + v + ": expected 0 or 1");
}

// Row `me` of the reach matrix: which ranks' GPU memory this rank's GPU can map. Only ranks on this
// node that want IPC are looked at: the same GPU, or one this process sees and reaches peer to peer
// (NVLink or PCIe P2P). A GPU hidden from this process (CUDA_VISIBLE_DEVICES) counts as unreachable.
// Failed lookups leave no error behind for the next launch check to find.
std::vector<uint8_t> reach_row(const std::vector<cuda::NodeIdentity>& nodes, const cuda::NodeIdentity& me, int device) {
  std::vector<uint8_t> row(nodes.size(), 0);
  if (!me.wants_ipc) return row;
  for (size_t r = 0; r < nodes.size(); ++r) {
    const cuda::NodeIdentity& peer = nodes[r];
    if (!peer.wants_ipc || !cuda::same_node(peer, me)) continue;
    if (std::strncmp(peer.pci_bus_id, me.pci_bus_id, sizeof me.pci_bus_id) == 0) {
      row[r] = 1;
      continue;
    }
    int peer_device = -1, can = 0;
    if (cudaDeviceGetByPCIBusId(&peer_device, peer.pci_bus_id) != cudaSuccess ||
        cudaDeviceCanAccessPeer(&can, device, peer_device) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    row[r] = can ? 1 : 0;
  }
  return row;
}

struct IpcHandles {
  cudaIpcMemHandle_t recv;
  cudaIpcMemHandle_t combine;
  cudaIpcMemHandle_t flags;
};

// Makes `device` current for the scope and restores the caller's device after it.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    cuda::check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) cuda::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// Where the transport buffers live. FERRY_CUDA_BUFFERS=host|device overrides the choice by provider:
// device memory only where the provider can register it (FI_HMEM), pinned host memory elsewhere.
te::MemoryKind choose_placement(const std::string& provider) {
  if (const char* env = std::getenv("FERRY_CUDA_BUFFERS")) {
    const std::string v = env;
    if (v == "host") return te::MemoryKind::host;
    if (v == "device") return te::MemoryKind::cuda;
    raise(Status::invalid_argument, "FERRY_CUDA_BUFFERS=" + v + ": expected host or device");
  }
  const bool hmem = provider.rfind("efa", 0) == 0 || provider.rfind("verbs", 0) == 0;
  return hmem ? te::MemoryKind::cuda : te::MemoryKind::host;
}

// One transport buffer in either placement; `ptr` is valid on host (host placement) and device.
struct TransportBuffer {
  MappedHostBuffer host;
  DeviceBuffer device;
  void* ptr = nullptr;
  TransportBuffer(te::MemoryKind kind, uint64_t bytes) {
    const uint64_t rounded = align_up(bytes ? bytes : 1, 4096);
    if (kind == te::MemoryKind::host) {
      host = MappedHostBuffer(rounded);
      std::memset(host.host(), 0, rounded);
      ptr = host.host();  // unified addressing: the same address on the device
    } else {
      device = DeviceBuffer(rounded);
      cuda::check_cuda(cudaMemset(device.get(), 0, rounded), "cudaMemset transport buffer");
      ptr = device.get();
    }
  }
};

class CudaBackend final : public Backend {
 public:
  // `config` comes checked (check_config: dp_size 1, 16-byte rows in and out) and resolved by the C API.
  CudaBackend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap)
      : config_(config), layout_(make_layout(config)), timeout_ms_(config.timeout_ms) {
    device_ = config.cuda_device;
    if (device_ < 0) cuda::check_cuda(cudaGetDevice(&device_), "cudaGetDevice");
    DeviceScope scope(device_);
    cuda::check_cuda(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_), "SM count");
    cuda::prepare_kernels(layout_);

    te::EngineConfig ec;
    if (config.provider && *config.provider) ec.provider = config.provider;
    if (const char* p = std::getenv("FERRY_PROVIDER")) ec.provider = p;
    ec.nets_per_rank = config.nets_per_rank;
    ec.timeout_ms = timeout_ms_;
    ec.cuda_device = device_;

    // Which peers go through CUDA IPC and which through the engine: every rank reports its node, GPU
    // and wish, then which of its node's GPUs it can map; every rank derives the same answer.
    const int R = layout_.world_size, me = layout_.rank;
    std::string bus_id;
    {
      char bus[32] = {};
      if (cudaDeviceGetPCIBusId(bus, sizeof bus - 1, device_) == cudaSuccess) bus_id = bus;
      else cudaGetLastError();
    }
    const cuda::NodeIdentity identity = cuda::make_node_identity(ipc_wanted(), bus_id);
    std::vector<cuda::NodeIdentity> nodes(R);
    bootstrap.allgather(&identity, sizeof identity, nodes.data(), setup_timeout_ms());
    const std::vector<uint8_t> row = reach_row(nodes, identity, device_);
    std::vector<uint8_t> reach(size_t(R) * R);
    bootstrap.allgather(row.data(), row.size(), reach.data(), setup_timeout_ms());
    paths_ = cuda::decide_peer_paths(nodes, reach);
    ipc_ranks_ = paths_.ipc_peers_of(me);

    if (paths_.any_ipc) {
      // Records of every sender fit its private region, so no overflow and no count matrix is needed
      // before the bytes move; every rank derives the same layout.
      layout_.private_tokens = layout_.max_tokens;
    }
    // Without engine peers the buffers are device memory (IPC needs it); with them, what the provider
    // can register. IPC peers then write into device regions of their own when the engine's are host
    // memory (host-staged), and into the engine's regions when those are device memory (FI_HMEM).
    placement_ = paths_.any_engine ? choose_placement(ec.provider) : te::MemoryKind::cuda;
    send_ = std::make_unique<TransportBuffer>(placement_, layout_.send_buffer_bytes());
    recv_ = std::make_unique<TransportBuffer>(placement_, layout_.recv_buffer_bytes());
    combine_send_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_send_bytes());
    combine_recv_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_recv_bytes());
    if (paths_.any_ipc && placement_ != te::MemoryKind::cuda) {
      ipc_recv_ = std::make_unique<TransportBuffer>(te::MemoryKind::cuda, layout_.recv_buffer_bytes());
      ipc_combine_ = std::make_unique<TransportBuffer>(te::MemoryKind::cuda, layout_.combine_recv_bytes());
    }

    ws_dev_ = DeviceBuffer(cuda::workspace_device_bytes(layout_));
    cuda::check_cuda(cudaMemset(ws_dev_.get(), 0, ws_dev_.bytes()), "cudaMemset workspace");
    ws_host_ = MappedHostBuffer(cuda::workspace_host_bytes(layout_));
    std::memset(ws_host_.host(), 0, ws_host_.bytes());
    // Without engine peers the senders' kernels raise per-sender flags and no proxy writes these: no BAR page.
    try {
      const cuda::GdrcopyMode gdrcopy = cuda::gdrcopy_mode();
      flags_ = cuda::ArrivalFlagMemory(paths_.any_engine ? gdrcopy : cuda::GdrcopyMode::off);
    } catch (const Error& e) {
      fail(e.status(), std::string("arrival flags: ") + e.what());
    }
    ws_ = cuda::carve_workspace(layout_, ws_dev_.get(), ws_host_.dev());
    // The proxy thread and the Protocol use the device addresses of mapped host memory on the host.
    if (ws_host_.dev() != ws_host_.host())
      fail(Status::unsupported, "the CUDA backend needs unified addressing (mapped host memory at the same address "
                                "on host and device)");

    if (paths_.any_ipc) open_ipc_peers(bootstrap);
    if (me == 0) {
      if (!paths_.any_engine)
        std::fprintf(stderr, "ferry: cuda all-to-all of %d ranks on one node: peers through CUDA IPC\n", R);
      else if (paths_.any_ipc)
        std::fprintf(stderr, "ferry: cuda all-to-all of %d ranks: same-node peers through CUDA IPC (%zu on rank 0's "
                             "node), the others through the transfer engine\n", R, ipc_ranks_.size());
    }
    if (!paths_.any_engine) return;

    engine_ = std::make_unique<te::TransferEngine>(ec, bootstrap);
    ProtocolBuffers buffers;
    buffers.send = send_->ptr;
    buffers.recv = recv_->ptr;
    buffers.combine_send = combine_send_->ptr;
    buffers.combine_recv = combine_recv_->ptr;
    buffers.kind = placement_;
    buffers.cuda_device = device_;
    if (placement_ == te::MemoryKind::cuda)
      buffers.copy = [](void* dst, const void* src, size_t bytes) {
        cuda::check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "protocol copy");
      };
    // The kernels move what goes to IPC peers (this rank included); the Protocol the rest.
    if (paths_.any_ipc) {
      buffers.direct.assign(R, 0);
      for (int32_t r : ipc_ranks_) buffers.direct[r] = 1;
    }
    protocol_ = std::make_unique<Protocol>(layout_, *engine_, buffers, timeout_ms_);
    proxy_ = std::make_unique<cuda::Proxy>(*protocol_, ws_, flags_.writer(), device_);
    if (layout_.rank == 0)
      std::fprintf(stderr, "ferry: cuda all-to-all of %d ranks: arrival flags in %s\n", R,
                   flags_.description().c_str());
  }

  ~CudaBackend() override {
    // Kernels of a step in flight read the flags and buffers below.
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    proxy_.reset();
    mappings_.clear();
  }

  void dispatch(const ferry_dispatch_args_t& a, void* stream_ptr) override {
    DeviceScope scope(device_);
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    if (a.flags & FERRY_SEND) {
      cuda::DispatchSendParams p{layout_, a.dp_x, a.dp_x_scale, a.indices, a.weights, a.bound_m, a.num_tokens,
                                 static_cast<uint8_t*>(send_->ptr)};
      p.quantize = enum_value(a.quantize) == FERRY_QUANTIZE_FP8_BLOCK;
      p.round_scale = a.round_scale != 0;
      cuda::dispatch_send(p, ws_, num_sms_, stream);
      if (paths_.any_ipc)
        cuda::ipc_dispatch_push(layout_, static_cast<const uint8_t*>(send_->ptr), peers_, ws_, num_sms_, stream);
    }
    if (a.flags & FERRY_RECV) {
      cuda::DispatchRecvParams p{layout_, static_cast<const uint8_t*>(recv_->ptr),
                                 proxy_ ? &flags_.device()->dispatch_arrived : nullptr,
                                 wait_timeout_ns(), a.out_expert_num_tokens, a.out_expert_x,
                                 layout_.num_scales > 0 ? a.out_expert_x_scale : nullptr};
      p.scale_layout = enum_value(a.out_scale_layout);
      p.out_src_token = a.out_expert_src_token;
      p.out_num_tokens_per_rank = a.out_expert_num_tokens_per_rank;
      if (paths_.any_ipc) {
        p.sender_arrived = ipc_flags_.get<uint32_t>();
        p.ipc_senders = peers_.ranks;
        p.num_ipc_senders = peers_.num_ranks;
        p.sender_base = sender_base_;
      }
      cuda::dispatch_recv(p, ws_, num_sms_, stream);
      finish(stream, "dispatch RECV");
    }
  }

  void combine(const ferry_combine_args_t& a, void* stream_ptr) override {
    DeviceScope scope(device_);
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    if (a.flags & FERRY_SEND) {
      cuda::CombineSendParams p{layout_, a.expert_y, static_cast<uint8_t*>(combine_send_->ptr)};
      cuda::combine_send(p, ws_, num_sms_, stream);
      if (paths_.any_ipc)
        cuda::ipc_combine_push(layout_, static_cast<const uint8_t*>(combine_send_->ptr), ipc_recv_region(), peers_,
                               ws_, num_sms_, stream);
    }
    if (a.flags & FERRY_RECV) {
      cuda::CombineRecvParams p{layout_, static_cast<const uint8_t*>(combine_recv_->ptr),
                                proxy_ ? &flags_.device()->combine_arrived : nullptr,
                                wait_timeout_ns(), a.out_tokens, a.accumulate != 0};
      if (layout_.weights_at_combine) p.weights = a.weights;
      if (paths_.any_ipc) {
        p.sender_arrived = ipc_flags_.get<uint32_t>() + layout_.world_size;
        p.ipc_senders = peers_.ranks;
        p.num_ipc_senders = peers_.num_ranks;
        p.dest_base = dest_base_;
      }
      cuda::combine_recv(p, ws_, num_sms_, stream);
      finish(stream, "combine RECV");
    }
  }

  // The layout in use: with CUDA IPC peers the private region holds max_tokens whatever was asked.
  ferry_buffer_sizes_t buffer_sizes() const override {
    ferry_a2a_config_t used = config_;
    used.private_tokens = layout_.private_tokens;
    return buffer_sizes_for(used);
  }

  ferry_a2a_stats_t stats() const override {
    ferry_a2a_stats_t out = ipc_stats();
    if (proxy_) {
      const ProtocolStats s = proxy_->stats();
      out.dispatch_bytes_sent += s.dispatch_bytes_sent;
      out.combine_bytes_sent += s.combine_bytes_sent;
      out.dispatch_records_sent += s.dispatch_records_sent;
      out.overflow_records_sent += s.overflow_records_sent;
    }
    return out;
  }

 private:
  [[noreturn]] void fail(Status status, const std::string& what) const {
    ep::fail(status, {layout_.rank, -1, "cuda backend"}, what);
  }

  // Construction meets every peer while each one is still creating its CUDA context and loading
  // kernels (seconds under a sanitizer): a short step deadline must not fail it.
  int setup_timeout_ms() const { return std::max(timeout_ms_, FERRY_DEFAULT_BOOTSTRAP_TIMEOUT_MS); }

  // The receive kernels give up a little after the Protocol's own deadline, so the proxy's error,
  // which names the missing peers, is the one the caller sees.
  uint64_t wait_timeout_ns() const { return (uint64_t(timeout_ms_) * 2 + 1000) * 1000000ull; }

  // Eager calls wait for the step's kernels and report what went wrong; under graph capture nothing
  // may block, so errors of captured steps surface at the next eager receive call.
  void finish(cudaStream_t stream, const char* operation) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cuda::check_cuda(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
    if (capture != cudaStreamCaptureStatusNone) return;
    cuda::check_cuda(cudaStreamSynchronize(stream), operation);
    check_errors(operation);
  }

  void check_errors(const char* operation) {
    cuda::DeviceError* e = ws_host_.host<cuda::DeviceError>();
    const cuda::DeviceError err = *e;
    if (err.code != cuda::kErrNone) {
      std::memset(e, 0, sizeof *e);
      std::string where;
      Status status = Status::peer_failed;
      switch (err.code) {
        case cuda::kErrInvalidExpert:
          status = Status::invalid_argument;
          where = "token " + std::to_string(err.a) + " route " + std::to_string(err.b) + " names expert " +
                  std::to_string(err.c) + ", outside [0, " + std::to_string(layout_.num_experts) + ") and not -1";
          break;
        case cuda::kErrRepeatedExpert:
          status = Status::invalid_argument;
          where = "token " + std::to_string(err.a) + " route " + std::to_string(err.b) + " repeats expert " +
                  std::to_string(err.c);
          break;
        case cuda::kErrBoundTooLarge:
          status = Status::invalid_argument;
          where = "bound_m " + std::to_string(err.a) + " outside [0, num_tokens=" + std::to_string(err.b) + "]";
          break;
        case cuda::kErrDispatchTimeout:
        case cuda::kErrCombineTimeout:
          status = Status::timeout;
          where = "step " + std::to_string(err.a) + " still not flagged (flag at " + std::to_string(err.b) + ")";
          if (err.c >= 0) where += " by rank " + std::to_string(err.c) + " (CUDA IPC peer)";
          else if (paths_.any_ipc) where += " by the peers reached through the transfer engine";
          break;
        case cuda::kErrPeerCount:
          where = "rank " + std::to_string(err.a) + " announced " + std::to_string(err.b) + " records";
          break;
        case cuda::kErrPeerRecord:
          where = "record " + std::to_string(err.b) + " from rank " + std::to_string(err.a) + " (problem " +
                  std::to_string(err.c) + ")";
          break;
        case cuda::kErrExpertOverflow:
          status = Status::internal;
          where = "local expert " + std::to_string(err.a) + " got " + std::to_string(err.b) + " rows, capacity " +
                  std::to_string(err.c);
          break;
        case cuda::kErrPeerPoisoned:
          where = "rank " + std::to_string(err.a);
          break;
      }
      Status proxy_status = Status::ok;
      const std::string proxy = proxy_ ? proxy_->error(&proxy_status) : std::string();
      ep::fail(status, {layout_.rank, -1, operation},
               std::string(cuda::device_error_name(err.code)) + ": " + where +
                   (proxy.empty() ? "" : " (transport: " + proxy + ")"));
    }
    if (!proxy_) return;
    Status proxy_status = Status::ok;
    const std::string proxy = proxy_->error(&proxy_status);
    if (!proxy.empty()) raise(proxy_status, proxy);
  }

  // Where IPC peers write this rank's records and partials: the engine's regions when those are
  // device memory, else device regions of their own.
  uint8_t* ipc_recv_region() const { return static_cast<uint8_t*>(ipc_recv_ ? ipc_recv_->ptr : recv_->ptr); }
  uint8_t* ipc_combine_region() const {
    return static_cast<uint8_t*>(ipc_combine_ ? ipc_combine_->ptr : combine_recv_->ptr);
  }

  // Exchanges the IPC handles of this rank's IPC receive and combine regions and flag array (every
  // rank, collectively), maps those of its IPC peers, and gives the kernels their pointer tables.
  void open_ipc_peers(te::Bootstrap& bootstrap) {
    const int R = layout_.world_size, me = layout_.rank;
    ipc_flags_ = DeviceBuffer(align_up(sizeof(uint32_t) * 2 * R + 2 * sizeof(uint32_t), 256));
    cuda::check_cuda(cudaMemset(ipc_flags_.get(), 0, ipc_flags_.bytes()), "cudaMemset ipc flags");
    IpcHandles mine{};
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.recv, ipc_recv_region()), "cudaIpcGetMemHandle(receive region)");
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.combine, ipc_combine_region()), "cudaIpcGetMemHandle(combine region)");
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.flags, ipc_flags_.get()), "cudaIpcGetMemHandle(flags)");
    std::vector<IpcHandles> all(R);
    bootstrap.allgather(&mine, sizeof mine, all.data(), setup_timeout_ms());
    // Pointer tables, one upload: [R] receive regions, [R] combine regions, [R] flag arrays (null for
    // peers reached through the engine), then, when IPC peers write elsewhere than the engine, [R]
    // sender bases and [R] destination bases for the receive kernels.
    const bool split = ipc_recv_ != nullptr;
    std::vector<void*> table((split ? 5 : 3) * size_t(R), nullptr);
    mappings_.reserve(3 * ipc_ranks_.size());
    for (int32_t r : ipc_ranks_) {
      if (r == me) {
        table[r] = ipc_recv_region();
        table[R + r] = ipc_combine_region();
        table[2 * R + r] = ipc_flags_.get();
        continue;
      }
      const cudaIpcMemHandle_t* h[3] = {&all[r].recv, &all[r].combine, &all[r].flags};
      for (int k = 0; k < 3; ++k) {
        try {
          mappings_.emplace_back(*h[k]);
        } catch (const Error& e) {
          fail(e.status(), "opening the CUDA IPC handles of rank " + std::to_string(r) + ": " + e.what());
        }
        table[k * R + r] = mappings_.back().get();
      }
    }
    if (split) {
      for (int r = 0; r < R; ++r) {
        const bool ipc = table[r] != nullptr;
        table[3 * R + r] = ipc ? ipc_recv_region() : recv_->ptr;
        table[4 * R + r] = ipc ? ipc_combine_region() : combine_recv_->ptr;
      }
    }
    peer_table_ = DeviceBuffer(table.size() * sizeof(void*) + ipc_ranks_.size() * sizeof(int32_t));
    cuda::check_cuda(cudaMemcpy(peer_table_.get(), table.data(), table.size() * sizeof(void*), cudaMemcpyHostToDevice),
                     "upload ipc peer table");
    uint8_t** t = peer_table_.get<uint8_t*>();
    auto* ranks = reinterpret_cast<int32_t*>(t + table.size());
    cuda::check_cuda(cudaMemcpy(ranks, ipc_ranks_.data(), ipc_ranks_.size() * sizeof(int32_t), cudaMemcpyHostToDevice),
                     "upload ipc peer ranks");
    peers_.recv = t;
    peers_.combine = t + R;
    peers_.flags = reinterpret_cast<uint32_t* const*>(t + 2 * R);
    peers_.blocks_done = ipc_flags_.get<uint32_t>() + 2 * R;
    peers_.ranks = ranks;
    peers_.num_ranks = int(ipc_ranks_.size());
    if (split) {
      sender_base_ = t + 3 * R;
      dest_base_ = t + 4 * R;
    }
  }

  // What the last step moved to the other IPC peers (the counts the kernels mirror to mapped host
  // memory); no byte crosses a network.
  ferry_a2a_stats_t ipc_stats() const {
    ferry_a2a_stats_t s{};
    for (int32_t r : ipc_ranks_) {
      if (r == layout_.rank) continue;
      const int32_t sent = __atomic_load_n(&ws_.host_dest_count[r], __ATOMIC_ACQUIRE);
      const int32_t received = __atomic_load_n(&ws_.host_recv_count[r], __ATOMIC_ACQUIRE);
      s.dispatch_records_sent += uint64_t(sent > 0 ? sent : 0);
      s.dispatch_bytes_sent += layout_.count_header_bytes + uint64_t(sent > 0 ? sent : 0) * layout_.record_bytes;
      s.combine_bytes_sent += uint64_t(received > 0 ? received : 0) * layout_.partial_bytes;
    }
    return s;
  }

  ferry_a2a_config_t config_;
  Layout layout_;
  int timeout_ms_;
  int device_ = 0;
  int num_sms_ = 0;
  te::MemoryKind placement_ = te::MemoryKind::host;
  cuda::PeerPaths paths_;               // who reaches whom through CUDA IPC; the rest through the engine
  std::vector<int32_t> ipc_ranks_;      // this rank's IPC peers, itself included (empty without IPC)
  std::unique_ptr<TransportBuffer> send_, recv_, combine_send_, combine_recv_;
  std::unique_ptr<TransportBuffer> ipc_recv_, ipc_combine_;  // IPC peers' regions when the engine's are host memory
  DeviceBuffer ipc_flags_;              // [R] dispatch epochs by sender, [R] combine, [2] counters
  std::vector<IpcMapping> mappings_;    // peers' regions and flags, closed before our buffers go
  DeviceBuffer peer_table_;
  cuda::IpcPeers peers_{};
  uint8_t* const* sender_base_ = nullptr;  // in peer_table_, only when IPC peers write elsewhere
  uint8_t* const* dest_base_ = nullptr;
  DeviceBuffer ws_dev_;
  MappedHostBuffer ws_host_;
  cuda::ArrivalFlagMemory flags_;
  cuda::Workspace ws_{};
  std::unique_ptr<te::TransferEngine> engine_;
  std::unique_ptr<Protocol> protocol_;  // after engine_: deregisters before the engine goes
  std::unique_ptr<cuda::Proxy> proxy_;  // after protocol_: stops before the protocol goes
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap) {
  return std::make_unique<CudaBackend>(config, bootstrap);
}

}  // namespace ferry::ep
