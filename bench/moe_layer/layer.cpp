#include "bench/moe_layer/layer.h"

#include <algorithm>
#include <optional>

#include "csrc/plan.h"
#include "tools/common/bootstrap.h"
#include "transfer_engine/error.h"

namespace ferry::moe {

MoeLayer::MoeLayer(const LayerOptions& o, ferry_bootstrap_t bootstrap)
    : o_(o), router_(o.shape), stream_(o.device == FERRY_DEVICE_CUDA) {
  if (const std::string bad = check_shape(o.shape); !bad.empty()) raise(Status::invalid_argument, bad);
  if (o.micro_batches < 1 || o.micro_batches > 2)
    raise(Status::invalid_argument, "micro_batches must be 1 or 2, got " + std::to_string(o.micro_batches));
  const LayerShape& s = o.shape;
  const bool device = o.device == FERRY_DEVICE_CUDA;
  const size_t out_elem = size_t(ep::elem_bytes_of(s.out_dtype));
  batches_.reserve(size_t(o.micro_batches));
  int max_rows = 0;
  auto threads_before = nccl::process_threads();
  try {
    std::optional<nccl::ScopedAffinity> on_ferry_cores;
    if (!o.ferry_cpus.empty()) on_ferry_cores.emplace(o.ferry_cpus);
    for (int b = 0; b < o.micro_batches; ++b) {
      // Handle 0 also runs the plain schedule (every token in one batch).
      const int max_tokens = b == 0 ? s.tokens : micro_batch_range(s.tokens, 2, 1).size();
      ferry_a2a_config_t c = a2a_config(s, o.rank, std::max(1, max_tokens));
      c.device = o.device;
      c.cuda_device = o.cuda_device;
      c.provider = o.provider.empty() ? nullptr : o.provider.c_str();
      c.nets_per_rank = o.nets_per_rank;
      c.timeout_ms = o.timeout_ms;
      Batch& batch = batches_.emplace_back();
      tools::check(ferry_a2a_create(&c, bootstrap, &batch.a2a), "ferry_a2a_create");
      tools::check(ferry_a2a_buffer_bytes(batch.a2a, &batch.sizes), "ferry_a2a_buffer_bytes");
      const size_t rows = size_t(batch.sizes.num_local_experts) * batch.sizes.max_rows_per_expert;
      batch.counts = Memory(sizeof(int32_t) * s.experts_per_rank(), device);
      batch.expert_x = Memory(rows * s.hidden * sizeof(uint16_t), device);
      batch.expert_y = Memory(rows * s.hidden * out_elem, device);
      batch.host_counts.assign(size_t(s.experts_per_rank()), 0);
      max_rows = std::max(max_rows, batch.sizes.max_rows_per_expert);
    }
  } catch (...) {
    for (Batch& b : batches_)
      if (b.a2a) ferry_a2a_destroy(b.a2a);
    throw;
  }
  x_ = Memory(size_t(s.tokens) * s.hidden * sizeof(uint16_t), device);
  indices_ = Memory(size_t(s.tokens) * s.top_k * sizeof(int32_t), device);
  weights_ = Memory(size_t(s.tokens) * s.top_k * sizeof(float), device);
  out_ = Memory(size_t(s.tokens) * s.hidden * out_elem, device);
  ferry_threads_ = nccl::new_threads(threads_before, nccl::process_threads());
  threads_before = nccl::process_threads();
  {
    std::optional<nccl::ScopedAffinity> on_gemm_cores;
    if (!o.gemm_cpus.empty()) on_gemm_cores.emplace(o.gemm_cpus);
    gemm_ = device ? make_cuda_grouped_gemm(s, o.rank, max_rows, stream_.get())
                   : make_host_grouped_gemm(s, o.rank, o.gemm_threads);
  }
  gemm_threads_ = nccl::new_threads(threads_before, nccl::process_threads());
}

MoeLayer::~MoeLayer() {
  for (Batch& b : batches_)
    if (b.a2a) ferry_a2a_destroy(b.a2a);
}

ferry_buffer_sizes_t MoeLayer::buffer_sizes(int b) const { return batches_.at(size_t(b)).sizes; }

void MoeLayer::set_tokens(const uint16_t* x) {
  const LayerShape& s = o_.shape;
  std::vector<int32_t> indices(size_t(s.tokens) * s.top_k);
  std::vector<float> weights(indices.size());
  router_.route(x, s.tokens, indices.data(), weights.data());
  x_.upload(x, x_.bytes());
  indices_.upload(indices.data(), indices_.bytes());
  weights_.upload(weights.data(), weights_.bytes());
}

void MoeLayer::call(const Op& op, int num_batches) {
  const LayerShape& s = o_.shape;
  if (op.batch < 0 || op.batch >= int(batches_.size()))
    raise(Status::invalid_argument, "the layer has " + std::to_string(batches_.size()) + " all-to-all handle(s)");
  Batch& b = batches_[size_t(op.batch)];
  const TokenRange range = micro_batch_range(s.tokens, num_batches, op.batch);
  const size_t out_row = size_t(s.hidden) * ep::elem_bytes_of(s.out_dtype);
  auto* x = static_cast<uint8_t*>(x_.get()) + size_t(range.begin) * s.hidden * sizeof(uint16_t);
  auto* indices = static_cast<int32_t*>(indices_.get()) + size_t(range.begin) * s.top_k;
  auto* weights = static_cast<float*>(weights_.get()) + size_t(range.begin) * s.top_k;
  auto* out = static_cast<uint8_t*>(out_.get()) + size_t(range.begin) * out_row;
  switch (op.kind) {
    case OpKind::dispatch_send:
    case OpKind::dispatch_recv: {
      ferry_dispatch_args_t d{};
      d.out_expert_num_tokens = static_cast<int32_t*>(b.counts.get());
      d.out_expert_x = b.expert_x.get();
      d.dp_x = x;
      d.indices = indices;
      d.weights = weights;
      d.num_tokens = range.size();
      d.flags = op.kind == OpKind::dispatch_send ? FERRY_SEND : FERRY_RECV;
      tools::check(ferry_a2a_dispatch(b.a2a, &d, stream_.get()), "ferry_a2a_dispatch");
      if (op.kind == OpKind::dispatch_recv) {
        // cuBLAS's grouped GEMM takes its row counts from the host.
        b.counts.download(b.host_counts.data(), b.host_counts.size() * sizeof(int32_t));
      }
      break;
    }
    case OpKind::gemm: {
      ExpertRows rows;
      rows.counts = b.host_counts.data();
      rows.expert_x = b.expert_x.get();
      rows.expert_y = b.expert_y.get();
      rows.max_rows = b.sizes.max_rows_per_expert;
      gemm_->run(rows);
      last_gemm_flops_ += grouped_gemm_flops(s, rows.counts);
      return;
    }
    case OpKind::combine_send:
    case OpKind::combine_recv: {
      ferry_combine_args_t c{};
      c.out_tokens = out;
      c.indices = indices;
      c.weights = weights;
      c.expert_y = b.expert_y.get();
      c.num_tokens = range.size();
      c.flags = op.kind == OpKind::combine_send ? FERRY_SEND : FERRY_RECV;
      tools::check(ferry_a2a_combine(b.a2a, &c, stream_.get()), "ferry_a2a_combine");
      break;
    }
  }
  ++b.calls;
}

void MoeLayer::run(const Schedule& schedule) {
  const int n = num_micro_batches(schedule);
  last_gemm_flops_ = 0;
  for (Batch& b : batches_) b.calls = 0;
  for (size_t i = 0; i < schedule.size(); ++i) {
    try {
      call(schedule[i], n);
    } catch (const Error& e) {
      raise(e.status(), "rank " + std::to_string(o_.rank) + ": op " + std::to_string(i) + " of [" + describe(schedule) +
                            "] (" + describe(schedule[i]) + "): " + e.what());
    }
  }
  stream_.sync();
  for (int b = 0; b < n && b < int(batches_.size()); ++b) {
    const int calls = batches_[size_t(b)].calls;
    if (calls != 0 && calls != 4)
      raise(Status::invalid_argument,
            "rank " + std::to_string(o_.rank) + ": schedule [" + describe(schedule) + "] left micro-batch " +
                std::to_string(b) + " after " + std::to_string(calls) +
                " of its 4 all-to-all halves: its step is unfinished and its tokens' output was never received");
  }
}

void MoeLayer::download_output(void* out) const { out_.download(out, out_.bytes()); }

}  // namespace ferry::moe
