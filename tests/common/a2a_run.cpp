#include "tests/common/a2a_run.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "csrc/backend.h"
#include "csrc/dtype.h"
#include "transfer_engine/error.h"

namespace ferry::testing {

using ep::Layout;
using ep::reference::RankInput;

#ifdef FERRY_TEST_CUDA
std::unique_ptr<RankMemory> make_cuda_rank_memory();  // a2a_memory_cuda.cpp
#endif

namespace {

class HostMemory final : public RankMemory {
 public:
  void* allocate(size_t bytes) override {
    blocks_.push_back(std::make_unique<uint8_t[]>(std::max<size_t>(bytes, 16)));
    return blocks_.back().get();
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void fill(void* dst, uint8_t byte, size_t bytes) override { std::memset(dst, byte, bytes); }
  void* stream() override { return nullptr; }

 private:
  std::vector<std::unique_ptr<uint8_t[]>> blocks_;
};

// Appends at most a few lines per problem kind, so a broken step prints what broke, not megabytes.
class Problems {
 public:
  void add(const std::string& what) {
    if (count_++ < 8) os_ << what << "\n";
  }
  void add_all(const std::string& text) {
    if (!text.empty()) add(text);
  }
  std::string str() const {
    return count_ > 8 ? os_.str() + "... and " + std::to_string(count_ - 8) + " more\n" : os_.str();
  }

 private:
  std::ostringstream os_;
  int count_ = 0;
};

// Index of the first byte in [begin, end) that is not `byte`, or end.
size_t first_other(const std::vector<uint8_t>& v, size_t begin, size_t end, uint8_t byte) {
  for (size_t i = begin; i < end; ++i)
    if (v[i] != byte) return i;
  return end;
}

}  // namespace

std::unique_ptr<RankMemory> make_rank_memory(ferry_device_t device) {
  if (device == FERRY_DEVICE_HOST) return std::make_unique<HostMemory>();
#ifdef FERRY_TEST_CUDA
  if (device == FERRY_DEVICE_CUDA) return make_cuda_rank_memory();
#endif
  raise(Status::unsupported, "test memory: device " + std::to_string(int(device)) + " is not built into this test");
}

RankInput first_tokens(const RankInput& in, int m) {
  RankInput out = in;
  if (m >= in.num_tokens) return out;
  const size_t n = size_t(std::max(m, 0)), tokens = size_t(in.num_tokens);
  out.num_tokens = int(n);
  out.x.resize(in.x.size() / tokens * n);
  out.x_scale.resize(in.x_scale.size() / tokens * n);
  out.indices.resize(in.indices.size() / tokens * n);
  out.weights.resize(in.weights.size() / tokens * n);
  return out;
}

int bound_of(int num_tokens) { return num_tokens - (num_tokens + 2) / 3; }

Traffic expected_traffic(const Layout& l, std::span<const RankInput> inputs) {
  const int R = l.world_size, me = l.rank, dp = l.dp_size;
  // routes[s][d]: routes of rank s's sent tokens to rank d's experts; records[s][d]: its tokens with
  // at least one (a token travels once per destination rank).
  std::vector<std::vector<uint64_t>> routes(R, std::vector<uint64_t>(R)), records = routes;
  for (int s = 0; s < R; ++s) {
    const RankInput& in = inputs[s];
    for (int t = 0; t < in.num_tokens; ++t) {
      if (t % dp != s % dp) continue;  // another member of s's dp group sends it
      std::vector<int> to(R, 0);
      for (int k = 0; k < l.top_k; ++k) {
        const int32_t e = in.indices[size_t(t) * l.top_k + k];
        if (e >= 0) ++to[e / l.experts_per_rank];
      }
      for (int d = 0; d < R; ++d) {
        routes[s][d] += uint64_t(to[d]);
        records[s][d] += to[d] > 0 ? 1 : 0;
      }
    }
  }
  Traffic t;
  for (int d = 0; d < R; ++d) {
    if (d == me) continue;
    t.dispatch_records_sent += records[me][d];
    t.dispatch_bytes_sent += l.count_header_bytes + records[me][d] * l.record_bytes;
  }
  // Partials (or, with weights at combine, each route's row) of the records from the senders of a
  // dp group go to every member of that group.
  for (int g = 0; g < R / dp; ++g) {
    for (int m = g * dp; m < g * dp + dp; ++m) {
      if (m == me) continue;
      for (int s = g * dp; s < g * dp + dp; ++s)
        t.combine_bytes_sent += (l.weights_at_combine ? routes[s][me] : records[s][me]) * l.partial_bytes;
    }
  }
  return t;
}

// ---- StepBuffers -------------------------------------------------------------------------------

StepBuffers::StepBuffers(RankMemory& memory, const ferry_a2a_config_t& config, const A2aCase& c)
    : memory_(memory),
      config_(config),
      layout_(ep::make_layout(config)),
      scale_layout_(c.out_scale_layout),
      use_bound_m_(c.bound_m),
      rows_(size_t(layout_.experts_per_rank) * layout_.max_rows_per_expert),
      scale_bytes_(layout_.num_scales ? layout_.out_scale_buffer_bytes(scale_layout_) : 0) {
  const Layout& l = layout_;
  const size_t tokens = size_t(l.max_tokens);
  // Quantize on dispatch reads bf16 rows, wider than the fp8 payload.
  x_ = memory_.allocate(tokens * std::max<uint64_t>(l.payload_bytes, uint64_t(l.hidden) * 2));
  x_scale_ = memory_.allocate(tokens * l.num_scales * 4);
  indices_ = memory_.allocate(tokens * l.top_k * 4);
  weights_ = memory_.allocate(tokens * l.top_k * 4);
  bound_m_ = memory_.allocate(4);
  expert_y_ = memory_.allocate(rows_ * l.out_row_bytes());
  counts_ = output(size_t(l.experts_per_rank) * 4);
  expert_x_ = output(rows_ * l.payload_bytes);
  expert_scale_ = output(scale_bytes_);
  out_ = output(tokens * l.out_row_bytes());
  src_token_ = output(rows_ * 4);
  per_rank_ = output(size_t(l.experts_per_rank) * l.world_size * 4);
}

void* StepBuffers::output(size_t bytes) { return memory_.allocate(bytes + kGuardBytes); }

const int32_t* StepBuffers::bound_m_arg() const {
  return pass_bound_m_ ? static_cast<const int32_t*>(bound_m_) : nullptr;
}

void StepBuffers::set_input(const RankInput& in, int host_num_tokens) {
  quantize_ = in.quantize;
  round_scale_ = in.round_scale;
  pass_bound_m_ = use_bound_m_ || host_num_tokens >= 0;
  if (host_num_tokens >= 0) {
    num_tokens_ = host_num_tokens;
    bound_ = in.num_tokens;
  } else {
    num_tokens_ = in.num_tokens;
    bound_ = use_bound_m_ ? bound_of(in.num_tokens) : in.num_tokens;
  }
  memory_.upload(x_, in.x.data(), in.x.size());
  memory_.upload(x_scale_, in.x_scale.data(), in.x_scale.size() * 4);
  memory_.upload(indices_, in.indices.data(), in.indices.size() * 4);
  memory_.upload(weights_, in.weights.data(), in.weights.size() * 4);
  memory_.upload(bound_m_, &bound_, 4);
}

void StepBuffers::poison_outputs(const std::vector<uint8_t>& initial_out) {
  const Layout& l = layout_;
  memory_.fill(counts_, kPoison, size_t(l.experts_per_rank) * 4 + kGuardBytes);
  memory_.fill(expert_x_, kPoison, rows_ * l.payload_bytes + kGuardBytes);
  memory_.fill(expert_scale_, kPoison, scale_bytes_ + kGuardBytes);
  memory_.fill(out_, kPoison, size_t(l.max_tokens) * l.out_row_bytes() + kGuardBytes);
  memory_.fill(src_token_, kPoison, rows_ * 4 + kGuardBytes);
  memory_.fill(per_rank_, kPoison, size_t(l.experts_per_rank) * l.world_size * 4 + kGuardBytes);
  memory_.upload(out_, initial_out.data(), initial_out.size());
}

ferry_dispatch_args_t StepBuffers::dispatch_args(int flags) const {
  ferry_dispatch_args_t d{};
  d.out_expert_num_tokens = static_cast<int32_t*>(counts_);
  d.out_expert_x = expert_x_;
  d.out_expert_x_scale = layout_.num_scales ? static_cast<float*>(expert_scale_) : nullptr;
  d.dp_x = x_;
  d.dp_x_scale = layout_.num_scales && !quantize_ ? static_cast<const float*>(x_scale_) : nullptr;
  d.indices = static_cast<const int32_t*>(indices_);
  d.weights = layout_.weights_at_combine ? nullptr : static_cast<const float*>(weights_);  // not read then
  d.bound_m = bound_m_arg();
  d.num_tokens = num_tokens_;
  d.flags = flags;
  d.quantize = quantize_ ? FERRY_QUANTIZE_FP8_BLOCK : FERRY_QUANTIZE_NONE;
  d.round_scale = round_scale_ ? 1 : 0;
  d.out_scale_layout = ferry_scale_layout_t(scale_layout_);
  d.out_expert_src_token = static_cast<int32_t*>(src_token_);
  d.out_expert_num_tokens_per_rank = static_cast<int32_t*>(per_rank_);
  return d;
}

ferry_combine_args_t StepBuffers::combine_args(int flags, const void* expert_y) const {
  ferry_combine_args_t cb{};
  cb.out_tokens = out_;
  cb.indices = static_cast<const int32_t*>(indices_);
  cb.weights = static_cast<const float*>(weights_);
  cb.expert_y = expert_y;
  cb.bound_m = bound_m_arg();  // not read by combine: the dispatch's count holds
  cb.num_tokens = num_tokens_;
  cb.flags = flags;
  return cb;
}

std::string StepBuffers::check_guard(const char* name, const void* buffer, size_t bytes) {
  std::vector<uint8_t> guard(kGuardBytes);
  memory_.download(guard.data(), static_cast<const uint8_t*>(buffer) + bytes, kGuardBytes);
  const size_t at = first_other(guard, 0, kGuardBytes, kPoison);
  if (at == kGuardBytes) return "";
  return std::string(name) + ": byte " + std::to_string(at) + " past its end written";
}

std::string StepBuffers::check_dispatch(std::span<const RankInput> inputs) {
  const Layout& l = layout_;
  const ep::reference::DispatchResult want = ep::reference::dispatch(config_, inputs, l.rank);
  got_counts_.resize(l.experts_per_rank);
  got_x_.resize(rows_ * l.payload_bytes);
  got_scales_.resize(scale_bytes_);
  std::vector<int32_t> src_token(rows_), per_rank(size_t(l.experts_per_rank) * l.world_size);
  memory_.download(got_counts_.data(), counts_, got_counts_.size() * 4);
  memory_.download(got_x_.data(), expert_x_, got_x_.size());
  memory_.download(got_scales_.data(), expert_scale_, got_scales_.size());
  memory_.download(src_token.data(), src_token_, src_token.size() * 4);
  memory_.download(per_rank.data(), per_rank_, per_rank.size() * 4);

  Problems p;
  p.add_all(ep::reference::compare_dispatch(config_, want, got_counts_.data(), got_x_.data(),
                                            reinterpret_cast<const float*>(got_scales_.data()), scale_layout_));
  if (!p.str().empty()) return p.str();  // the counts may be wrong: what follows would only repeat it
  p.add_all(ep::reference::compare_sources(config_, want, src_token.data(), per_rank.data()));
  // ferry.h: rows past each expert's padded count, and row sources past its count, are not written.
  const int M = l.max_rows_per_expert;
  for (int e = 0; e < l.experts_per_rank; ++e) {
    const size_t padded = size_t(want.expert_padded_rows[e]), count = size_t(want.expert_num_tokens[e]);
    const size_t row0 = size_t(e) * M;
    const size_t at = first_other(got_x_, (row0 + padded) * l.payload_bytes, (row0 + M) * l.payload_bytes, kPoison);
    if (at != (row0 + M) * l.payload_bytes)
      p.add("out_expert_x: expert " + std::to_string(e) + " row " + std::to_string(at / l.payload_bytes - row0) +
            " written, past its padded count " + std::to_string(padded));
    const size_t width = scale_layout_ == ep::kScaleUe8m0ColumnMajor ? 1 : 4;
    const auto scale_written = [&](size_t r) {
      for (int s = 0; s < l.out_scale_slots(scale_layout_); ++s) {
        const uint64_t off = l.out_scale_offset(scale_layout_, int64_t(row0 + r), s);
        if (first_other(got_scales_, off, off + width, kPoison) != off + width) return true;
      }
      return false;
    };
    for (size_t r = padded; r < size_t(M) && l.num_scales; ++r) {
      if (scale_written(r)) {
        p.add("out_expert_x_scale: expert " + std::to_string(e) + " row " + std::to_string(r) +
              " written, past its padded count " + std::to_string(padded));
        break;
      }
    }
    for (size_t r = count; r < size_t(M); ++r) {
      if (src_token[row0 + r] != int32_t(0xeeeeeeee)) {
        p.add("out_expert_src_token: expert " + std::to_string(e) + " row " + std::to_string(r) +
              " written, past its count " + std::to_string(count));
        break;
      }
    }
  }
  p.add_all(check_guard("out_expert_num_tokens", counts_, got_counts_.size() * 4));
  p.add_all(check_guard("out_expert_x", expert_x_, got_x_.size()));
  p.add_all(check_guard("out_expert_x_scale", expert_scale_, scale_bytes_));
  p.add_all(check_guard("out_expert_src_token", src_token_, rows_ * 4));
  p.add_all(check_guard("out_expert_num_tokens_per_rank", per_rank_, per_rank.size() * 4));
  return p.str();
}

void StepBuffers::run_experts() {
  const Layout& l = layout_;
  std::vector<float> scale_rows;
  if (l.num_scales) {
    if (scale_layout_ == ep::kScaleRowMajor) {
      scale_rows.resize(got_scales_.size() / 4);
      std::memcpy(scale_rows.data(), got_scales_.data(), got_scales_.size());
    } else {
      scale_rows = ep::reference::scales_as_rows(config_, scale_layout_, got_scales_.data());
    }
  }
  std::vector<uint8_t> y(rows_ * l.out_row_bytes(), 0);
  ep::reference::apply_experts(l, got_counts_.data(), got_x_.data(), l.num_scales ? scale_rows.data() : nullptr,
                               y.data());
  memory_.upload(expert_y_, y.data(), y.size());
}

std::string StepBuffers::check_combine(std::span<const float> want, std::span<const float> magnitude,
                                       const std::vector<uint8_t>& initial_out) {
  const Layout& l = layout_;
  const size_t row = l.out_row_bytes(), total = size_t(l.max_tokens) * row;
  std::vector<uint8_t> out(total);
  memory_.download(out.data(), out_, total);
  Problems p;
  p.add_all(ep::reference::compare_combine(config_, want, magnitude, out.data(), bound_));
  // ferry.h: rows from the bound on are not written (they keep the caller's values).
  for (size_t i = size_t(bound_) * row; i < total; ++i) {
    const uint8_t before = i < initial_out.size() ? initial_out[i] : kPoison;
    if (out[i] != before) {
      p.add("out_tokens: token " + std::to_string(i / row) + " written, at or past the " + std::to_string(bound_) +
            " tokens sent (num_tokens " + std::to_string(num_tokens_) + ")");
      break;
    }
  }
  p.add_all(check_guard("out_tokens", out_, total));
  return p.str();
}

// ---- the run -----------------------------------------------------------------------------------

void run_steps(ApiA2a& a2a, const ferry_a2a_config_t& config, const A2aCase& c) {
  const auto memory = make_rank_memory(config.device);
  const Layout l = ep::make_layout(config);
  StepBuffers b(*memory, config, c);
  HalfStepCaller caller(c, l.rank);
  const std::string who = "rank " + std::to_string(l.rank) + " step ";

  for (int step = 0; step < c.steps; ++step) {
    const std::vector<RankInput> inputs = ep::reference::generate_all(config, step_spec(c, step));
    const RankInput& in = inputs[l.rank];
    b.set_input(in);
    // What every rank sends: its first bound_of(num_tokens) tokens with bound_m.
    std::vector<RankInput> sent;
    for (const RankInput& r : inputs) sent.push_back(c.bound_m ? first_tokens(r, bound_of(r.num_tokens)) : r);

    // With accumulate, out_tokens holds values combine adds to (exact in every out_dtype).
    std::vector<float> initial;
    std::vector<uint8_t> initial_out;
    if (c.accumulate) {
      initial.resize(size_t(in.num_tokens) * l.hidden);
      initial_out.resize(size_t(in.num_tokens) * l.out_row_bytes());
      for (size_t i = 0; i < initial.size(); ++i) {
        initial[i] = float(i % 5) * 0.25f - 0.5f;
        ep::dtype::store(initial_out.data(), l.out_dtype, int64_t(i), initial[i]);
      }
    }
    b.poison_outputs(initial_out);

    caller.call([&](int flags) { a2a.dispatch(b.dispatch_args(flags), memory->stream()); });
    const std::string diff = b.check_dispatch(sent);
    ASSERT_TRUE(diff.empty()) << who << step << "\n" << diff;

    b.run_experts();
    caller.call([&](int flags) {
      ferry_combine_args_t cb = b.combine_args(flags, b.expert_y());
      cb.accumulate = c.accumulate;
      a2a.combine(cb, memory->stream());
    });
    std::vector<float> expected = ep::reference::combine_standard(config, sent[l.rank]);
    std::vector<float> magnitude = ep::reference::combine_magnitude_standard(config, sent[l.rank]);
    for (size_t i = 0; i < expected.size() && i < initial.size(); ++i) {
      expected[i] += initial[i];
      magnitude[i] += std::fabs(initial[i]);
    }
    const std::string cdiff = b.check_combine(expected, magnitude, initial_out);
    ASSERT_TRUE(cdiff.empty()) << who << step << "\n" << cdiff;

    const Traffic want = expected_traffic(l, sent);
    const ferry_a2a_stats_t got = a2a.stats();
    EXPECT_EQ(got.dispatch_records_sent, want.dispatch_records_sent) << who << step << ": stats dispatch_records_sent";
    EXPECT_EQ(got.dispatch_bytes_sent, want.dispatch_bytes_sent) << who << step << ": stats dispatch_bytes_sent";
    EXPECT_EQ(got.combine_bytes_sent, want.combine_bytes_sent) << who << step << ": stats combine_bytes_sent";
  }
}

void run_rank(te::Bootstrap& bootstrap, const A2aCase& c, ferry_device_t device,
              const std::function<void(int rank, ferry_a2a_config_t&)>& own) {
  ferry_a2a_config_t config = config_of(c, bootstrap.rank(), device);
  if (own) own(bootstrap.rank(), config);
  ApiA2a a2a(config, bootstrap);
  run_steps(a2a, config, c);
}

}  // namespace ferry::testing
