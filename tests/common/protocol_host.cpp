#include "tests/common/protocol_host.h"

#include <utility>

namespace ferry::testing {

ProtocolHostRegions::ProtocolHostRegions(const ep::Layout& l)
    : send(l.send_buffer_bytes()),
      recv(l.recv_buffer_bytes()),
      combine_send(l.combine_send_bytes()),
      combine_recv(l.combine_recv_bytes()) {}

ep::ProtocolBuffers ProtocolHostRegions::buffers(std::vector<uint8_t> direct) {
  ep::ProtocolBuffers b;
  b.send = send.data();
  b.recv = recv.data();
  b.combine_send = combine_send.data();
  b.combine_recv = combine_recv.data();
  b.direct = std::move(direct);
  return b;
}

}  // namespace ferry::testing
