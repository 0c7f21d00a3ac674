// Unpredictable bytes from the kernel (getrandom): handshake nonces and memory keys.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ferry::te {

// Throws ferry::Error(Status::internal) when the kernel cannot provide them.
void random_bytes(void* out, size_t bytes);
uint64_t random_u64();

}  // namespace ferry::te
