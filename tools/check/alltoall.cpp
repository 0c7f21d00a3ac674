// Stage 4: dispatch and combine through the public C API at this job's EP size, every byte of every
// iteration compared with the brute-force reference, timed per rank. The host backend, or the CUDA
// backend on every rank's GPU (kernels, proxy, CUDA IPC between same-node ranks): --a2a-device.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>

#include "csrc/backend.h"
#include "csrc/reference.h"
#include "tools/check/check.h"
#include "tools/common/bootstrap.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

#if defined(FERRY_CHECK_CUDA)
#include "csrc/cuda/memory.h"
#endif

namespace ferry::check {

namespace ref = ep::reference;
using Clock = std::chrono::steady_clock;

namespace {

struct Case {
  std::string shape;
  std::string routing;
  int num_tokens;
  int hidden;
  int top_k;
  int experts_per_rank;
  ferry_dtype_t in_dtype;
  int scale_block;
};

const char* dtype_name(ferry_dtype_t d) {
  switch (d) {
    case FERRY_BF16: return "bf16";
    case FERRY_F16: return "f16";
    case FERRY_F32: return "f32";
    case FERRY_FP8_E4M3: return "fp8_e4m3";
  }
  return "?";
}

std::vector<Case> cases_for(const Options& opt) {
  std::vector<Case> out;
  const int decode_tokens = std::max(1, opt.a2a_tokens);
  const int wide_tokens = std::max(1, opt.a2a_tokens / 4);
  for (const char* routing : {"uniform", "skewed", "all_to_one"}) {
    // Decode-like: fp8 payload with block scales, top-4 of 4 experts per rank.
    out.push_back(Case{"decode", routing, decode_tokens, opt.a2a_decode_hidden, 4, 4, FERRY_FP8_E4M3, 128});
    // A larger hidden in bf16 without scales.
    out.push_back(Case{"wide", routing, wide_tokens, opt.a2a_wide_hidden, 2, 2, FERRY_BF16, 0});
  }
  return out;
}

// The inputs of every rank for a case. all_to_one sends every route of every token to the experts
// of the last rank, the worst incast a router can produce.
std::vector<ref::RankInput> inputs_for(const ferry_a2a_config_t& config, const Case& c, uint64_t seed) {
  ref::InputSpec spec;
  spec.seed = seed;
  spec.routing = c.routing == "skewed" ? ref::Routing::zipf : ref::Routing::uniform;
  std::vector<ref::RankInput> inputs = ref::generate_all(config, spec);
  if (c.routing == "all_to_one") {
    const int target = config.world_size - 1;
    const int per_rank = config.num_experts / config.world_size;
    for (ref::RankInput& in : inputs)
      for (int t = 0; t < in.num_tokens; ++t)
        for (int k = 0; k < config.experts_per_token; ++k)
          in.indices[size_t(t) * config.experts_per_token + k] = target * per_rank + (t + k) % per_rank;
  }
  return inputs;
}

// One argument buffer of the C API and its host image: inputs are staged in the image and uploaded,
// outputs downloaded into it and checked there. Where the API memory lives is the Space's business,
// so one run_case serves both backends.
class Buffer {
 public:
  Buffer(std::string name, size_t bytes) : name_(std::move(name)), image_(bytes) {}
  virtual ~Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  // What ferry_a2a_* gets; null for an empty buffer (no scales), as the API expects.
  virtual void* api() = 0;
  virtual void upload() = 0;
  // Outputs of the previous iteration must not pass for this one's: every output byte is overwritten
  // with kPoison (counts read -1, scales NaN) before each call.
  virtual void poison() = 0;
  virtual void download() = 0;
  template <typename T = uint8_t>
  T* host() { return image_.empty() ? nullptr : reinterpret_cast<T*>(image_.data()); }
  size_t bytes() const { return image_.size(); }
  const std::string& name() const { return name_; }

  static constexpr int kPoison = 0xff;

 protected:
  std::string name_;
  std::vector<uint8_t> image_;
};

class Space {
 public:
  virtual ~Space() = default;
  virtual const char* device() const = 0;  // "host" or "cuda", as the report names it
  virtual std::unique_ptr<Buffer> make(const std::string& name, size_t bytes) = 0;
  virtual void* stream() = 0;              // the a2a calls' stream (null on the host)
  // Queued uploads and poisons finished, so a timing covers the a2a call alone.
  virtual void sync() = 0;
  // A buffer holding a copy of `bytes` bytes of src, uploaded.
  std::unique_ptr<Buffer> input(const std::string& name, const void* src, size_t bytes) {
    std::unique_ptr<Buffer> b = make(name, bytes);
    if (bytes) std::memcpy(b->host(), src, bytes);
    b->upload();
    return b;
  }
};

// Host backend: the image is the API memory.
class HostBuffer final : public Buffer {
 public:
  using Buffer::Buffer;
  void* api() override { return host(); }
  void upload() override {}
  void poison() override { std::memset(image_.data(), kPoison, image_.size()); }
  void download() override {}
};

class HostSpace final : public Space {
 public:
  const char* device() const override { return "host"; }
  std::unique_ptr<Buffer> make(const std::string& name, size_t bytes) override {
    return std::make_unique<HostBuffer>(name, bytes);
  }
  void* stream() override { return nullptr; }
  void sync() override {}
};

#if defined(FERRY_CHECK_CUDA)
// CUDA backend: device memory on this rank's GPU, copied through one stream.
class CudaSpace final : public Space {
 public:
  CudaSpace(int rank, int gpu) : rank_(rank) {
    check(cudaSetDevice(gpu), "cudaSetDevice(" + std::to_string(gpu) + ")");
    stream_ = std::make_unique<cuda::Stream>();
  }
  const char* device() const override { return "cuda"; }
  std::unique_ptr<Buffer> make(const std::string& name, size_t bytes) override {
    return std::make_unique<DeviceBuffer>(*this, name, bytes);
  }
  void* stream() override { return stream_->get(); }
  void sync() override { check(cudaStreamSynchronize(stream_->get()), "cudaStreamSynchronize"); }
  void check(cudaError_t err, const std::string& what) const {
    cuda::check_cuda(err, ("rank " + std::to_string(rank_) + ": " + what).c_str());
  }

 private:
  class DeviceBuffer final : public Buffer {
   public:
    DeviceBuffer(CudaSpace& space, const std::string& name, size_t bytes) : Buffer(name, bytes), space_(space) {
      try {
        mem_ = cuda::DeviceBuffer(bytes);
      } catch (const Error& e) {
        raise(e.status(), "rank " + std::to_string(space.rank_) + ": " + name + " (" + std::to_string(bytes) +
                              " bytes): " + e.what());
      }
    }
    void* api() override { return mem_.get(); }
    void upload() override {
      if (bytes()) space_.check(cudaMemcpyAsync(mem_.get(), image_.data(), bytes(), cudaMemcpyHostToDevice, stream()),
                                "cudaMemcpyAsync of " + name_ + " to the device");
    }
    void poison() override {
      if (bytes()) space_.check(cudaMemsetAsync(mem_.get(), kPoison, bytes(), stream()), "cudaMemsetAsync of " + name_);
    }
    void download() override {
      if (!bytes()) return;
      space_.check(cudaMemcpyAsync(image_.data(), mem_.get(), bytes(), cudaMemcpyDeviceToHost, stream()),
                   "cudaMemcpyAsync of " + name_ + " to the host");
      space_.check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize after downloading " + name_);
    }

   private:
    cudaStream_t stream() const { return space_.stream_->get(); }
    CudaSpace& space_;
    cuda::DeviceBuffer mem_;
  };

  int rank_;
  std::unique_ptr<cuda::Stream> stream_;
};
#endif

std::unique_ptr<Space> make_space(bool cuda_device, int rank, int gpu) {
  if (!cuda_device) return std::make_unique<HostSpace>();
#if defined(FERRY_CHECK_CUDA)
  return std::make_unique<CudaSpace>(rank, gpu);
#else
  raise(Status::unsupported, "rank " + std::to_string(rank) + ": --a2a-device cuda: built without the CUDA backend");
#endif
}

struct A2a {
  ferry_a2a_t handle = nullptr;
  ~A2a() {
    if (handle) ferry_a2a_destroy(handle);
  }
};

struct CaseOutcome {
  std::vector<double> dispatch_us, combine_us;
  uint64_t bytes_checked = 0;
};

CaseOutcome run_case(const Options& opt, const ferry_a2a_config_t& config, const Case& c,
                     tools::CBootstrap& cboot, Space& space) {
  const int me = config.rank;
  const std::vector<ref::RankInput> inputs = inputs_for(config, c, opt.seed);
  const ref::RankInput& in = inputs[size_t(me)];
  const ref::DispatchResult want = ref::dispatch(config, inputs, me);
  const std::vector<float> want_out = ref::combine_standard(config, in);
  const std::vector<float> magnitude = ref::combine_magnitude_standard(config, in);
  const ep::Layout layout = ep::make_layout(config);

  A2a a2a;
  tools::check(ferry_a2a_create(&config, cboot.get(), &a2a.handle), "ferry_a2a_create");
  ferry_buffer_sizes_t sizes{};
  tools::check(ferry_a2a_buffer_bytes(a2a.handle, &sizes), "ferry_a2a_buffer_bytes");
  const size_t rows = size_t(sizes.num_local_experts) * size_t(sizes.max_rows_per_expert);

  // Inputs once per case; the token count also through bound_m, where a serving stack keeps it.
  const std::unique_ptr<Buffer> dp_x = space.input("dp_x", in.x.data(), in.x.size());
  const std::unique_ptr<Buffer> dp_x_scale = space.input("dp_x_scale", in.x_scale.data(), in.x_scale.size() * sizeof(float));
  const std::unique_ptr<Buffer> indices = space.input("indices", in.indices.data(), in.indices.size() * sizeof(int32_t));
  const std::unique_ptr<Buffer> weights = space.input("weights", in.weights.data(), in.weights.size() * sizeof(float));
  const int32_t num_tokens = in.num_tokens;
  const std::unique_ptr<Buffer> bound_m = space.input("bound_m", &num_tokens, sizeof num_tokens);
  const std::unique_ptr<Buffer> counts = space.make("out_expert_num_tokens", size_t(sizes.num_local_experts) * sizeof(int32_t));
  const std::unique_ptr<Buffer> expert_x = space.make("out_expert_x", rows * layout.payload_bytes);
  const std::unique_ptr<Buffer> expert_x_scale =
      space.make("out_expert_x_scale", layout.num_scales > 0 ? rows * size_t(layout.num_scales) * sizeof(float) : 0);
  const std::unique_ptr<Buffer> expert_y =
      space.make("expert_y", rows * size_t(config.hidden_dim) * size_t(layout.out_elem_bytes));
  const std::unique_ptr<Buffer> out_tokens =
      space.make("out_tokens", size_t(std::max(1, in.num_tokens)) * size_t(config.hidden_dim) * size_t(layout.out_elem_bytes));

  CaseOutcome outcome;
  for (int iter = 0; iter < opt.a2a_warmup + opt.a2a_iters; ++iter) {
    counts->poison();
    expert_x->poison();
    expert_x_scale->poison();
    space.sync();
    ferry_dispatch_args_t d{};
    d.out_expert_num_tokens = static_cast<int32_t*>(counts->api());
    d.out_expert_x = expert_x->api();
    d.out_expert_x_scale = static_cast<float*>(expert_x_scale->api());
    d.dp_x = dp_x->api();
    d.dp_x_scale = static_cast<const float*>(dp_x_scale->api());
    d.indices = static_cast<const int32_t*>(indices->api());
    d.weights = static_cast<const float*>(weights->api());
    d.bound_m = static_cast<const int32_t*>(bound_m->api());
    d.num_tokens = in.num_tokens;
    d.flags = FERRY_SEND_RECV;
    // A receiving call returns with its stream synchronised (the CUDA backend waits for its kernels),
    // so the wall time of the call is the operation's latency on either backend.
    auto t0 = Clock::now();
    tools::check(ferry_a2a_dispatch(a2a.handle, &d, space.stream()), "ferry_a2a_dispatch");
    const double dispatch_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    counts->download();
    expert_x->download();
    expert_x_scale->download();
    std::string bad = ref::compare_dispatch(config, want, counts->host<int32_t>(), expert_x->host(),
                                            expert_x_scale->host<float>());
    if (!bad.empty())
      raise(Status::internal, "rank " + std::to_string(me) + ": dispatch output differs from the reference in iteration " +
                                  std::to_string(iter) + " (" + space.device() + " backend): " + bad);
    uint64_t rows_received = 0;
    for (int e = 0; e < sizes.num_local_experts; ++e) rows_received += uint64_t(std::max(0, counts->host<int32_t>()[e]));
    outcome.bytes_checked += rows_received * (layout.payload_bytes + layout.scale_bytes) + counts->bytes();

    // The expert model runs on the host, on the rows as received.
    std::memset(expert_y->host(), 0, expert_y->bytes());
    ref::apply_experts(layout, counts->host<int32_t>(), expert_x->host(), expert_x_scale->host<float>(),
                       expert_y->host());
    expert_y->upload();
    out_tokens->poison();
    space.sync();
    ferry_combine_args_t cb{};
    cb.out_tokens = out_tokens->api();
    cb.indices = d.indices;
    cb.weights = d.weights;
    cb.expert_y = expert_y->api();
    cb.bound_m = d.bound_m;
    cb.num_tokens = in.num_tokens;
    cb.accumulate = 0;
    cb.flags = FERRY_SEND_RECV;
    t0 = Clock::now();
    tools::check(ferry_a2a_combine(a2a.handle, &cb, space.stream()), "ferry_a2a_combine");
    const double combine_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    out_tokens->download();
    bad = ref::compare_combine(config, want_out, magnitude, out_tokens->host(), in.num_tokens);
    if (!bad.empty())
      raise(Status::internal, "rank " + std::to_string(me) + ": combine output differs from the reference in iteration " +
                                  std::to_string(iter) + " (" + space.device() + " backend): " + bad);
    outcome.bytes_checked += uint64_t(in.num_tokens) * uint64_t(config.hidden_dim) * uint64_t(layout.out_elem_bytes);
    if (iter >= opt.a2a_warmup) {
      outcome.dispatch_us.push_back(dispatch_us);
      outcome.combine_us.push_back(combine_us);
    }
  }
  return outcome;
}

// Whether a rank can run the CUDA backend, as every rank tells the others.
enum CudaAbility : uint64_t { kNotBuilt = 0, kNoDevice = 1, kCudaReady = 2 };

#if defined(FERRY_CHECK_CUDA)
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

struct DeviceChoice {
  bool cuda = false;
  std::string why;    // how --a2a-device resolved, for the progress line and the metrics
  std::string error;  // --a2a-device cuda that some rank cannot run: the stage fails with this
};

std::string rank_list(const std::vector<int>& ranks, const std::vector<RankInventory>& all) {
  std::string out;
  std::set<std::string> hosts;
  for (int r : ranks) {
    out += (out.empty() ? "" : ", ") + std::to_string(r);
    hosts.insert(all[size_t(r)].host);
  }
  std::string host_text;
  for (const std::string& h : hosts) host_text += (host_text.empty() ? "" : ", ") + h;
  return out + " (host " + host_text + ")";
}

// Decided from every rank's own answer (its build and the GPUs its inventory found), gathered, so all
// ranks choose the same backend; the backend's creation is collective.
DeviceChoice choose_device(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  DeviceChoice choice;
  const std::vector<std::string>& names = a2a_device_names();
  if (std::find(names.begin(), names.end(), opt.a2a_device) == names.end())
    raise(Status::invalid_argument, "--a2a-device " + opt.a2a_device + ": expected host, cuda or auto");
  if (opt.a2a_device == "host") {
    choice.why = "--a2a-device host";
    return choice;
  }
  const int gpu = all[size_t(boot.rank())].gpu;
  const uint64_t mine = !kBuiltWithCuda ? kNotBuilt : gpu < 0 ? kNoDevice : kCudaReady;
  const std::vector<uint64_t> abilities = tools::allgather_u64(boot, mine, opt.collective_timeout_ms());
  std::vector<int> not_built, no_device;
  for (int r = 0; r < boot.world_size(); ++r) {
    if (abilities[size_t(r)] == kNotBuilt) not_built.push_back(r);
    if (abilities[size_t(r)] == kNoDevice) no_device.push_back(r);
  }
  std::string missing;
  if (!not_built.empty()) missing = "built without the CUDA backend on rank(s) " + rank_list(not_built, all);
  if (!no_device.empty())
    missing += (missing.empty() ? "" : "; ") + std::string("no CUDA device on rank(s) ") + rank_list(no_device, all);
  choice.cuda = missing.empty();
  if (opt.a2a_device == "cuda") {
    choice.why = "--a2a-device cuda";
    if (!choice.cuda) choice.error = "--a2a-device cuda: " + missing;
  } else {
    choice.why = choice.cuda ? "--a2a-device auto: every rank has a CUDA device" : "--a2a-device auto: " + missing;
  }
  return choice;
}

}  // namespace

Share run_alltoall(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  Share share;
  const int me = boot.rank();
  const int world = boot.world_size();
  // Every rank uses the same number of NICs (the fewest any rank has), its own available ones first.
  int nets = 1 << 20;
  for (const RankInventory& inv : all) {
    int usable = 0;
    for (int s = 0; s < int(inv.nics.size()); ++s) usable += nic_problem(inv, s).empty();
    nets = std::min(nets, usable);
  }
  const RankInventory& mine = all[size_t(me)];
  if (nets <= 0) {
    if (me != 0) return share;
    share.checks.push_back(CheckResult{"alltoall", "dispatch/combine", Verdict::fail,
                                       "not run: some rank has no usable NIC (see inventory)", nlohmann::json::object()});
    return share;
  }
  std::string domains;
  int taken = 0;
  for (int s = 0; s < int(mine.nics.size()) && taken < nets; ++s) {
    if (!nic_problem(mine, s).empty()) continue;
    domains += (taken ? "," : "") + mine.nics[size_t(s)];
    ++taken;
  }
  // The C API takes its NICs from FERRY_DOMAINS (the config names only a count).
  ::setenv("FERRY_DOMAINS", domains.c_str(), 1);
  tools::CBootstrap cboot(boot);

  const DeviceChoice device = choose_device(opt, boot, all);
  const char* device_name = device.cuda ? "cuda" : "host";
  if (!device.error.empty()) {
    // The user asked for the CUDA path; checking the host backend instead would pass a job that
    // never exercised what it serves with.
    if (me != 0) return share;
    share.checks.push_back(CheckResult{"alltoall", "dispatch/combine", Verdict::fail, device.error,
                                       {{"device", "cuda"}, {"device_requested", opt.a2a_device}}});
    return share;
  }
  progress(me, "alltoall: %s backend (%s)", device_name, device.why.c_str());

  const std::vector<Case> cases = cases_for(opt);
  bool stop = false;
  std::string stop_reason;
  for (const Case& c : cases) {
    const std::string name = c.shape + " " + dtype_name(c.in_dtype) + " " + c.routing;
    AlltoallResult res;
    res.shape = c.shape;
    res.routing = c.routing;
    res.num_tokens = c.num_tokens;
    res.hidden = c.hidden;
    res.top_k = c.top_k;
    res.num_experts = c.experts_per_rank * world;
    res.dtype = dtype_name(c.in_dtype);
    res.iterations = opt.a2a_iters;
    res.device = device_name;
    if (stop) {
      res.error = stop_reason;
      if (me == 0) {
        share.alltoall.push_back(res);
        share.checks.push_back(CheckResult{"alltoall", name, Verdict::skip, stop_reason, nlohmann::json::object()});
      }
      continue;
    }
    progress(me, "alltoall: %s, %d tokens x %d hidden, %d ranks", name.c_str(), c.num_tokens, c.hidden, world);
    ferry_a2a_config_t config;
    ferry_a2a_config_init(&config);
    config.rank = me;
    config.world_size = world;
    config.num_experts = res.num_experts;
    config.experts_per_token = c.top_k;
    config.max_tokens_per_rank = c.num_tokens;
    config.hidden_dim = c.hidden;
    config.in_dtype = c.in_dtype;
    config.scale_block = c.scale_block;
    config.out_dtype = FERRY_BF16;
    config.expert_alignment = 1;
    config.device = device.cuda ? FERRY_DEVICE_CUDA : FERRY_DEVICE_HOST;
    if (device.cuda) config.cuda_device = mine.gpu;
    config.nets_per_rank = nets;
    config.provider = opt.provider.c_str();
    config.timeout_ms = opt.timeout_ms;
    config.dp_size = 1;
    config.private_tokens = -1;

    std::string error;
    CaseOutcome outcome;
    try {
      // Per case, inside the try: a GPU this rank cannot use fails the case on every rank together.
      const std::unique_ptr<Space> space = make_space(device.cuda, me, mine.gpu);
      outcome = run_case(opt, config, c, cboot, *space);
    } catch (const std::exception& e) {
      error = e.what();
      rank_failure(me, "alltoall " + name + ": " + error);
    }
    // Every rank learns every rank's outcome (and its timings), so all stop together after a failure
    // and the verdict uses the slowest rank's percentiles.
    const tools::Percentiles dp = tools::percentiles(outcome.dispatch_us);
    const tools::Percentiles cp = tools::percentiles(outcome.combine_us);
    const std::vector<double> mine_values = {error.empty() ? 1.0 : 0.0, dp.p50, dp.p99, cp.p50, cp.p99,
                                             double(outcome.bytes_checked)};
    const std::vector<double> everyone = tools::allgather_values(boot, mine_values, opt.collective_timeout_ms());
    const std::vector<std::string> errors = tools::allgather_strings(boot, error, opt.collective_timeout_ms());
    std::vector<int> failed_ranks;
    res.dispatch_us_p50 = res.dispatch_us_p99 = res.combine_us_p50 = res.combine_us_p99 = 0;
    for (int r = 0; r < world; ++r) {
      const double* v = &everyone[size_t(r) * mine_values.size()];
      if (v[0] == 0.0) failed_ranks.push_back(r);
      res.dispatch_us_p50 = std::max(res.dispatch_us_p50, v[1]);
      res.dispatch_us_p99 = std::max(res.dispatch_us_p99, v[2]);
      res.combine_us_p50 = std::max(res.combine_us_p50, v[3]);
      res.combine_us_p99 = std::max(res.combine_us_p99, v[4]);
      res.bytes_checked += uint64_t(v[5]);
    }
    CheckResult check{"alltoall", name, Verdict::pass, "", nlohmann::json::object()};
    check.metrics = {{"num_tokens", c.num_tokens}, {"hidden", c.hidden}, {"top_k", c.top_k},
                     {"num_experts", res.num_experts}, {"dtype", res.dtype}, {"iterations", opt.a2a_iters},
                     {"bytes_checked", res.bytes_checked}, {"dispatch_us_p50", res.dispatch_us_p50},
                     {"dispatch_us_p99", res.dispatch_us_p99}, {"combine_us_p50", res.combine_us_p50},
                     {"combine_us_p99", res.combine_us_p99}, {"nets_per_rank", nets},
                     {"device", device_name}, {"device_requested", opt.a2a_device}, {"device_choice", device.why}};
    if (!failed_ranks.empty()) {
      std::string list;
      for (int r : failed_ranks) list += (list.empty() ? "" : ", ") + std::to_string(r);
      res.ok = false;
      std::string why;
      for (int r : failed_ranks) why += "; rank " + std::to_string(r) + ": " + errors[size_t(r)];
      res.error = "failed on rank(s) " + list + why;
      res.dispatch_us_p50 = res.dispatch_us_p99 = res.combine_us_p50 = res.combine_us_p99 = -1;
      check.verdict = Verdict::fail;
      check.reason = res.error;
      stop = true;
      stop_reason = "not run after " + name + " failed on rank(s) " + list;
    } else {
      res.ok = true;
      // Limits apply to the tail: a p99 over the limit is what a serving stack would feel.
      if (opt.max_dispatch_us > 0 && res.dispatch_us_p99 > opt.max_dispatch_us) {
        check.verdict = Verdict::fail;
        check.reason = tools::format("dispatch p99 %.1f us over --max-dispatch-us %.1f (p50 %.1f us)",
                                     res.dispatch_us_p99, opt.max_dispatch_us, res.dispatch_us_p50);
      }
      if (opt.max_combine_us > 0 && res.combine_us_p99 > opt.max_combine_us) {
        check.verdict = Verdict::fail;
        check.reason += (check.reason.empty() ? "" : "; ") +
                        tools::format("combine p99 %.1f us over --max-combine-us %.1f (p50 %.1f us)",
                                      res.combine_us_p99, opt.max_combine_us, res.combine_us_p50);
      }
      if (check.verdict == Verdict::fail) res.error = check.reason;
    }
    // The verdict is the same on every rank; rank 0's copy goes into the report.
    if (me == 0) {
      share.alltoall.push_back(res);
      share.checks.push_back(std::move(check));
    }
  }
  return share;
}

}  // namespace ferry::check
