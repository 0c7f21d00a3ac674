#include "transfer_engine/random.h"

#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "transfer_engine/error.h"

namespace ferry::te {

void random_bytes(void* out, size_t bytes) {
  auto* p = static_cast<uint8_t*>(out);
  while (bytes > 0) {
    const ssize_t n = ::getrandom(p, bytes, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      raise(Status::internal, std::string("getrandom: ") + std::strerror(errno));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
}

uint64_t random_u64() {
  uint64_t value = 0;
  random_bytes(&value, sizeof(value));
  return value;
}

}  // namespace ferry::te
