#include "csrc/protocol.h"

#include <algorithm>
#include <cstring>

#include "csrc/errors.h"
#include "transfer_engine/imm.h"

namespace ferry::ep {
namespace {

// Above the engine's reserved tags, with room for kinds * step tags.
constexpr uint32_t kTagBase = te::imm::kUserTagBase + 0x40;

const char* phase_text(int phase) {
  static const char* names[] = {"idle (next: dispatch SEND)", "dispatch SEND in progress",
                                "dispatch sent (next: dispatch RECV)", "dispatched (next: combine SEND)",
                                "combine SEND in progress", "combine sent (next: combine RECV)", "failed"};
  return names[phase];
}

}  // namespace

Protocol::Protocol(const Layout& layout, te::TransferEngine& engine, const ProtocolBuffers& buffers, int timeout_ms)
    : layout_(layout), engine_(engine), buffers_(buffers), timeout_ms_(timeout_ms) {
  const int R = layout_.world_size, me = layout_.rank;
  if (engine_.rank() != me || engine_.world_size() != R)
    fail(Status::invalid_argument, site("protocol setup"),
         "the layout is rank " + std::to_string(me) + " of " + std::to_string(R) + " but the transfer engine is rank " +
             std::to_string(engine_.rank()) + " of " + std::to_string(engine_.world_size()));
  validate_direct();
  send_mr_ = &engine_.register_memory(buffers_.send, layout_.send_buffer_bytes(), buffers_.kind, buffers_.cuda_device);
  recv_mr_ = &engine_.register_memory(buffers_.recv, layout_.recv_buffer_bytes(), buffers_.kind, buffers_.cuda_device);
  combine_send_mr_ =
      &engine_.register_memory(buffers_.combine_send, layout_.combine_send_bytes(), buffers_.kind, buffers_.cuda_device);
  combine_recv_mr_ =
      &engine_.register_memory(buffers_.combine_recv, layout_.combine_recv_bytes(), buffers_.kind, buffers_.cuda_device);
  const std::vector<te::RegionDesc> recv_descs = engine_.exchange(*recv_mr_, timeout_ms_);
  const std::vector<te::RegionDesc> combine_descs = engine_.exchange(*combine_recv_mr_, timeout_ms_);
  std::vector<int> ranks;
  std::vector<te::RegionDesc> recv_remote, combine_remote;
  peer_index_.assign(R, -1);
  for (int r = 0; r < R; ++r) {
    if (r == me || is_direct(r)) continue;
    peer_index_[r] = int(ranks.size());
    ranks.push_back(r);
    recv_remote.push_back(recv_descs[r]);
    combine_remote.push_back(combine_descs[r]);
  }
  if (!ranks.empty()) {
    dispatch_peers_ = &engine_.make_group(ranks, recv_remote);
    combine_peers_ = &engine_.make_group(ranks, combine_remote);
  }
  header_scratch_.resize(layout_.count_header_bytes);
  count_matrix_.assign(size_t(R) * R, 0);
  expert_counts_.assign(size_t(R) * layout_.experts_per_rank, 0);
}

void Protocol::validate_direct() {
  const int R = layout_.world_size;
  const std::vector<uint8_t>& direct = buffers_.direct;
  if (!direct.empty() && direct.size() != size_t(R))
    fail(Status::invalid_argument, site("protocol setup"),
         std::to_string(direct.size()) + " direct-peer flags for world_size " + std::to_string(R) +
             " (give none or one per rank)");
  any_direct_ = std::any_of(direct.begin(), direct.end(), [](uint8_t f) { return f != 0; });
  if (any_direct_ && layout_.private_tokens < layout_.max_tokens)
    fail(Status::invalid_argument, site("protocol setup"),
         "direct peers need private_tokens >= max_tokens (private_tokens " + std::to_string(layout_.private_tokens) +
             ", max_tokens " + std::to_string(layout_.max_tokens) +
             "): overflow offsets depend on counts the protocol does not see for direct senders");
  if (any_direct_ && layout_.dp_size != 1)
    fail(Status::unsupported, site("protocol setup"),
         "direct peers with dp_size " + std::to_string(layout_.dp_size) + " (only dp_size 1 is supported)");
  // A one-sided disagreement would show up only as a deadline (one side waits for writes the other
  // makes by hand) or as bytes written twice: every rank checks the whole matrix, so all fail
  // together with the same message.
  std::vector<uint8_t> mine(R, 0), all(size_t(R) * R, 0);
  for (int r = 0; r < R; ++r) mine[r] = is_direct(r) ? 1 : 0;
  engine_.bootstrap().allgather(mine.data(), mine.size(), all.data(), timeout_ms_);
  for (int a = 0; a < R; ++a)
    for (int b = a + 1; b < R; ++b)
      if (all[size_t(a) * R + b] != all[size_t(b) * R + a]) {
        const int yes = all[size_t(a) * R + b] ? a : b, no = yes == a ? b : a;
        fail(Status::invalid_argument, site("protocol setup"),
             "rank " + std::to_string(yes) + " treats rank " + std::to_string(no) + " as a direct peer but rank " +
                 std::to_string(no) + " does not treat rank " + std::to_string(yes) + " as one");
      }
}

Protocol::~Protocol() {
  // After a failed step, writes to a dead or stalled peer may never complete, and deregister()
  // waits for in-flight writes up to the engine's deadline: leave the regions to the engine, whose
  // destructor cancels what is still in flight (the buffers outlive the engine, see ProtocolBuffers).
  if (phase_ == Phase::broken) return;
  try {
    engine_.flush(timeout_ms_);
    for (te::MemoryRegion* mr : {send_mr_, recv_mr_, combine_send_mr_, combine_recv_mr_})
      if (mr) engine_.deregister(*mr);
  } catch (...) {
    // Same as above: the engine's destructor closes what is left.
  }
}

uint32_t Protocol::imm(Kind kind, int sender) const {
  return te::imm::encode(kTagBase + uint32_t(kind) * kStepTags + step_ % kStepTags, uint32_t(sender));
}

void Protocol::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  if (buffers_.copy) buffers_.copy(dst, src, bytes);
  else std::memcpy(dst, src, bytes);
}

bool Protocol::route_dispatch_bytes(int d, uint64_t src, uint64_t dst, uint64_t bytes,
                                    std::vector<te::ScatterDst>& dsts) {
  if (is_direct(d)) return false;  // the caller's
  if (d == layout_.rank) {
    copy(static_cast<uint8_t*>(buffers_.recv) + dst, static_cast<const uint8_t*>(buffers_.send) + src, bytes);
    return false;
  }
  dsts.push_back({uint32_t(peer_index_[d]), src, dst, bytes});
  return true;
}

void Protocol::expect_phase(Phase want, const char* operation) {
  if (phase_ == Phase::broken)
    fail(Status::internal, site(operation),
         "after a failed step; the all-to-all must be recreated (" + broken_reason_ + ")");
  if (phase_ != want)
    fail(Status::invalid_argument, site(operation),
         std::string("out of order: dispatch SEND, dispatch RECV, combine SEND and combine RECV must alternate; "
                     "state is ") + phase_text(int(phase_)));
}

template <class Fn>
void Protocol::guarded(const char* operation, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    phase_ = Phase::broken;
    broken_reason_ = std::string(operation) + ": " + e.what();
    throw;
  } catch (const std::exception& e) {
    phase_ = Phase::broken;
    broken_reason_ = std::string(operation) + ": " + e.what();
    fail(Status::internal, site(operation), e.what());
  }
}

void Protocol::wait_or_throw(std::vector<te::ImmExpect>& expects, const char* what) {
  if (expects.empty()) return;
  // Always through the engine's wait, never by polling imm_count: a caller blocked in wait keeps
  // the worker polling its CQs, and tcp and shm move the bytes of a large incoming write only
  // while the receiver polls. A rank that watched the counters itself left its worker to idle
  // sleeps of up to 1 ms, so every partially received write stalled in the socket for that long
  // (combine's writes, twice dispatch's size, overflow the socket buffers and stalled most). The
  // engine's wait still leaves the CPU to other ranks: it sleeps until the worker reports
  // arrivals, and surfaces transport failures and the missing senders at the deadline.
  try {
    engine_.wait(expects, timeout_ms_);
  } catch (const Error& e) {
    fail(e.status(), site(what), e.what());
  }
}

void Protocol::begin_dispatch() {
  expect_phase(Phase::idle, "dispatch SEND");
  guarded("dispatch SEND", [&] { engine_.flush(timeout_ms_); });
  phase_ = Phase::dispatch_packing;
}

void Protocol::post_private(bool poisoned) {
  const int R = layout_.world_size, me = layout_.rank;
  std::vector<te::ScatterDst> dsts;
  dsts.reserve(R);
  stats_ = {};
  for (int d = 0; d < R; ++d) {
    const int32_t count = poisoned ? 0 : dest_count_[d];
    const int32_t n = count < layout_.private_tokens ? count : layout_.private_tokens;
    const uint64_t src = layout_.send_section_offset(d, poisoned ? 0 : dest_offset_[d]);
    const uint64_t bytes = layout_.count_header_bytes + uint64_t(n) * layout_.record_bytes;
    const uint64_t dst = layout_.recv_private_offset(me);
    if (!route_dispatch_bytes(d, src, dst, bytes, dsts)) continue;
    stats_.dispatch_bytes_sent += bytes;
    stats_.dispatch_records_sent += uint64_t(n);
  }
  // The receiver cannot know this write's size before it arrives, so it must be one piece: by_peer.
  if (!dsts.empty()) engine_.scatter(*dispatch_peers_, *send_mr_, dsts, imm(kPrivate, me), te::NicRoute::by_peer);
}

void Protocol::post_dispatch(std::span<const int32_t> dest_count, std::span<const int64_t> dest_offset) {
  expect_phase(Phase::dispatch_packing, "dispatch SEND");
  guarded("dispatch SEND", [&] {
    const size_t R = size_t(layout_.world_size);
    if (dest_count.size() != R || dest_offset.size() != R + 1)
      fail(Status::internal, site("dispatch SEND"),
           std::to_string(dest_count.size()) + " counts and " + std::to_string(dest_offset.size()) + " offsets for " +
               std::to_string(R) + " ranks");
    dest_count_.assign(dest_count.begin(), dest_count.end());
    dest_offset_.assign(dest_offset.begin(), dest_offset.end());
    post_private(false);
  });
  phase_ = Phase::dispatch_posted;
}

void Protocol::post_dispatch_failure() {
  if (phase_ != Phase::idle && phase_ != Phase::dispatch_packing) return;  // peers already past headers
  try {
    const int R = layout_.world_size;
    std::vector<uint8_t> header(layout_.count_header_bytes, 0);
    header_counts(header.data())[0] = kPoisonCount;
    for (int d = 0; d < R; ++d)
      copy(static_cast<uint8_t*>(buffers_.send) + layout_.send_section_offset(d, 0), header.data(), header.size());
    dest_count_.assign(R, 0);
    dest_offset_.assign(R + 1, 0);
    post_private(true);
    // The poison must reach the peers even if the caller tears this rank down right away (on tcp
    // the first write to a peer also sets up its connection, which can take a while under load).
    engine_.flush(timeout_ms_);
  } catch (...) {
    // Best effort: the peers then report this rank missing at their deadline instead.
  }
  phase_ = Phase::broken;
  if (broken_reason_.empty()) broken_reason_ = "this rank's dispatch failed";
}

void Protocol::mark_failed(const std::string& reason) {
  if (phase_ == Phase::broken) return;
  phase_ = Phase::broken;
  broken_reason_ = reason;
}

void Protocol::read_count_headers() {
  const int R = layout_.world_size, epr = layout_.experts_per_rank, me = layout_.rank;
  for (int s = 0; s < R; ++s) {
    if (is_direct(s)) {
      // Never read: the caller's copy of a direct sender's header may still be on its way.
      std::fill_n(count_matrix_.begin() + ptrdiff_t(s) * R, R, 0);
      std::fill_n(expert_counts_.begin() + ptrdiff_t(s) * epr, epr, 0);
      continue;
    }
    copy(header_scratch_.data(), static_cast<const uint8_t*>(buffers_.recv) + layout_.recv_private_offset(s),
         header_scratch_.size());
    const std::string bad = check_count_header(layout_, header_scratch_.data(), &count_matrix_[size_t(s) * R],
                                               &expert_counts_[size_t(s) * epr]);
    if (!bad.empty())
      fail(Status::peer_failed, site("dispatch RECV"), "count header from rank " + std::to_string(s) + " " + bad);
  }
  // What this rank sent is known first hand, also when its own section went the caller's way.
  std::copy(dest_count_.begin(), dest_count_.end(), count_matrix_.begin() + ptrdiff_t(me) * R);
}

const RecvPlan& Protocol::wait_dispatch() {
  expect_phase(Phase::dispatch_posted, "dispatch RECV");
  guarded("dispatch RECV", [&] {
    const int R = layout_.world_size, me = layout_.rank;
    std::vector<te::ImmExpect> expects;
    for (int s = 0; s < R; ++s)
      if (s != me && !is_direct(s)) expects.push_back({imm(kPrivate, s), 1});
    wait_or_throw(expects, "dispatch: waiting for the count headers and private records");
    read_count_headers();
    // The receive plan covers only what the Protocol moved: this rank's own row is known (and
    // kept in count_matrix_), but when this rank is direct its records to itself are the caller's.
    int32_t& to_self = count_matrix_[size_t(me) * R + me];
    const int32_t sent_to_self = to_self;
    if (is_direct(me)) to_self = 0;
    recv_plan_ = make_recv_plan(layout_, count_matrix_.data(), expert_counts_.data());
    to_self = sent_to_self;

    // Overflow: records beyond the private region, at offsets every rank derives from the matrix.
    std::vector<te::ScatterDst> dsts;
    for (int d = 0; d < R; ++d) {
      const int n = overflow_count(layout_, dest_count_[d]);
      if (n == 0) continue;
      const uint64_t src = layout_.send_record_offset(d, dest_offset_[d], layout_.private_tokens);
      const int64_t before = overflow_before(layout_, count_matrix_.data(), me, d);
      const uint64_t dst = layout_.overflow_offset() + uint64_t(before) * layout_.record_bytes;
      const uint64_t bytes = uint64_t(n) * layout_.record_bytes;
      if (!route_dispatch_bytes(d, src, dst, bytes, dsts)) continue;
      stats_.dispatch_bytes_sent += bytes;
      stats_.dispatch_records_sent += uint64_t(n);
      stats_.overflow_records_sent += uint64_t(n);
    }
    if (!dsts.empty()) engine_.scatter(*dispatch_peers_, *send_mr_, dsts, imm(kOverflow, me));
    expects.clear();
    for (int s = 0; s < R; ++s) {
      const int n = overflow_count(layout_, recv_plan_.count[s]);
      if (s != me && !is_direct(s) && n > 0)
        expects.push_back({imm(kOverflow, s), engine_.pieces_for(uint64_t(n) * layout_.record_bytes)});
    }
    wait_or_throw(expects, "dispatch: waiting for overflow records");
  });
  phase_ = Phase::dispatched;
  return recv_plan_;
}

void Protocol::begin_combine() {
  expect_phase(Phase::dispatched, "combine SEND");
  guarded("combine SEND", [&] { engine_.flush(timeout_ms_); });
  phase_ = Phase::combine_packing;
}

void Protocol::post_combine() {
  expect_phase(Phase::combine_packing, "combine SEND");
  if (any_direct_)
    fail(Status::internal, site("combine SEND"),
         "with direct peers it needs the receive counts (post_combine(recv_count)); nothing was sent");
  if (layout_.weights_at_combine)
    fail(Status::internal, site("combine SEND"),
         "with weights at combine it needs each record's routes (post_combine(recv_count, record_routes)); "
         "nothing was sent");
  guarded("combine SEND", [&] { post_partials(recv_plan_.count, {}); });
  phase_ = Phase::combine_posted;
}

void Protocol::post_combine(std::span<const int32_t> recv_count, std::span<const int32_t> record_routes) {
  expect_phase(Phase::combine_packing, "combine SEND");
  guarded("combine SEND", [&] {
    const int R = layout_.world_size, me = layout_.rank;
    auto bad = [&](const std::string& what) { fail(Status::internal, site("combine SEND"), what); };
    if (recv_count.size() != size_t(R))
      bad(std::to_string(recv_count.size()) + " receive counts for " + std::to_string(R) + " ranks");
    for (int s = 0; s < R; ++s) {
      const int32_t announced = count_matrix_[size_t(s) * R + me];
      if (!is_direct(s) && recv_count[s] != announced)
        bad("receive count " + std::to_string(recv_count[s]) + " for sender " + std::to_string(s) +
             " but its count header announced " + std::to_string(announced));
      // Bounds the receive order, and so every source offset, by the combine-send buffer.
      if (recv_count[s] < 0 || recv_count[s] > layout_.max_tokens)
        bad("receive count " + std::to_string(recv_count[s]) + " for sender " + std::to_string(s) +
             " outside [0, max_tokens=" + std::to_string(layout_.max_tokens) + "]");
    }
    if (layout_.weights_at_combine) {
      int64_t records = 0;
      for (int s = 0; s < R; ++s) records += recv_count[s];
      if (int64_t(record_routes.size()) != records)
        bad(std::to_string(record_routes.size()) + " record route counts for " + std::to_string(records) + " records");
      for (size_t g = 0; g < record_routes.size(); ++g)
        if (record_routes[g] < 1 || record_routes[g] > layout_.combine_rows)
          bad("record " + std::to_string(g) + " has " + std::to_string(record_routes[g]) + " routes, outside [1, " +
              std::to_string(layout_.combine_rows) + "]");
    }
    post_partials(recv_count, record_routes);
  });
  phase_ = Phase::combine_posted;
}

void Protocol::post_partials(std::span<const int32_t> recv_count, std::span<const int32_t> record_routes) {
  const int R = layout_.world_size, me = layout_.rank, dp = layout_.dp_size;
  const uint64_t pb = layout_.combine_slot_bytes();
  std::vector<int64_t> record_base(R + 1, 0);
  for (int s = 0; s < R; ++s) record_base[s + 1] = record_base[s] + recv_count[s];
  std::vector<te::ScatterDst> dsts;
  stats_.combine_bytes_sent = 0;
  // Every member of a dp group gets the partials of the whole group's tokens; every engine peer
  // gets at least an empty write, whose arrival proves this rank is done reading its receive region.
  for (int g = 0; g < R / dp; ++g) {
    for (int m = g * dp; m < g * dp + dp; ++m) {
      if (is_direct(m)) continue;  // the caller's
      const size_t first = dsts.size();
      for (int s = g * dp; s < g * dp + dp; ++s) {
        const int32_t n = recv_count[s];
        if (n == 0) continue;
        const uint64_t src = uint64_t(record_base[s]) * pb;
        const uint64_t dst = uint64_t(combine_slot_base(layout_, count_matrix_.data(), s, me)) * pb;
        // Partials are one contiguous run per sender; rows only the slots' used part, slot by slot.
        const int pieces = layout_.weights_at_combine ? n : 1;
        for (int p = 0; p < pieces; ++p) {
          const uint64_t at = layout_.weights_at_combine ? uint64_t(p) * pb : 0;
          const uint64_t bytes = layout_.weights_at_combine
                                     ? uint64_t(record_routes[size_t(record_base[s] + p)]) * layout_.partial_bytes
                                     : uint64_t(n) * pb;
          if (m == me) {
            copy(static_cast<uint8_t*>(buffers_.combine_recv) + dst + at,
                 static_cast<const uint8_t*>(buffers_.combine_send) + src + at, bytes);
            continue;
          }
          dsts.push_back({uint32_t(peer_index_[m]), src + at, dst + at, bytes});
          stats_.combine_bytes_sent += bytes;
        }
      }
      if (m != me && dsts.size() == first) dsts.push_back({uint32_t(peer_index_[m]), 0, 0, 0});
    }
  }
  if (!dsts.empty()) engine_.scatter(*combine_peers_, *combine_send_mr_, dsts, imm(kCombine, me));
}

void Protocol::wait_combine(std::span<const int32_t> slot_routes) {
  expect_phase(Phase::combine_posted, "combine RECV");
  guarded("combine RECV", [&] {
    const int R = layout_.world_size, me = layout_.rank, dp = layout_.dp_size;
    const int first_member = me - layout_.dp_member(me);
    if (layout_.weights_at_combine && int64_t(slot_routes.size()) < dest_offset_[R])
      fail(Status::internal, site("combine RECV"),
           std::to_string(slot_routes.size()) + " slot route counts for " + std::to_string(dest_offset_[R]) +
               " send slots");
    std::vector<te::ImmExpect> expects;
    for (int d = 0; d < R; ++d) {
      if (d == me || is_direct(d)) continue;
      uint32_t pieces = 0;
      if (layout_.weights_at_combine) {  // dp_size 1: this rank's own run to d, slot by slot
        for (int64_t slot = dest_offset_[d]; slot < dest_offset_[d] + dest_count_[d]; ++slot)
          pieces += engine_.pieces_for(uint64_t(slot_routes[size_t(slot)]) * layout_.partial_bytes);
      } else {
        for (int j = first_member; j < first_member + dp; ++j) {
          const int32_t n = count_matrix_[size_t(j) * R + d];
          if (n > 0) pieces += engine_.pieces_for(uint64_t(n) * layout_.partial_bytes);
        }
      }
      expects.push_back({imm(kCombine, d), pieces == 0 ? 1u : pieces});
    }
    wait_or_throw(expects, "combine: waiting for partials");
  });
  phase_ = Phase::idle;
  ++step_;
}

}  // namespace ferry::ep
