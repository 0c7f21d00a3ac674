// The CUDA backend: kernels on the caller's stream for pack/unpack/partial sums, a proxy thread per
// GPU driving the Protocol over the transfer engine, and the buffers the engine moves: pinned host
// memory mapped into the GPU (host-staged: any provider, e.g. tcp or shm) or device memory
// registered with FI_HMEM/dmabuf (GPUDirect RDMA on efa and verbs).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>

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
using cuda::MappedHostBuffer;

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
    placement_ = choose_placement(ec.provider);
    send_ = std::make_unique<TransportBuffer>(placement_, layout_.send_buffer_bytes());
    recv_ = std::make_unique<TransportBuffer>(placement_, layout_.recv_buffer_bytes());
    combine_send_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_send_bytes());
    combine_recv_ = std::make_unique<TransportBuffer>(placement_, layout_.combine_recv_bytes());

    ws_dev_ = DeviceBuffer(cuda::workspace_device_bytes(layout_));
    cuda::check_cuda(cudaMemset(ws_dev_.get(), 0, ws_dev_.bytes()), "cudaMemset workspace");
    ws_host_ = MappedHostBuffer(cuda::workspace_host_bytes(layout_));
    std::memset(ws_host_.host(), 0, ws_host_.bytes());
    flags_ = MappedHostBuffer(sizeof(cuda::ArrivalFlags));
    std::memset(flags_.host(), 0, flags_.bytes());
    ws_ = cuda::carve_workspace(layout_, ws_dev_.get(), ws_host_.dev());
    // The proxy thread and the Protocol use the device addresses of mapped host memory on the host.
    if (ws_host_.dev() != ws_host_.host())
      raise(Status::unsupported, rank_text() + "the CUDA backend needs unified addressing (mapped host memory "
                                               "at the same address on host and device)");

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
    proxy_ = std::make_unique<cuda::Proxy>(*protocol_, ws_, flags_.host<cuda::ArrivalFlags>(), device_);
  }

  ~CudaBackend() override {
    // Kernels of a step in flight read the flags and buffers below.
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    proxy_.reset();
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
    }
    if (a.flags & FERRY_RECV) {
      if (!a.out_expert_num_tokens || !a.out_expert_x || (layout_.num_scales > 0 && !a.out_expert_x_scale))
        fail(Status::invalid_argument, "dispatch RECV: out_expert_num_tokens, out_expert_x (and out_expert_x_scale "
                                       "with scale_block > 0) must not be null");
      cuda::DispatchRecvParams p{layout_, static_cast<const uint8_t*>(recv_->ptr),
                                 &flags_.dev<cuda::ArrivalFlags>()->dispatch_arrived, wait_timeout_ns(),
                                 a.out_expert_num_tokens, a.out_expert_x,
                                 layout_.num_scales > 0 ? a.out_expert_x_scale : nullptr};
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
    }
    if (a.flags & FERRY_RECV) {
      if (!a.out_tokens && a.num_tokens > 0) fail(Status::invalid_argument, "combine RECV: out_tokens is null");
      cuda::CombineRecvParams p{layout_, static_cast<const uint8_t*>(combine_recv_->ptr),
                                &flags_.dev<cuda::ArrivalFlags>()->combine_arrived, wait_timeout_ns(), a.out_tokens,
                                a.accumulate != 0};
      cuda::combine_recv(p, ws_, num_sms_, stream);
      finish(stream, "combine RECV");
    }
  }

  ferry_buffer_sizes_t buffer_sizes() const override { return buffer_sizes_for(config_); }

  ferry_a2a_stats_t stats() const override {
    const ProtocolStats s = proxy_->stats();
    return {s.dispatch_bytes_sent, s.combine_bytes_sent, s.dispatch_records_sent, s.overflow_records_sent};
  }

 private:
  std::string rank_text() const { return "rank " + std::to_string(layout_.rank) + ": "; }
  [[noreturn]] void fail(Status status, const std::string& what) const { raise(status, rank_text() + what); }

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
      const std::string proxy = proxy_->error(&proxy_status);
      fail(status, std::string(operation) + ": " + cuda::device_error_name(err.code) + ": " + where +
                       (proxy.empty() ? "" : " (transport: " + proxy + ")"));
    }
    Status proxy_status = Status::ok;
    const std::string proxy = proxy_->error(&proxy_status);
    if (!proxy.empty()) raise(proxy_status, proxy);
  }

  ferry_a2a_config_t config_;
  Layout layout_;
  int timeout_ms_;
  int device_ = 0;
  int num_sms_ = 0;
  te::MemoryKind placement_ = te::MemoryKind::host;
  std::unique_ptr<TransportBuffer> send_, recv_, combine_send_, combine_recv_;
  DeviceBuffer ws_dev_;
  MappedHostBuffer ws_host_, flags_;
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
