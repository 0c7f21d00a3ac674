// The CUDA backend: kernels on the caller's stream for pack/unpack/partial sums, a proxy thread per
// GPU driving the Protocol over the transfer engine, and the buffers the engine moves: pinned host
// memory mapped into the GPU (host-staged: any provider, e.g. tcp or shm) or device memory
// registered with FI_HMEM/dmabuf (GPUDirect RDMA on efa and verbs).
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "csrc/backend.h"
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/configs.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/memory.h"
#include "csrc/cuda/proxy.h"
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

// What every rank tells the others to decide whether all of them share one node: host name and
// boot id (two containers with one host name are still two kernels), its GPU, and whether it wants IPC.
struct NodeIdentity {
  char host[64];
  char boot_id[48];
  char pci_bus_id[32];
  int32_t wants_ipc;
  int32_t pad;
};
NodeIdentity this_node(bool wants_ipc, int device) {
  NodeIdentity id{};
  gethostname(id.host, sizeof id.host - 1);
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string line;
  if (boot && std::getline(boot, line)) std::strncpy(id.boot_id, line.c_str(), sizeof id.boot_id - 1);
  // A GPU that cannot say where it sits cannot be matched with its peers: the engine path then.
  if (cudaDeviceGetPCIBusId(id.pci_bus_id, sizeof id.pci_bus_id - 1, device) != cudaSuccess) {
    cudaGetLastError();
    wants_ipc = false;
  }
  id.wants_ipc = wants_ipc ? 1 : 0;
  return id;
}
bool same_node(const NodeIdentity& a, const NodeIdentity& b) {
  return std::strncmp(a.host, b.host, sizeof a.host) == 0 && std::strncmp(a.boot_id, b.boot_id, sizeof a.boot_id) == 0;
}
// Whether this rank's GPU can map every peer's memory: the same GPU, or one this process sees and
// reaches peer to peer (NVLink or PCIe P2P). A GPU hidden from this process (CUDA_VISIBLE_DEVICES)
// counts as unreachable. Failed lookups leave no error behind for the next launch check to find.
bool reaches_every_peer(const std::vector<NodeIdentity>& nodes, const NodeIdentity& me, int device) {
  for (const NodeIdentity& peer : nodes) {
    if (std::strncmp(peer.pci_bus_id, me.pci_bus_id, sizeof me.pci_bus_id) == 0) continue;
    int peer_device = -1, can = 0;
    if (cudaDeviceGetByPCIBusId(&peer_device, peer.pci_bus_id) != cudaSuccess ||
        cudaDeviceCanAccessPeer(&can, device, peer_device) != cudaSuccess || !can) {
      cudaGetLastError();
      return false;
    }
  }
  return true;
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
  CudaBackend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap)
      : config_(config), layout_(make_layout(config)), timeout_ms_(config.timeout_ms > 0 ? config.timeout_ms : 30000) {
    if (bootstrap.rank() != config.rank || bootstrap.world_size() != config.world_size)
      raise(Status::invalid_argument, "ferry_a2a_config says rank " + std::to_string(config.rank) + " of " +
                                          std::to_string(config.world_size) + " but the bootstrap is rank " +
                                          std::to_string(bootstrap.rank()) + " of " +
                                          std::to_string(bootstrap.world_size()));
    if (layout_.dp_size != 1)
      raise(Status::unsupported, rank_text() + "the CUDA backend supports dp_size 1 (got " +
                                     std::to_string(layout_.dp_size) + ")");
    if (layout_.payload_bytes % 16 != 0 || layout_.out_row_bytes() % 16 != 0)
      raise(Status::unsupported, rank_text() + "the CUDA kernels move 16-byte vectors: hidden_dim " +
                                     std::to_string(layout_.hidden) + " times the element size must be a multiple of 16");
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

    // Every rank on this node, every rank wanting it, and every GPU reaching every other: the whole
    // exchange through CUDA IPC, no engine and no NIC registration. The decision is collective: the
    // first test has the same inputs on every rank, the second is agreed through the bootstrap.
    const int R = layout_.world_size;
    std::vector<NodeIdentity> nodes(R);
    const NodeIdentity me = this_node(ipc_wanted(), device_);
    bootstrap.allgather(&me, sizeof me, nodes.data(), setup_timeout_ms());
    ipc_ = true;
    for (int r = 0; r < R; ++r) ipc_ = ipc_ && nodes[r].wants_ipc && same_node(nodes[r], nodes[0]);
    if (ipc_) {
      const int32_t reaches = reaches_every_peer(nodes, me, device_) ? 1 : 0;
      std::vector<int32_t> all_reach(R);
      bootstrap.allgather(&reaches, sizeof reaches, all_reach.data(), setup_timeout_ms());
      for (int r = 0; r < R; ++r) ipc_ = ipc_ && all_reach[r];
      if (!ipc_ && layout_.rank == 0)
        std::fprintf(stderr, "ferry: cuda all-to-all of %d ranks on one node: some GPUs cannot map each other's "
                             "memory, peers through the transfer engine\n", R);
    }
    if (ipc_) {
      // Records of every sender fit its private region, so no overflow and no count matrix is needed
      // before the bytes move; every rank derives the same layout.
      layout_.private_tokens = layout_.max_tokens;
      placement_ = te::MemoryKind::cuda;
    } else {
      placement_ = choose_placement(ec.provider);
    }
    send_ = std::make_unique<TransportBuffer>(placement_, layout_.send_buffer_bytes());
    recv_ = std::make_unique<TransportBuffer>(placement_, layout_.recv_buffer_bytes());
    combine_send_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_send_bytes());
    combine_recv_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_recv_bytes());

    ws_dev_ = DeviceBuffer(cuda::workspace_device_bytes(layout_));
    cuda::check_cuda(cudaMemset(ws_dev_.get(), 0, ws_dev_.bytes()), "cudaMemset workspace");
    ws_host_ = MappedHostBuffer(cuda::workspace_host_bytes(layout_));
    std::memset(ws_host_.host(), 0, ws_host_.bytes());
    // Under CUDA IPC the senders' kernels raise per-sender flags and no proxy writes these: no BAR page.
    try {
      const cuda::GdrcopyMode gdrcopy = cuda::gdrcopy_mode();
      flags_ = cuda::ArrivalFlagMemory(ipc_ ? cuda::GdrcopyMode::off : gdrcopy);
    } catch (const Error& e) {
      fail(e.status(), std::string("arrival flags: ") + e.what());
    }
    ws_ = cuda::carve_workspace(layout_, ws_dev_.get(), ws_host_.dev());
    // The proxy thread and the Protocol use the device addresses of mapped host memory on the host.
    if (ws_host_.dev() != ws_host_.host())
      raise(Status::unsupported, rank_text() + "the CUDA backend needs unified addressing (mapped host memory "
                                               "at the same address on host and device)");

    if (ipc_) {
      open_ipc_peers(bootstrap);
      if (layout_.rank == 0)
        std::fprintf(stderr, "ferry: cuda all-to-all of %d ranks on one node: peers through CUDA IPC\n", R);
      return;
    }
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
    if (!(a.flags & (FERRY_SEND | FERRY_RECV)))
      fail(Status::invalid_argument, "dispatch flags " + std::to_string(a.flags) + " name neither FERRY_SEND nor FERRY_RECV");
    if (a.flags & FERRY_SEND) {
      if (a.num_tokens < 0 || a.num_tokens > layout_.max_tokens)
        fail(Status::invalid_argument, "dispatch num_tokens " + std::to_string(a.num_tokens) +
                                           " outside [0, max_tokens_per_rank=" + std::to_string(layout_.max_tokens) + "]");
      if (a.num_tokens > 0 && (!a.dp_x || !a.indices || !a.weights || (layout_.num_scales > 0 && !a.dp_x_scale)))
        fail(Status::invalid_argument,
             "dispatch SEND: dp_x, indices, weights (and dp_x_scale with scale_block > 0) must not be null");
      cuda::DispatchSendParams p{layout_, a.dp_x, a.dp_x_scale, a.indices, a.weights, a.bound_m, a.num_tokens,
                                 static_cast<uint8_t*>(send_->ptr)};
      cuda::dispatch_send(p, ws_, num_sms_, stream);
      if (ipc_) cuda::ipc_dispatch_push(layout_, static_cast<const uint8_t*>(send_->ptr), peers_, ws_, num_sms_, stream);
    }
    if (a.flags & FERRY_RECV) {
      if (!a.out_expert_num_tokens || !a.out_expert_x || (layout_.num_scales > 0 && !a.out_expert_x_scale))
        fail(Status::invalid_argument, "dispatch RECV: out_expert_num_tokens, out_expert_x (and out_expert_x_scale "
                                       "with scale_block > 0) must not be null");
      cuda::DispatchRecvParams p{layout_, static_cast<const uint8_t*>(recv_->ptr),
                                 &flags_.device()->dispatch_arrived, wait_timeout_ns(),
                                 a.out_expert_num_tokens, a.out_expert_x,
                                 layout_.num_scales > 0 ? a.out_expert_x_scale : nullptr};
      if (ipc_) p.sender_arrived = ipc_flags_.get<uint32_t>();
      cuda::dispatch_recv(p, ws_, num_sms_, stream);
      finish(stream, "dispatch RECV");
    }
  }

  void combine(const ferry_combine_args_t& a, void* stream_ptr) override {
    DeviceScope scope(device_);
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    if (!(a.flags & (FERRY_SEND | FERRY_RECV)))
      fail(Status::invalid_argument, "combine flags " + std::to_string(a.flags) + " name neither FERRY_SEND nor FERRY_RECV");
    if (a.flags & FERRY_SEND) {
      if (!a.expert_y) fail(Status::invalid_argument, "combine SEND: expert_y is null");
      cuda::CombineSendParams p{layout_, a.expert_y, static_cast<uint8_t*>(combine_send_->ptr)};
      cuda::combine_send(p, ws_, num_sms_, stream);
      if (ipc_)
        cuda::ipc_combine_push(layout_, static_cast<const uint8_t*>(combine_send_->ptr),
                               static_cast<const uint8_t*>(recv_->ptr), peers_, ws_, num_sms_, stream);
    }
    if (a.flags & FERRY_RECV) {
      if (!a.out_tokens && a.num_tokens > 0) fail(Status::invalid_argument, "combine RECV: out_tokens is null");
      cuda::CombineRecvParams p{layout_, static_cast<const uint8_t*>(combine_recv_->ptr),
                                &flags_.device()->combine_arrived, wait_timeout_ns(), a.out_tokens,
                                a.accumulate != 0};
      if (ipc_) p.sender_arrived = ipc_flags_.get<uint32_t>() + layout_.world_size;
      cuda::combine_recv(p, ws_, num_sms_, stream);
      finish(stream, "combine RECV");
    }
  }

  ferry_buffer_sizes_t buffer_sizes() const override { return buffer_sizes_for(config_); }

  ferry_a2a_stats_t stats() const override {
    if (ipc_) return ipc_stats();
    const ProtocolStats s = proxy_->stats();
    return {s.dispatch_bytes_sent, s.combine_bytes_sent, s.dispatch_records_sent, s.overflow_records_sent};
  }

 private:
  std::string rank_text() const { return "rank " + std::to_string(layout_.rank) + ": "; }
  [[noreturn]] void fail(Status status, const std::string& what) const { raise(status, rank_text() + what); }

  // Construction meets every peer while each one is still creating its CUDA context and loading
  // kernels (seconds under a sanitizer): a short step deadline must not fail it.
  int setup_timeout_ms() const { return std::max(timeout_ms_, 60000); }

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
          if (ipc_) where += " by rank " + std::to_string(err.c) + " (CUDA IPC peer)";
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
      fail(status, std::string(operation) + ": " + cuda::device_error_name(err.code) + ": " + where +
                       (proxy.empty() ? "" : " (transport: " + proxy + ")"));
    }
    if (!proxy_) return;
    Status proxy_status = Status::ok;
    const std::string proxy = proxy_->error(&proxy_status);
    if (!proxy.empty()) raise(proxy_status, proxy);
  }

  // Exchanges the IPC handles of this rank's receive and combine regions and flag array, maps every
  // peer's, and gives the kernels one pointer table.
  void open_ipc_peers(te::Bootstrap& bootstrap) {
    const int R = layout_.world_size, me = layout_.rank;
    ipc_flags_ = DeviceBuffer(align_up(sizeof(uint32_t) * 2 * R + 2 * sizeof(uint32_t), 256));
    cuda::check_cuda(cudaMemset(ipc_flags_.get(), 0, ipc_flags_.bytes()), "cudaMemset ipc flags");
    IpcHandles mine{};
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.recv, recv_->ptr), "cudaIpcGetMemHandle(receive region)");
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.combine, combine_recv_->ptr), "cudaIpcGetMemHandle(combine region)");
    cuda::check_cuda(cudaIpcGetMemHandle(&mine.flags, ipc_flags_.get()), "cudaIpcGetMemHandle(flags)");
    std::vector<IpcHandles> all(R);
    bootstrap.allgather(&mine, sizeof mine, all.data(), setup_timeout_ms());
    std::vector<void*> table(3 * R);
    mappings_.reserve(3 * (R - 1));
    for (int r = 0; r < R; ++r) {
      if (r == me) {
        table[r] = recv_->ptr;
        table[R + r] = combine_recv_->ptr;
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
    peer_table_ = DeviceBuffer(table.size() * sizeof(void*));
    cuda::check_cuda(cudaMemcpy(peer_table_.get(), table.data(), peer_table_.bytes(), cudaMemcpyHostToDevice),
                     "upload ipc peer table");
    uint8_t** t = peer_table_.get<uint8_t*>();
    peers_.recv = t;
    peers_.combine = t + R;
    peers_.flags = reinterpret_cast<uint32_t* const*>(t + 2 * R);
    peers_.blocks_done = ipc_flags_.get<uint32_t>() + 2 * R;
  }

  // What the last step moved to the other ranks through CUDA IPC (the counts the kernels mirror to
  // mapped host memory); no byte crosses a network.
  ferry_a2a_stats_t ipc_stats() const {
    ferry_a2a_stats_t s{};
    for (int r = 0; r < layout_.world_size; ++r) {
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
  bool ipc_ = false;  // every rank on this node: peers through CUDA IPC, no engine
  std::unique_ptr<TransportBuffer> send_, recv_, combine_send_, combine_recv_;
  DeviceBuffer ipc_flags_;              // [R] dispatch epochs by sender, [R] combine, [2] counters
  std::vector<IpcMapping> mappings_;    // peers' regions and flags, closed before our buffers go
  DeviceBuffer peer_table_;
  cuda::IpcPeers peers_{};
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
