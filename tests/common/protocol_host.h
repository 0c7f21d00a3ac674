// Host memory for every region of a Protocol that a test drives by hand (to corrupt what it sends, or
// to see how the constructor checks its arguments), sized by the layout and zeroed.
#pragma once
#include <cstdint>
#include <vector>

#include "csrc/plan.h"
#include "csrc/protocol.h"

namespace ferry::testing {

struct ProtocolHostRegions {
  explicit ProtocolHostRegions(const ep::Layout& l);

  // The Protocol's view of these regions; `direct`: the ranks whose bytes the caller moves itself.
  ep::ProtocolBuffers buffers(std::vector<uint8_t> direct = {});

  std::vector<uint8_t> send, recv, combine_send, combine_recv;
};

}  // namespace ferry::testing
