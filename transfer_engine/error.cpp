#include "transfer_engine/error.h"

namespace ferry {

const char* status_name(Status s) {
  switch (s) {
    case Status::ok: return "ok";
    case Status::invalid_argument: return "invalid argument";
    case Status::timeout: return "timeout";
    case Status::peer_failed: return "peer failed";
    case Status::transport: return "transport error";
    case Status::out_of_memory: return "out of memory";
    case Status::unsupported: return "unsupported";
    case Status::internal: return "internal error";
  }
  return "unknown status";
}

void raise(Status status, const std::string& what) { throw Error(status, what); }

}  // namespace ferry
