// One rank's run of an A2aCase through the C API, on the host or the CUDA backend alike: each step's
// inputs regenerated from the seed (every rank's, so each rank checks itself), the outputs poisoned,
// then dispatch and combine driven as the case says (split halves, skew, bound_m, accumulate,
// weights at combine, quantize on dispatch, scale layouts), and after each step:
//  - every count, payload byte and scale of the dispatch output and its row sources equal the
//    reference's (ferry_reference), padding rows included, and nothing past them is written;
//  - combine equals the reference's sums within the output dtype's tolerance (plus the previous
//    values with accumulate), and rows from bound_m on keep their bytes;
//  - ferry_a2a_stats reports the records and bytes this rank's routes call for;
//  - no output buffer is written past its end.
//
//   testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
//     testing::run_rank(b, c, FERRY_DEVICE_CUDA);
//   });
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "csrc/plan.h"
#include "csrc/reference.h"
#include "ferry/ferry.h"
#include "tests/common/a2a_case.h"
#include "tests/common/api_a2a.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::testing {

// Memory of the kind a backend reads: host memory for FERRY_DEVICE_HOST, device memory of GPU 0 for
// FERRY_DEVICE_CUDA (with a blocking stream, so the plain copies here are ordered with its work).
class RankMemory {
 public:
  virtual ~RankMemory() = default;
  // Owned by this object; valid until it goes.
  virtual void* allocate(size_t bytes) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill(void* dst, uint8_t byte, size_t bytes) = 0;
  // The stream argument of ferry_a2a_dispatch/combine.
  virtual void* stream() = 0;
};
std::unique_ptr<RankMemory> make_rank_memory(ferry_device_t device);

// A step's inputs cut to the first m tokens (what a dispatch with *bound_m = m sends).
ep::reference::RankInput first_tokens(const ep::reference::RankInput& in, int m);

// The token count a case with bound_m passes for a step of num_tokens tokens: about a third fewer,
// 0 for a single token, so that both "some tokens left out" and "none sent" occur.
int bound_of(int num_tokens);

// What ferry_a2a_stats says after a step (ferry.h): the records and bytes rank `rank` sent to the
// other ranks, derived from every rank's inputs (already cut to their bound).
struct Traffic {
  uint64_t dispatch_records_sent = 0;
  uint64_t dispatch_bytes_sent = 0;
  uint64_t combine_bytes_sent = 0;
};
Traffic expected_traffic(const ep::Layout& layout, std::span<const ep::reference::RankInput> inputs);

// The buffers of one rank's dispatch and combine, sized for max_tokens, in `memory`; each output has
// a guard region after it. The case decides the scale layout, quantize and bound_m.
class StepBuffers {
 public:
  StepBuffers(RankMemory& memory, const ferry_a2a_config_t& config, const A2aCase& c);

  // Uploads a step's inputs. The calls pass num_tokens = in.num_tokens and, when the case has
  // bound_m, *bound_m = bound_of(in.num_tokens). With host_num_tokens >= in.num_tokens instead (a
  // step captured once for inputs of varying size), they pass num_tokens = host_num_tokens and
  // *bound_m = in.num_tokens.
  void set_input(const ep::reference::RankInput& in, int host_num_tokens = -1);
  // The tokens the step just set sends: the count behind bound_m, or num_tokens.
  int bound() const { return bound_; }
  // Every output and its guard to kPoison; out_tokens to `initial` (the previous values combine
  // accumulates into) in its first num_tokens rows.
  void poison_outputs(const std::vector<uint8_t>& initial_out = {});
  ferry_dispatch_args_t dispatch_args(int flags) const;
  // expert_y: the expert outputs (device or host memory as the backend reads), or expert_y() below.
  ferry_combine_args_t combine_args(int flags, const void* expert_y) const;
  void* expert_y() const { return expert_y_; }
  void* expert_x() const { return expert_x_; }

  // Dispatch output against the reference (counts, every byte up to each expert's padded count,
  // scales in the case's layout, row sources), nothing written past the padded rows or the buffers;
  // returns the first differences, empty when equal. Keeps what the expert model needs.
  std::string check_dispatch(std::span<const ep::reference::RankInput> inputs);
  // Runs the reference's expert model on the dispatch output just checked and uploads expert_y.
  void run_experts();
  // Combine output against `want` (fp32 sums; `magnitude` for the tolerance) in the bound's rows;
  // rows from the bound to num_tokens keep `initial_out`'s bytes (or the poison), no byte after.
  std::string check_combine(std::span<const float> want, std::span<const float> magnitude,
                            const std::vector<uint8_t>& initial_out);

  static constexpr uint8_t kPoison = 0xee;
  static constexpr size_t kGuardBytes = 256;

 private:
  void* output(size_t bytes);  // allocates bytes + guard
  const int32_t* bound_m_arg() const;
  std::string check_guard(const char* name, const void* buffer, size_t bytes);

  RankMemory& memory_;
  ferry_a2a_config_t config_;
  ep::Layout layout_;
  int scale_layout_;
  bool use_bound_m_;
  bool pass_bound_m_ = false;  // the calls pass bound_m (else NULL: num_tokens is exact)
  size_t rows_;
  size_t scale_bytes_;
  int num_tokens_ = 0, bound_ = 0;
  bool quantize_ = false, round_scale_ = false;
  void *x_, *x_scale_, *indices_, *weights_, *bound_m_;
  void *counts_, *expert_x_, *expert_scale_, *expert_y_, *out_, *src_token_, *per_rank_;
  // The last dispatch output, downloaded.
  std::vector<int32_t> got_counts_;
  std::vector<uint8_t> got_x_, got_scales_;
};

// The case's steps on an all-to-all created from `config` (its device picks the memory).
void run_steps(ApiA2a& a2a, const ferry_a2a_config_t& config, const A2aCase& c);

// One rank's whole run: create the all-to-all on `device` (with `own` applied to this rank's
// config), then the case's steps.
void run_rank(te::Bootstrap& bootstrap, const A2aCase& c, ferry_device_t device,
              const std::function<void(int rank, ferry_a2a_config_t&)>& own = {});

}  // namespace ferry::testing
