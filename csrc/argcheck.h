// The front door's checks (NCCL's argcheck is the model): the C API runs them before any backend
// sees a config or a call, so the backends trust what they get. Each failure names the field or
// argument, its value and what is expected. A call whose arguments fail here has changed nothing:
// the handle is as it was and the call may be made again.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "csrc/errors.h"
#include "csrc/plan.h"
#include "ferry/ferry.h"

namespace ferry::ep {

// Records name the receiver's local expert in 16 bits (RecordHeader::local_expert).
constexpr int kMaxExpertsPerRank = INT16_MAX;
// Rows of one local expert, and every row index derived from them, are ints.
constexpr int kMaxExpertAlignment = 1 << 30;
// No config may ask for buffers beyond this (1 PiB): sizes stay far from 64-bit overflow.
constexpr uint64_t kMaxBufferBytes = uint64_t(1) << 50;

static_assert(kMaxTopK == FERRY_MAX_TOP_K && kMaxRanks == FERRY_MAX_RANKS &&
              kMaxExpertsPerRank == FERRY_MAX_EXPERTS_PER_RANK && kAlign == FERRY_ROW_ALIGN_BYTES,
              "ferry.h states the limits the library enforces");

// The int a C caller stored in an enum field. Loading an out-of-range value through the C++ enum
// type is undefined behaviour, so the field is read as the bytes of its underlying type.
template <class Enum>
int enum_value(const Enum& field) {
  static_assert(std::is_enum_v<Enum>);
  std::underlying_type_t<Enum> value;
  std::memcpy(&value, &field, sizeof value);
  return static_cast<int>(value);
}

const char* dtype_name(int dtype);    // "bf16", "f16", "f32", "fp8_e4m3", "unknown"
const char* device_name(int device);  // "host", "cuda", "unknown"
const char* combine_weights_name(int combine_weights);  // "at dispatch", "at combine", "unknown"

// Every field of a config on its own and together, including each limit a later step relies on
// (16-byte rows, int16 local experts, row counts that fit an int, NICs the engine can open, and the
// CUDA backend's own limits for FERRY_DEVICE_CUDA). Status::invalid_argument, or
// Status::unsupported for what the library cannot do. make_layout runs it.
void check_config(const ferry_a2a_config_t& config);

// The config as the backends run it: defaults applied (timeout_ms 0 -> FERRY_DEFAULT_TIMEOUT_MS).
// `config` must have passed check_config.
ferry_a2a_config_t resolve_config(const ferry_a2a_config_t& config);

// The config names the bootstrap's rank and world size.
void check_bootstrap(const ferry_a2a_config_t& config, int bootstrap_rank, int bootstrap_world_size);

// The halves of a step on one handle, in the only order they may come: dispatch SEND, dispatch RECV,
// combine SEND, combine RECV (FERRY_SEND_RECV is two halves in one call).
class StepOrder {
 public:
  // Status::invalid_argument when `flags` is not FERRY_SEND, FERRY_RECV or FERRY_SEND_RECV, or asks
  // for a half other than the next one; `site` says where.
  void check(bool dispatch, int flags, const Site& site) const;
  // After the call's halves ran.
  void advance(bool dispatch, int flags);
  int64_t step() const { return step_; }  // steps completed (combine RECVs) so far

 private:
  enum Half : int { kDispatchSend = 0, kDispatchRecv = 1, kCombineSend = 2, kCombineRecv = 3 };
  Half next_ = kDispatchSend;
  int64_t step_ = 0;
};

// The call's own arguments: flags, pointers, token counts (what can be checked without reading
// the caller's buffers, which may be device memory). Run after StepOrder::check.
void check_dispatch_args(const Layout& layout, const ferry_dispatch_args_t& args, const Site& site);
// `dispatch_num_tokens`: num_tokens of this step's dispatch, which combine RECV must repeat.
void check_combine_args(const Layout& layout, const ferry_combine_args_t& args, int dispatch_num_tokens,
                        const Site& site);

}  // namespace ferry::ep
