// The all-to-all exchange over the TransferEngine, shared by the host backend and the CUDA backend:
// the backends pack and unpack (CPU loops here, kernels there) into the buffers this class
// registers and moves. Nothing here reads or writes token payloads.
//
// One step = dispatch (post_dispatch, wait_dispatch) then combine (post_combine, wait_combine), in
// that order; anything else throws Status::invalid_argument.
//
// Immediates: imm::encode(tag, sender) with tag = kind (dispatch-private, dispatch-overflow,
// combine) and step sequence mod kStepTags. A fast peer is at most one step ahead (see "Back-to-back
// steps" below), so an early arrival of step n+1 carries another tag and is never counted for step n.
//
// Back-to-back steps with ranks of different speeds. Rank A finishes wait_combine of step n only
// after every peer B wrote A its combine partials of step n, and B posts those only after it has
// unpacked its step-n dispatch records into the caller's output and read their headers into its
// combine bookkeeping (post_combine is called after combine-send packing). So when A starts step n+1
// and writes into B's receive region, B no longer reads it. A's own send and combine-send buffers
// are reused only after flush() (local completion of every earlier write). A's combine region is
// written by B at step n+1 only after B received A's step n+1 dispatch, which A posts after it
// consumed its step-n combine region. Hence one receive region per peer suffices, no parity bit.
//
// Direct peers. A backend may move some ranks' bytes itself (the CUDA backend copies to peers on
// the same node through CUDA IPC): ProtocolBuffers::direct names them. The caller then copies this
// rank's dispatch section [count header | run] into each direct rank's receive region at
// recv_private_offset(this rank), and each direct sender's partials into that sender's combine
// region at the slots the records had in its send run, exactly where the Protocol would have
// written them; the Protocol writes to, reads the headers of and waits for only the other
// ("engine") peers. Direct peers need private_tokens >= max_tokens (the overflow offsets would
// depend on counts the Protocol never sees) and dp_size 1. The back-to-back argument above still
// holds because the caller's direct copies obey the same order: a rank pushes step n+1's records
// to a direct peer only after its combine of step n completed, i.e. after that peer wrote it the
// step-n partials, which the peer does only after reading its receive region; and it writes a
// direct peer's step n+1 partials only after that peer's step n+1 records arrived, which the peer
// pushes only after it consumed its step-n combine region. Each byte range of a region has one
// writer path (engine or caller), so the two never race.
//
// Peers are not trusted: count headers are checked (counts within max_tokens, expert counts
// consistent) before any offset is derived from them; record headers are checked by the unpacker
// with check_record_header (plan.h). A peer's bad data fails the step with Status::peer_failed
// naming it; every wait has the configured deadline and names the peers still missing.
#pragma once
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "csrc/errors.h"
#include "csrc/plan.h"
#include "transfer_engine/engine.h"

namespace ferry::ep {

// Buffers owned by the backend: host memory for the host backend, pinned host or device memory for
// the CUDA backend. Sizes from Layout: send_buffer_bytes, recv_buffer_bytes, combine_send_bytes,
// combine_recv_bytes. They must outlive the TransferEngine, not only the Protocol: after a failed
// step the Protocol leaves them registered for the engine's destructor to close.
struct ProtocolBuffers {
  void* send = nullptr;
  void* recv = nullptr;
  void* combine_send = nullptr;
  void* combine_recv = nullptr;
  te::MemoryKind kind = te::MemoryKind::host;
  int cuda_device = -1;
  // Copies between any of these buffers and host memory (count headers are read through it, and a
  // rank's records to itself never cross the network). Empty: memcpy.
  std::function<void(void* dst, const void* src, size_t bytes)> copy;
  // Empty, or one flag per rank (world_size): the ranks, this one included or not, whose dispatch
  // sections and combine partials the caller moves itself (see "Direct peers" above). Must be
  // symmetric across ranks (a treats b as direct exactly when b treats a as direct); the
  // constructor checks that collectively.
  std::vector<uint8_t> direct;
};

struct ProtocolStats {
  uint64_t dispatch_bytes_sent = 0;  // last step, over the network
  uint64_t combine_bytes_sent = 0;
  uint64_t dispatch_records_sent = 0;
  uint64_t overflow_records_sent = 0;
};

class Protocol {
 public:
  static constexpr uint32_t kStepTags = 8;  // step sequence modulus carried in each tag

  // Collective over the engine's bootstrap (registers and exchanges every region, and the direct
  // flags, with every rank). Throws Status::invalid_argument for a direct list of the wrong size,
  // direct peers with private_tokens < max_tokens, or direct flags that disagree between ranks;
  // Status::unsupported for direct peers with dp_size > 1.
  Protocol(const Layout& layout, te::TransferEngine& engine, const ProtocolBuffers& buffers, int timeout_ms);
  ~Protocol();
  Protocol(const Protocol&) = delete;
  Protocol& operator=(const Protocol&) = delete;

  const Layout& layout() const { return layout_; }
  te::TransferEngine& engine() { return engine_; }

  // Call before packing the send buffer: checks the step order and waits for local completion of
  // every earlier write out of it.
  void begin_dispatch();
  // The send buffer holds, for every destination d, [count header | run of dest_count[d] records]
  // at layout.send_section_offset(d, dest_offset[d]). Writes every engine peer its section's
  // header and first min(count, private_tokens) records, one write per peer, also when the count
  // is 0 (and copies this rank's own section unless it is direct). dest_count and dest_offset
  // cover every rank, direct ones included.
  void post_dispatch(std::span<const int32_t> dest_count, std::span<const int64_t> dest_offset);
  // Instead of post_dispatch when this rank cannot take part in the step (e.g. invalid input):
  // writes every engine peer a poisoned count header so that they fail at once naming this rank.
  // Direct peers are the caller's to tell.
  void post_dispatch_failure();
  // Waits for every engine peer's count header, checks them, learns the count matrix, writes the
  // overflow records (at offsets every rank derives from the matrix) and waits for the peers'
  // overflow. Afterwards every received record lies at recv_record_offset(sender, index).
  // With direct peers, this waits for none of them and reads none of their headers: their rows of
  // count_matrix() stay 0, so recv_plan() covers only the senders the Protocol moved (the caller
  // knows what its direct senders sent). This rank's own row always comes from post_dispatch's
  // dest_count.
  const RecvPlan& wait_dispatch();

  // Call before writing partials into the combine-send buffer.
  void begin_combine();
  // The combine-send buffer holds one combine slot (combine_slot_bytes) per received record in
  // receive order (record_base of the RecvPlan): its partial, or with weights at combine its rows,
  // one per route. Writes each sender's slots to every member of its dp group, at the slots the
  // records had in the sender's send runs; every peer gets a write, possibly empty. With direct
  // peers, or with weights at combine, it throws Status::internal before doing anything (the
  // receive order then depends on counts only the caller knows, or the rows on routes only the
  // caller read); use the overload.
  void post_combine();
  // recv_count[s] (world_size entries): records received from sender s as the caller laid them
  // out, sender-major, so sender s's slots start at record sum_{s' < s} recv_count[s']. Each
  // engine sender's entry must equal what its count header announced for this rank
  // (Status::internal naming the sender and both values otherwise). With weights at combine,
  // record_routes[g] (one per record, receive order) is the number of rows in slot g, in [1,
  // combine_rows]; only those travel. Writes only to engine peers (and copies this rank's own
  // unless it is direct).
  void post_combine(std::span<const int32_t> recv_count, std::span<const int32_t> record_routes = {});
  // Waits for every engine peer's partials (or rows); then slot i lies at combine_recv + i *
  // combine_slot_bytes (slots of member j of this rank's dp group follow those of members before
  // it; slots of records sent to direct peers are the caller's). With weights at combine,
  // slot_routes[i] (SendPlan::slot_routes of this rank's dispatch) says how many rows slot i gets.
  void wait_combine(std::span<const int32_t> slot_routes = {});

  // The backend failed between the steps above (e.g. a bad record while unpacking): later calls
  // throw Status::internal with this reason; peers see this rank missing at their deadline.
  void mark_failed(const std::string& reason);

  const RecvPlan& recv_plan() const { return recv_plan_; }
  // count_matrix()[s * world_size + d]: records rank s sent to rank d in this step (0 for direct
  // senders other than this rank: the Protocol never reads their headers).
  const std::vector<int32_t>& count_matrix() const { return count_matrix_; }
  uint64_t recv_record_offset(int sender, int64_t index) const {
    return layout_.recv_record_offset(sender, index, recv_plan_.overflow_before[sender]);
  }
  uint32_t step() const { return step_; }
  const ProtocolStats& stats() const { return stats_; }  // what crossed the engine, direct peers not
  bool is_direct(int rank) const { return !buffers_.direct.empty() && buffers_.direct[rank] != 0; }
  // Some rank's bytes are the caller's: post_combine then needs the receive counts.
  bool has_direct_peers() const { return any_direct_; }

 private:
  enum class Phase { idle, dispatch_packing, dispatch_posted, dispatched, combine_packing, combine_posted, broken };
  enum Kind : uint32_t { kPrivate = 0, kOverflow = 1, kCombine = 2 };
  uint32_t imm(Kind kind, int sender) const;
  Site site(std::string_view operation) const { return {layout_.rank, int64_t(step_), operation}; }
  void expect_phase(Phase want, const char* operation);
  void copy(void* dst, const void* src, size_t bytes);
  // Bytes [src, src + bytes) of the send buffer for rank d's receive buffer at dst: copied here when
  // d is this rank, else queued in `dsts`. Returns whether they go over the network.
  bool route_dispatch_bytes(int d, uint64_t src, uint64_t dst, uint64_t bytes,
                            std::vector<te::ScatterDst>& dsts);
  void validate_direct();
  void post_private(bool poisoned);
  void post_partials(std::span<const int32_t> recv_count, std::span<const int32_t> record_routes);
  void wait_or_throw(std::vector<te::ImmExpect>& expects, const char* what);
  void read_count_headers();
  template <class Fn>
  void guarded(const char* operation, Fn&& fn);

  Layout layout_;
  te::TransferEngine& engine_;
  ProtocolBuffers buffers_;
  int timeout_ms_;
  te::MemoryRegion* send_mr_ = nullptr;
  te::MemoryRegion* recv_mr_ = nullptr;
  te::MemoryRegion* combine_send_mr_ = nullptr;
  te::MemoryRegion* combine_recv_mr_ = nullptr;
  // Engine peers only (neither this rank nor direct ones); null when there are none.
  te::PeerGroup* dispatch_peers_ = nullptr;  // remote: each peer's receive region
  te::PeerGroup* combine_peers_ = nullptr;   // remote: each peer's combine region
  std::vector<int> peer_index_;              // rank -> index in the groups (-1: this rank or direct)
  bool any_direct_ = false;

  Phase phase_ = Phase::idle;
  std::string broken_reason_;
  uint32_t step_ = 0;
  std::vector<int32_t> dest_count_;
  std::vector<int64_t> dest_offset_;
  std::vector<int32_t> count_matrix_;
  std::vector<int32_t> expert_counts_;  // [sender][local expert] to this rank
  std::vector<uint8_t> header_scratch_;
  RecvPlan recv_plan_;
  ProtocolStats stats_;
};

}  // namespace ferry::ep
