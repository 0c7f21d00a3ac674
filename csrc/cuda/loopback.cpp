#include "csrc/cuda/loopback.h"

#include "csrc/cuda/cuda_check.h"

namespace ferry::cuda {
namespace {

int64_t row_prefix(const int32_t* cm, int R, int s, int d) {
  int64_t n = 0;
  for (int j = 0; j < d; ++j) n += cm[int64_t(s) * R + j];
  return n;
}
int64_t column_prefix(const int32_t* cm, int R, int s, int d) {
  int64_t n = 0;
  for (int j = 0; j < s; ++j) n += cm[int64_t(j) * R + d];
  return n;
}

}  // namespace

void loopback_dispatch(const ep::Layout& l, const int32_t* cm, int s, int d, const uint8_t* send_buf,
                       uint8_t* recv_buf, cudaStream_t stream) {
  const int R = l.world_size;
  const int64_t count = cm[int64_t(s) * R + d];
  const int64_t before = row_prefix(cm, R, s, d);
  const int64_t priv = count < l.private_tokens ? count : l.private_tokens;
  // Header and private records are contiguous on both sides.
  check_cuda(cudaMemcpyAsync(recv_buf + l.recv_private_offset(s), send_buf + l.send_section_offset(d, before),
                             l.count_header_bytes + priv * l.record_bytes, cudaMemcpyDefault, stream),
             "loopback dispatch (private)");
  if (count > priv) {
    const int64_t over = ep::overflow_before(l, cm, s, d);
    check_cuda(cudaMemcpyAsync(recv_buf + l.recv_record_offset(s, priv, over),
                               send_buf + l.send_record_offset(d, before, priv), (count - priv) * l.record_bytes,
                               cudaMemcpyDefault, stream),
               "loopback dispatch (overflow)");
  }
}

void loopback_combine(const ep::Layout& l, const int32_t* cm, int s, int d, const uint8_t* dest_partials,
                      uint8_t* sender_combine_recv, cudaStream_t stream) {
  const int R = l.world_size;
  const int64_t count = cm[int64_t(s) * R + d];
  if (count == 0) return;
  // Whole slots: with weights at combine a slot's unused rows come along, where nobody reads them.
  const uint64_t slot = l.combine_slot_bytes();
  check_cuda(cudaMemcpyAsync(sender_combine_recv + row_prefix(cm, R, s, d) * slot,
                             dest_partials + column_prefix(cm, R, s, d) * slot, count * slot, cudaMemcpyDefault,
                             stream),
             "loopback combine");
}

}  // namespace ferry::cuda
