// ferry::te::TransferEngine — one-sided RDMA writes with 32-bit immediates over libfabric.
// Knows nothing of MoE. One worker thread per engine owns every NIC; callers enqueue operations and
// wait on immediate counters; only the worker calls libfabric on the hot path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "transfer_engine/bootstrap.h"
#include "transfer_engine/error.h"
#include "transfer_engine/imm.h"

namespace ferry::te {

constexpr int kMaxNics = 8;

enum class MemoryKind : uint32_t { host = 0, cuda = 1 };

// What a peer needs to write into a registered region: exchanged as plain bytes through the
// bootstrap. With FI_MR_VIRT_ADDR `addr` is the region's virtual address; with offset addressing
// (tcp, rxm, shm: mr_mode without FI_MR_VIRT_ADDR) it is 0 and remote addresses are offsets.
struct RegionDesc {
  uint64_t addr = 0;
  uint64_t bytes = 0;
  uint64_t keys[kMaxNics] = {};
  uint32_t num_nics = 0;
  uint32_t owner_rank = 0;
};
static_assert(sizeof(RegionDesc) == 16 + 8 * kMaxNics + 8);

// A registered memory region (host or CUDA), registered on every NIC of the engine. Owned by the
// engine; the pointer stays valid until deregister() or engine destruction.
class MemoryRegion {
 public:
  virtual ~MemoryRegion() = default;
  virtual void* data() const = 0;
  virtual size_t bytes() const = 0;
  virtual MemoryKind kind() const = 0;
  virtual const RegionDesc& desc() const = 0;
};

// Peers resolved once: per peer its fi_addr on each NIC and its remote region, so the hot path does
// no lookups. Owned by the engine.
class PeerGroup {
 public:
  virtual ~PeerGroup() = default;
  virtual size_t size() const = 0;
  virtual int peer_rank(size_t index) const = 0;
  virtual const RegionDesc& remote(size_t index) const = 0;
};

// How one write uses several NICs. by_peer: the whole write goes out on NIC (peer index % nics).
// by_bytes: the bytes are cut into one piece per NIC (pieces never smaller than min_split_bytes);
// each piece carries the immediate, so the receiver counts pieces_for(bytes) arrivals.
// automatic: by_bytes at or above EngineConfig::split_threshold_bytes, by_peer below.
enum class NicRoute : uint8_t { automatic = 0, by_peer = 1, by_bytes = 2 };

struct EngineConfig {
  // libfabric provider: "efa", "efa-direct", "tcp", "shm", "verbs". FERRY_PROVIDER overrides.
  std::string provider = "tcp";
  // Domain or interface names, one per NIC, in order (e.g. {"rdmap16s27-rdm", ...} on EFA or
  // {"veth0", "veth1"} for tcp). Empty: the first nets_per_rank domains the provider lists,
  // nearest to cuda_device first when topology is known. FERRY_DOMAINS (comma list) overrides.
  std::vector<std::string> domains;
  int nets_per_rank = 1;
  int cuda_device = -1;               // the GPU this rank drives; -1 for host-only ranks
  int max_posts_per_step = 64;        // worker posts at most this many before polling CQs again
  uint64_t split_threshold_bytes = 1 << 20;
  uint64_t min_split_bytes = 64 << 10;
  int timeout_ms = 30000;             // setup deadline and default wait deadline
  bool pin_worker = true;             // pin the worker near its NICs (hwloc)
};

struct ImmExpect {
  uint32_t imm = 0;
  uint32_t count = 0;
};

struct ScatterDst {
  uint32_t peer_index = 0;  // index into the PeerGroup
  uint64_t src_offset = 0;
  uint64_t dst_offset = 0;  // offset in that peer's region
  uint64_t bytes = 0;
};

struct EngineStats {
  uint64_t ops_posted = 0;      // calls of write, write_paged, scatter, barrier
  uint64_t writes_posted = 0;   // RMA writes handed to libfabric (pieces and pages each count)
  uint64_t bytes_posted = 0;
  uint64_t eagain_retries = 0;  // posts retried after -FI_EAGAIN (transmit queue full)
  uint64_t imms_received = 0;
  uint64_t bytes_posted_per_nic[kMaxNics] = {};  // shows how a route spread the bytes
};

class TransferEngine {
 public:
  // Opens the NICs, exchanges endpoint addresses through `bootstrap`, inserts every peer into every
  // AV (efa-direct requires the target to know the initiator before RMA arrives), then barriers.
  TransferEngine(const EngineConfig& config, Bootstrap& bootstrap);
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  int rank() const;
  int world_size() const;
  int num_nics() const;
  const std::string& provider() const;          // as libfabric named it, e.g. "tcp;ofi_rxm"
  std::vector<std::string> nic_names() const;   // domain name per NIC
  Bootstrap& bootstrap();
  const EngineConfig& config() const;

  // --- memory ---------------------------------------------------------------------------------
  MemoryRegion& register_memory(void* data, size_t bytes, MemoryKind kind = MemoryKind::host,
                                int cuda_device = -1);
  // Waits (up to the engine's timeout_ms) for writes in flight, then closes the registration.
  // Throws only for a region this engine does not own: a transport error is raised at wait/flush,
  // never here, so deregister is safe in destructors.
  void deregister(MemoryRegion& region);
  // Allgather of `region`'s descriptor: result[r] is rank r's descriptor.
  std::vector<RegionDesc> exchange(const MemoryRegion& region, int timeout_ms = -1);

  // remotes[i] is peer_ranks[i]'s region; or, when remotes holds world_size() descriptors and
  // peer_ranks does not, remotes is indexed by rank (what exchange() returns).
  PeerGroup& make_group(std::span<const int> peer_ranks, std::span<const RegionDesc> remotes);

  // --- operations (enqueued; return at once; errors surface at the next wait) -------------------
  // Bounds are checked here, before anything is queued: a write outside `src` or outside the peer's
  // region throws Status::invalid_argument naming the region, the offsets and the peer.
  void write(const PeerGroup& group, size_t peer_index, const MemoryRegion& src,
             uint64_t src_offset, uint64_t dst_offset, uint64_t bytes,
             std::optional<uint32_t> imm = std::nullopt, NicRoute route = NicRoute::automatic);
  // Pages of page_bytes: page src_pages[i] of `src` (at src_pages[i] * src_stride_bytes) goes to
  // page dst_pages[i] of the peer's region (at dst_pages[i] * dst_stride_bytes). Each page carries
  // the immediate.
  void write_paged(const PeerGroup& group, size_t peer_index, const MemoryRegion& src,
                   uint64_t page_bytes, uint64_t src_stride_bytes, uint64_t dst_stride_bytes,
                   std::span<const uint32_t> src_pages, std::span<const uint32_t> dst_pages,
                   std::optional<uint32_t> imm = std::nullopt);
  // One source region to many peers' regions; each write carries the immediate (a zero-byte entry
  // sends the immediate alone).
  void scatter(const PeerGroup& group, const MemoryRegion& src, std::span<const ScatterDst> dsts,
               std::optional<uint32_t> imm = std::nullopt, NicRoute route = NicRoute::automatic);
  // Immediate-only write of imm::encode(tag, rank()) to every peer of the group, then waits for
  // imm::encode(tag, p) from every peer p. Throws Status::timeout naming the missing ranks.
  void barrier(const PeerGroup& group, uint32_t tag, int timeout_ms = -1);

  // How many arrivals a by_bytes / automatic write of `bytes` produces at the receiver.
  uint32_t pieces_for(uint64_t bytes, NicRoute route = NicRoute::automatic) const;

  // --- completion ---------------------------------------------------------------------------
  // Arrivals so far of one immediate value (not yet consumed).
  uint32_t imm_count(uint32_t imm) const;
  // Waits until every imm has arrived at least its count, then consumes those counts. On deadline
  // throws Status::timeout with the sender ranks (imm::sender) still short and by how much; a
  // transport error seen meanwhile throws Status::transport / peer_failed naming the peer.
  void wait(std::span<const ImmExpect> expects, int timeout_ms = -1);
  void wait(uint32_t imm, uint32_t count, int timeout_ms = -1);
  // The worker calls `fn` (on its thread) once `imm` reaches `count`, consuming it.
  void on_imm(uint32_t imm, uint32_t count, std::function<void()> fn);
  // The worker stores `value` into *flag (release order) once `imm` reaches `count`, consuming it.
  // The flag may live in pinned, mapped host memory that a GPU polls.
  void set_flag_on_imm(uint32_t imm, uint32_t count, volatile uint32_t* flag, uint32_t value);

  // Every operation enqueued so far has completed locally (its source may be reused).
  void flush(int timeout_ms = -1);

  EngineStats stats() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace ferry::te
