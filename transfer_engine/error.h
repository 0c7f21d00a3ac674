// Errors shared by every Ferry layer: a status code a C caller can switch on, plus text that says
// which rank, which peer and which operation failed.
#pragma once
#include <stdexcept>
#include <string>

namespace ferry {

// Values match ferry_status_t in include/ferry/ferry.h.
enum class Status : int {
  ok = 0,
  invalid_argument = 1,
  timeout = 2,
  peer_failed = 3,
  transport = 4,
  out_of_memory = 5,
  unsupported = 6,
  internal = 7,
};

const char* status_name(Status s);

class Error : public std::runtime_error {
 public:
  Error(Status status, const std::string& what) : std::runtime_error(what), status_(status) {}
  Status status() const { return status_; }

 private:
  Status status_;
};

[[noreturn]] void raise(Status status, const std::string& what);

}  // namespace ferry
