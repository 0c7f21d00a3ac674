// An all-to-all through the C API, the library's front door, on the bootstrap run_ranks gives each
// rank. Failed calls throw ferry::Error with the call's status and ferry_last_error(), so a test
// reads like the calls it makes.
#pragma once
#include <string>
#include <utility>

#include "csrc/api.h"
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"
#include "transfer_engine/error.h"

namespace ferry::testing {

inline void check_api(ferry_status_t status) {
  if (status != FERRY_OK) raise(static_cast<Status>(status), ferry_last_error());
}

class ApiA2a {
 public:
  ApiA2a(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap) : bootstrap_(api::borrow_bootstrap(bootstrap)) {
    const ferry_status_t status = ferry_a2a_create(&config, bootstrap_, &a2a_);
    if (status != FERRY_OK) {
      const std::string what = ferry_last_error();
      ferry_bootstrap_destroy(bootstrap_);
      raise(static_cast<Status>(status), what);
    }
  }
  ~ApiA2a() {
    if (a2a_) ferry_a2a_destroy(a2a_);
    ferry_bootstrap_destroy(bootstrap_);
  }
  ApiA2a(const ApiA2a&) = delete;
  ApiA2a& operator=(const ApiA2a&) = delete;

  void dispatch(const ferry_dispatch_args_t& args, void* stream = nullptr) {
    check_api(ferry_a2a_dispatch(a2a_, &args, stream));
  }
  void combine(const ferry_combine_args_t& args, void* stream = nullptr) {
    check_api(ferry_a2a_combine(a2a_, &args, stream));
  }
  ferry_a2a_stats_t stats() const {
    ferry_a2a_stats_t s{};
    check_api(ferry_a2a_stats(a2a_, &s));
    return s;
  }
  ferry_a2a_t handle() const { return a2a_; }
  ferry_bootstrap_t bootstrap() const { return bootstrap_; }
  // Destroys the handle now (the test then holds a dead handle value).
  ferry_a2a_t release() { return std::exchange(a2a_, nullptr); }

 private:
  ferry_bootstrap_t bootstrap_ = nullptr;
  ferry_a2a_t a2a_ = nullptr;
};

}  // namespace ferry::testing
