#include "transfer_engine/engine.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <set>
#include <sstream>

#include "transfer_engine/fabric/nic.h"
#include "transfer_engine/imm_counter.h"
#include "transfer_engine/peer_info.h"
#include "transfer_engine/random.h"
#include "transfer_engine/route.h"
#include "transfer_engine/topology.h"
#include "transfer_engine/worker.h"

#ifdef FERRY_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ferry::te {
namespace {

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

// hwloc's index of the GPU CUDA calls `cuda_device` (CUDA's default order is not PCI order).
int topology_gpu(const Topology& topology, int cuda_device) {
  if (cuda_device < 0) return -1;
#ifdef FERRY_HAVE_CUDA
  char bus_id[32] = {};
  if (cudaDeviceGetPCIBusId(bus_id, sizeof(bus_id), cuda_device) == cudaSuccess)
    return topology.find_gpu(bus_id);
#endif
  return -1;
}

// The CPUs the worker should run on: NUMA-local to its first NIC, else to its GPU; empty when the
// topology knows neither (loopback interfaces, shm), in which case the worker stays unpinned.
std::vector<int> worker_cpus(const Topology& topology, const std::string& first_domain,
                             int cuda_device) {
  const int nic = topology.find_nic(first_domain);
  if (nic >= 0) return topology.cores_near(DeviceKind::nic, nic);
  const int gpu = topology_gpu(topology, cuda_device);
  if (gpu >= 0) return topology.cores_near(DeviceKind::gpu, gpu);
  return {};
}

std::string hex(uint64_t value) {
  char buffer[32];
  snprintf(buffer, sizeof(buffer), "0x%llx", static_cast<unsigned long long>(value));
  return buffer;
}

}  // namespace

class RegionImpl final : public MemoryRegion {
 public:
  void* data() const override { return data_; }
  size_t bytes() const override { return bytes_; }
  MemoryKind kind() const override { return kind_; }
  const RegionDesc& desc() const override { return desc_; }

  void* data_ = nullptr;
  size_t bytes_ = 0;
  MemoryKind kind_ = MemoryKind::host;
  RegionDesc desc_;
  std::vector<fabric::FidPtr<fid_mr>> mrs;
  void* local_desc[kMaxNics] = {};
  uint64_t key = 0;  // the key requested for it (the provider's own where it chooses)
  const void* owner = nullptr;
};

class GroupImpl final : public PeerGroup {
 public:
  size_t size() const override { return ranks.size(); }
  int peer_rank(size_t index) const override { return ranks.at(index); }
  const RegionDesc& remote(size_t index) const override { return remotes.at(index); }

  std::vector<int> ranks;
  std::vector<RegionDesc> remotes;
  // addrs[index * kMaxNics + nic]: the peer's address on that NIC, resolved once.
  std::vector<fi_addr_t> addrs;
  const void* owner = nullptr;
};

struct TransferEngine::Impl {
  EngineConfig config;
  Bootstrap& bootstrap;
  int rank = 0;
  int world_size = 0;
  std::vector<std::unique_ptr<fabric::Nic>> nics;
  std::vector<std::vector<fi_addr_t>> peer_addrs;  // [nic][rank]
  std::string provider_name;
  ImmCounter counter;
  std::unique_ptr<Worker> worker;
  std::mutex mutex;  // regions and groups (control path)
  std::list<RegionImpl> regions;
  std::list<GroupImpl> groups;
  std::set<uint64_t> keys_in_use;  // requested keys of live regions
  std::string wait_what;  // "rank N wait", built once so waits allocate nothing
  std::atomic<uint64_t> ops{0};

  Impl(const EngineConfig& c, Bootstrap& b) : config(c), bootstrap(b) {}

  int wait_ms(int timeout_ms) const { return timeout_ms < 0 ? config.timeout_ms : timeout_ms; }

  // Where the provider lets Ferry choose keys (no FI_MR_PROV_KEY: tcp, shm), a key is all an
  // initiator needs besides the address to write into a region, so it is drawn at random (unique
  // among this engine's regions) rather than counted: knowing one key says nothing of another.
  // Providers that choose their own keys ignore the requested one.
  uint64_t new_key() {
    size_t key_bytes = sizeof(uint64_t);
    for (const auto& nic : nics) key_bytes = std::min(key_bytes, nic->caps().mr_key_size);
    const uint64_t mask = key_bytes >= sizeof(uint64_t) ? ~uint64_t{0}
                                                        : (uint64_t{1} << (8 * key_bytes)) - 1;
    for (;;) {
      const uint64_t key = random_u64() & mask;
      if (keys_in_use.insert(key).second) return key;
    }
  }
  std::string who() const { return "rank " + std::to_string(rank); }

  // A cast and a pointer comparison, no lookup: the hot path stays constant-time.
  const RegionImpl& own_region(const MemoryRegion& region, const char* op) const {
    const auto* r = dynamic_cast<const RegionImpl*>(&region);
    if (r == nullptr || r->owner != this) {
      raise(Status::invalid_argument, who() + " " + op + ": source region was not registered "
                                                         "with this engine");
    }
    return *r;
  }
  const GroupImpl& own_group(const PeerGroup& group, const char* op) const {
    const auto* g = dynamic_cast<const GroupImpl*>(&group);
    if (g == nullptr || g->owner != this) {
      raise(Status::invalid_argument, who() + " " + op + ": peer group was not made by this engine");
    }
    return *g;
  }

  void check_bounds(const char* op, const RegionImpl& src, const GroupImpl& group,
                    size_t peer_index, uint64_t src_offset, uint64_t dst_offset,
                    uint64_t bytes) const {
    if (peer_index >= group.size()) {
      raise(Status::invalid_argument, who() + " " + op + ": peer index " +
                                          std::to_string(peer_index) + " outside a group of " +
                                          std::to_string(group.size()));
    }
    if (src_offset > src.bytes_ || bytes > src.bytes_ - src_offset) {
      raise(Status::invalid_argument,
            who() + " " + op + ": source [" + std::to_string(src_offset) + ", " +
                std::to_string(src_offset) + " + " + std::to_string(bytes) +
                ") is outside the local region of " + std::to_string(src.bytes_) + " bytes at " +
                hex(reinterpret_cast<uintptr_t>(src.data_)) + " (write to rank " +
                std::to_string(group.ranks[peer_index]) + ")");
    }
    const RegionDesc& remote = group.remotes[peer_index];
    if (dst_offset > remote.bytes || bytes > remote.bytes - dst_offset) {
      raise(Status::invalid_argument,
            who() + " " + op + ": destination [" + std::to_string(dst_offset) + ", " +
                std::to_string(dst_offset) + " + " + std::to_string(bytes) +
                ") is outside rank " + std::to_string(group.ranks[peer_index]) + "'s region of " +
                std::to_string(remote.bytes) + " bytes (peer index " + std::to_string(peer_index) +
                ")");
    }
  }

  NicRoute resolve(NicRoute route, uint64_t bytes) const {
    return route::resolve(route, bytes, static_cast<int>(nics.size()), config.split_threshold_bytes);
  }
  uint32_t pieces(NicRoute resolved, uint64_t bytes) const {
    return route::piece_count(resolved, bytes, static_cast<int>(nics.size()),
                              config.min_split_bytes);
  }

  // Fills the record for piece `p` of a write (everything but the template's constant fields).
  void fill(WriteOp& op, const RegionImpl& src, const GroupImpl& group, size_t peer_index,
            uint64_t src_offset, uint64_t dst_offset, const route::Piece& p,
            std::optional<uint32_t> imm) const {
    const RegionDesc& remote = group.remotes[peer_index];
    op.buf = static_cast<const char*>(src.data_) + src_offset + p.offset;
    op.desc = src.local_desc[p.nic];
    op.bytes = p.bytes;
    // remote.addr is the base virtual address with FI_MR_VIRT_ADDR and 0 with offset addressing,
    // so one formula serves both.
    op.remote_addr = remote.addr + dst_offset + p.offset;
    op.key = remote.keys[p.nic];
    op.dest = group.addrs[peer_index * kMaxNics + p.nic];
    op.peer_rank = group.ranks[peer_index];
    op.nic = static_cast<uint16_t>(p.nic);
    op.has_imm = imm.has_value();
    op.imm = imm.value_or(0);
  }
};

TransferEngine::TransferEngine(const EngineConfig& config, Bootstrap& bootstrap)
    : impl_(std::make_unique<Impl>(config, bootstrap)) {
  Impl& s = *impl_;
  s.rank = bootstrap.rank();
  s.world_size = bootstrap.world_size();
  s.wait_what = s.who() + " wait";
  if (const char* p = std::getenv("FERRY_PROVIDER"); p && *p) s.config.provider = p;
  if (const char* d = std::getenv("FERRY_DOMAINS"); d && *d) {
    s.config.domains = split_list(d);
    s.config.nets_per_rank = std::max<int>(s.config.nets_per_rank,
                                           static_cast<int>(s.config.domains.size()));
  }
  const EngineConfig& c = s.config;
  if (c.nets_per_rank < 1 || c.nets_per_rank > kMaxNics) {
    raise(Status::invalid_argument, s.who() + ": nets_per_rank " + std::to_string(c.nets_per_rank) +
                                        " must be in [1, " + std::to_string(kMaxNics) + "]");
  }
  if (c.max_posts_per_step < 1) {
    raise(Status::invalid_argument, s.who() + ": max_posts_per_step must be at least 1");
  }
  if (c.timeout_ms <= 0) {
    raise(Status::invalid_argument, s.who() + ": timeout_ms must be positive");
  }
  if (static_cast<uint32_t>(s.world_size) > imm::kMaxRanks) {
    raise(Status::invalid_argument, s.who() + ": world size " + std::to_string(s.world_size) +
                                        " exceeds the " + std::to_string(imm::kMaxRanks) +
                                        " ranks an immediate can name");
  }

  // Topology is an optimisation (NIC order, worker placement): without it the engine still runs.
  // It is loaded only where it can matter: hwloc's PCI scan costs tens of milliseconds, and tests
  // start dozens of loopback or shm engines on two cores.
  std::optional<Topology> topology;
  auto load_topology = [&]() -> const Topology* {
    if (!topology) {
      try {
        topology = Topology::discover();
      } catch (const Error&) {
        return nullptr;
      }
    }
    return &*topology;
  };
  std::vector<std::string> domains = c.domains;
  if (domains.empty()) {
    if (c.provider == "tcp" && bootstrap.local_size() == s.world_size) {
      // Every rank on this host: loopback keeps the traffic off the wire.
      domains.push_back("lo");
    } else {
      for (const std::string& name : fabric::list_domains(c.provider)) {
        if (c.provider == "tcp" && name == "lo") continue;
        domains.push_back(name);
      }
      if (c.cuda_device >= 0 && domains.size() > 1) {
        if (const Topology* t = load_topology(); t && topology_gpu(*t, c.cuda_device) >= 0)
          domains = t->order_near_gpu(topology_gpu(*t, c.cuda_device), domains);
      }
      if (domains.empty()) domains.push_back("");
    }
  }
  // With fewer domains than NICs, endpoints share a domain name (several endpoints on one device):
  // this is how multi-NIC paths run on a single loopback interface.
  for (int i = 0; i < c.nets_per_rank; ++i) {
    fabric::NicOptions options;
    options.provider = c.provider;
    options.domain = domains[static_cast<size_t>(i) % domains.size()];
    options.rank = s.rank;
    options.index = i;
    s.nics.push_back(std::make_unique<fabric::Nic>(options));
  }
  s.provider_name = s.nics[0]->provider_name();

  // Exchange endpoint addresses; every rank must see the same NIC count and addressing mode, and
  // every blob is checked before an address is taken from it.
  peer_info::LocalSetup setup;
  setup.provider = s.provider_name;
  setup.virt_addr = s.nics[0]->caps().virt_addr;
  for (const auto& nic : s.nics) setup.addresses.push_back(nic->address());
  const std::vector<uint8_t> mine = peer_info::encode_setup(setup, s.rank);
  std::vector<uint8_t> all(mine.size() * static_cast<size_t>(s.world_size));
  bootstrap.allgather(mine.data(), mine.size(), all.data(), c.timeout_ms);
  const auto addresses = peer_info::parse_setups(all, s.world_size, setup, s.rank);
  s.peer_addrs.resize(s.nics.size());
  for (size_t n = 0; n < s.nics.size(); ++n) {
    // Every peer is inserted before the setup barrier: efa-direct drops RMA from initiators the
    // target has not inserted yet.
    s.peer_addrs[n] = s.nics[n]->insert_addresses(addresses[n]);
  }

  s.worker = std::make_unique<Worker>(s.nics, s.counter, s.rank, c.max_posts_per_step);
  std::vector<int> cpus;
  const std::string& first_domain = s.nics[0]->domain_name();
  const bool local_only = c.provider == "shm" || first_domain == "lo";
  if (c.pin_worker && (!local_only || c.cuda_device >= 0)) {
    if (const Topology* t = load_topology()) cpus = worker_cpus(*t, first_domain, c.cuda_device);
  }
  s.worker->start([cpus] {
    if (cpus.empty()) return;
    try {
      bind_thread_to_cores(cpus);
    } catch (const Error&) {
      // A cpuset that excludes the NIC's cores: run where the scheduler puts us.
    }
  });
  bootstrap.barrier(c.timeout_ms);
}

TransferEngine::~TransferEngine() {
  if (!impl_ || !impl_->worker) return;
  // Writes still in flight reference registered memory: let them finish before the MRs close. A
  // short deadline: writes to a dead peer never complete, and closing the endpoint cancels them.
  impl_->worker->drain(std::min(impl_->config.timeout_ms, 2000));
  impl_->worker->stop();
  impl_->regions.clear();
  impl_->worker.reset();
  impl_->nics.clear();
}

int TransferEngine::rank() const { return impl_->rank; }
int TransferEngine::world_size() const { return impl_->world_size; }
int TransferEngine::num_nics() const { return static_cast<int>(impl_->nics.size()); }
const std::string& TransferEngine::provider() const { return impl_->provider_name; }
std::vector<std::string> TransferEngine::nic_names() const {
  std::vector<std::string> names;
  for (const auto& nic : impl_->nics) names.push_back(nic->domain_name());
  return names;
}
Bootstrap& TransferEngine::bootstrap() { return impl_->bootstrap; }
const EngineConfig& TransferEngine::config() const { return impl_->config; }

MemoryRegion& TransferEngine::register_memory(void* data, size_t bytes, MemoryKind kind,
                                              int cuda_device) {
  Impl& s = *impl_;
  if (data == nullptr || bytes == 0) {
    raise(Status::invalid_argument, s.who() + ": register_memory needs a non-null buffer of at "
                                              "least one byte");
  }
  if (kind == MemoryKind::cuda && cuda_device < 0) cuda_device = s.config.cuda_device;
  std::lock_guard<std::mutex> lock(s.mutex);
  RegionImpl region;
  region.owner = &s;
  region.data_ = data;
  region.bytes_ = bytes;
  region.kind_ = kind;
  region.desc_.bytes = bytes;
  region.desc_.num_nics = static_cast<uint32_t>(s.nics.size());
  region.desc_.owner_rank = static_cast<uint32_t>(s.rank);
  region.desc_.addr = s.nics[0]->caps().virt_addr ? reinterpret_cast<uint64_t>(data) : 0;
  region.key = s.new_key();
  try {
    s.worker->run_on_worker(
        [&] {
          for (size_t n = 0; n < s.nics.size(); ++n) {
            region.mrs.push_back(
                s.nics[n]->register_memory(data, bytes, kind, cuda_device, region.key));
            region.local_desc[n] = fi_mr_desc(region.mrs.back().get());
            region.desc_.keys[n] = fi_mr_key(region.mrs.back().get());
          }
        },
        s.config.timeout_ms);
  } catch (...) {
    s.keys_in_use.erase(region.key);
    throw;
  }
  s.regions.push_back(std::move(region));
  return s.regions.back();
}

void TransferEngine::deregister(MemoryRegion& region) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.mutex);
  for (auto it = s.regions.begin(); it != s.regions.end(); ++it) {
    if (&*it != &region) continue;
    // In-flight writes may still read it. Deregistration runs in destructors, so a transport error
    // seen earlier (it was raised, or will be, at a wait) does not make it throw; after a failure
    // or the deadline the MRs close anyway and the provider fails what still uses them.
    s.worker->drain(s.config.timeout_ms);
    auto mrs = std::move(it->mrs);
    try {
      s.worker->run_on_worker([&] { mrs.clear(); }, s.config.timeout_ms);
    } catch (const Error&) {
      // A worker stuck in a callback: close here rather than leak the registration.
    }
    s.keys_in_use.erase(it->key);
    s.regions.erase(it);
    return;
  }
  raise(Status::invalid_argument, s.who() + ": deregister of a region this engine does not own");
}

std::vector<RegionDesc> TransferEngine::exchange(const MemoryRegion& region, int timeout_ms) {
  Impl& s = *impl_;
  std::vector<RegionDesc> all(static_cast<size_t>(s.world_size));
  s.bootstrap.allgather(&region.desc(), sizeof(RegionDesc), all.data(), s.wait_ms(timeout_ms));
  peer_info::check_region_descs(all, static_cast<uint32_t>(s.nics.size()),
                                s.nics[0]->caps().virt_addr, s.rank);
  return all;
}

PeerGroup& TransferEngine::make_group(std::span<const int> peer_ranks,
                                      std::span<const RegionDesc> remotes) {
  Impl& s = *impl_;
  // Either one descriptor per peer, or every rank's (as exchange() returns).
  const bool by_rank = remotes.size() == static_cast<size_t>(s.world_size) &&
                       remotes.size() != peer_ranks.size();
  if (!by_rank && remotes.size() != peer_ranks.size()) {
    raise(Status::invalid_argument,
          s.who() + ": make_group needs one region descriptor per peer (" +
              std::to_string(peer_ranks.size()) + " peers, " + std::to_string(remotes.size()) +
              " descriptors) or one per rank");
  }
  GroupImpl group;
  group.owner = &s;
  for (size_t i = 0; i < peer_ranks.size(); ++i) {
    const int peer = peer_ranks[i];
    if (peer < 0 || peer >= s.world_size) {
      raise(Status::invalid_argument, s.who() + ": make_group: peer rank " + std::to_string(peer) +
                                          " outside [0, " + std::to_string(s.world_size) + ")");
    }
    const RegionDesc& remote = by_rank ? remotes[static_cast<size_t>(peer)] : remotes[i];
    peer_info::check_region_desc(remote, peer, static_cast<uint32_t>(s.nics.size()),
                                 s.nics[0]->caps().virt_addr, s.rank, "make_group");
    group.ranks.push_back(peer);
    group.remotes.push_back(remote);
    for (int n = 0; n < kMaxNics; ++n) {
      group.addrs.push_back(static_cast<size_t>(n) < s.nics.size()
                                ? s.peer_addrs[static_cast<size_t>(n)][static_cast<size_t>(peer)]
                                : FI_ADDR_UNSPEC);
    }
  }
  std::lock_guard<std::mutex> lock(s.mutex);
  s.groups.push_back(std::move(group));
  return s.groups.back();
}

void TransferEngine::write(const PeerGroup& group, size_t peer_index, const MemoryRegion& src,
                           uint64_t src_offset, uint64_t dst_offset, uint64_t bytes,
                           std::optional<uint32_t> imm, NicRoute route) {
  Impl& s = *impl_;
  const GroupImpl& g = s.own_group(group, "write");
  const RegionImpl& r = s.own_region(src, "write");
  s.check_bounds("write", r, g, peer_index, src_offset, dst_offset, bytes);
  const NicRoute resolved = s.resolve(route, bytes);
  const uint32_t count = s.pieces(resolved, bytes);
  const int nics = static_cast<int>(s.nics.size());
  uint32_t index = 0;
  s.ops.fetch_add(1, std::memory_order_relaxed);
  s.worker->enqueue(count, s.config.timeout_ms, [&](WriteOp& op) {
    const route::Piece p = route::piece(bytes, index++, count, peer_index, nics, resolved);
    s.fill(op, r, g, peer_index, src_offset, dst_offset, p, imm);
  });
}

void TransferEngine::write_paged(const PeerGroup& group, size_t peer_index,
                                 const MemoryRegion& src, uint64_t page_bytes,
                                 uint64_t src_stride_bytes, uint64_t dst_stride_bytes,
                                 std::span<const uint32_t> src_pages,
                                 std::span<const uint32_t> dst_pages, std::optional<uint32_t> imm) {
  Impl& s = *impl_;
  const GroupImpl& g = s.own_group(group, "write_paged");
  const RegionImpl& r = s.own_region(src, "write_paged");
  if (src_pages.size() != dst_pages.size()) {
    raise(Status::invalid_argument, s.who() + " write_paged: " + std::to_string(src_pages.size()) +
                                        " source pages but " + std::to_string(dst_pages.size()) +
                                        " destination pages");
  }
  if (page_bytes > src_stride_bytes || page_bytes > dst_stride_bytes) {
    raise(Status::invalid_argument, s.who() + " write_paged: page of " + std::to_string(page_bytes) +
                                        " bytes is larger than its stride");
  }
  for (size_t i = 0; i < src_pages.size(); ++i) {
    s.check_bounds("write_paged", r, g, peer_index, src_pages[i] * src_stride_bytes,
                   dst_pages[i] * dst_stride_bytes, page_bytes);
  }
  // Pages are small by construction: each goes out whole, pages spread over the NICs.
  const int nics = static_cast<int>(s.nics.size());
  size_t i = 0;
  s.ops.fetch_add(1, std::memory_order_relaxed);
  s.worker->enqueue(src_pages.size(), s.config.timeout_ms, [&](WriteOp& op) {
    route::Piece p;
    p.bytes = page_bytes;
    p.nic = static_cast<int>((peer_index + i) % static_cast<size_t>(nics));
    s.fill(op, r, g, peer_index, src_pages[i] * src_stride_bytes, dst_pages[i] * dst_stride_bytes,
           p, imm);
    ++i;
  });
}

void TransferEngine::scatter(const PeerGroup& group, const MemoryRegion& src,
                             std::span<const ScatterDst> dsts, std::optional<uint32_t> imm,
                             NicRoute route) {
  Impl& s = *impl_;
  const GroupImpl& g = s.own_group(group, "scatter");
  const RegionImpl& r = s.own_region(src, "scatter");
  size_t total = 0;
  for (const ScatterDst& d : dsts) {
    s.check_bounds("scatter", r, g, d.peer_index, d.src_offset, d.dst_offset, d.bytes);
    total += s.pieces(s.resolve(route, d.bytes), d.bytes);
  }
  const int nics = static_cast<int>(s.nics.size());
  // Every record is the same template (source descriptors of `src`, the immediate); per record
  // only address, length, key and peer change, all read from pre-resolved group state.
  size_t dst = 0;
  uint32_t piece = 0;
  s.ops.fetch_add(1, std::memory_order_relaxed);
  s.worker->enqueue(total, s.config.timeout_ms, [&](WriteOp& op) {
    const ScatterDst& d = dsts[dst];
    const NicRoute resolved = s.resolve(route, d.bytes);
    const uint32_t count = s.pieces(resolved, d.bytes);
    const route::Piece p = route::piece(d.bytes, piece, count, d.peer_index, nics, resolved);
    s.fill(op, r, g, d.peer_index, d.src_offset, d.dst_offset, p, imm);
    if (++piece == count) {
      piece = 0;
      ++dst;
    }
  });
}

void TransferEngine::barrier(const PeerGroup& group, uint32_t tag, int timeout_ms) {
  Impl& s = *impl_;
  const GroupImpl& g = s.own_group(group, "barrier");
  if (tag > imm::kMaxTag) {
    raise(Status::invalid_argument, s.who() + " barrier: tag " + std::to_string(tag) +
                                        " exceeds " + std::to_string(imm::kMaxTag));
  }
  const uint32_t mine = imm::encode(tag, static_cast<uint32_t>(s.rank));
  const int nics = static_cast<int>(s.nics.size());
  size_t i = 0;
  s.ops.fetch_add(1, std::memory_order_relaxed);
  s.worker->enqueue(g.size(), s.config.timeout_ms, [&](WriteOp& op) {
    route::Piece p;
    p.nic = static_cast<int>(i % static_cast<size_t>(nics));
    // Zero bytes from the start of the peer's region: only the immediate travels.
    op.buf = nullptr;
    op.desc = nullptr;
    op.bytes = 0;
    op.remote_addr = g.remotes[i].addr;
    op.key = g.remotes[i].keys[p.nic];
    op.dest = g.addrs[i * kMaxNics + static_cast<size_t>(p.nic)];
    op.peer_rank = g.ranks[i];
    op.nic = static_cast<uint16_t>(p.nic);
    op.has_imm = true;
    op.imm = mine;
    ++i;
  });
  std::vector<ImmExpect> expects;
  expects.reserve(g.size());
  for (int peer : g.ranks) expects.push_back({imm::encode(tag, static_cast<uint32_t>(peer)), 1});
  wait(expects, timeout_ms);
}

uint32_t TransferEngine::pieces_for(uint64_t bytes, NicRoute route) const {
  return impl_->pieces(impl_->resolve(route, bytes), bytes);
}

uint32_t TransferEngine::imm_count(uint32_t imm) const { return impl_->counter.count(imm); }

void TransferEngine::wait(std::span<const ImmExpect> expects, int timeout_ms) {
  Impl& s = *impl_;
  Worker::WaitScope scope(*s.worker);
  try {
    wait_for_imms(s.counter, expects, s.wait_ms(timeout_ms), s.wait_what,
                  [&] { s.worker->raise_if_failed(); });
  } catch (const Error& e) {
    if (e.status() != Status::timeout) throw;
    raise(Status::timeout, e.what() + s.worker->in_flight_summary());
  }
}

void TransferEngine::wait(uint32_t imm, uint32_t count, int timeout_ms) {
  const ImmExpect expect{imm, count};
  wait(std::span<const ImmExpect>(&expect, 1), timeout_ms);
}

void TransferEngine::on_imm(uint32_t imm, uint32_t count, std::function<void()> fn) {
  impl_->worker->add_imm_waiter(imm, count, std::move(fn));
}

void TransferEngine::set_flag_on_imm(uint32_t imm, uint32_t count, volatile uint32_t* flag,
                                     uint32_t value) {
  impl_->worker->add_imm_waiter(imm, count, [flag, value] {
    // Release: whoever sees the flag (a GPU polling mapped host memory, or a CPU thread) also
    // sees every byte the writes that produced these immediates delivered.
    std::atomic_thread_fence(std::memory_order_release);
    __atomic_store_n(const_cast<uint32_t*>(flag), value, __ATOMIC_RELEASE);
  });
}

void TransferEngine::flush(int timeout_ms) { impl_->worker->flush(impl_->wait_ms(timeout_ms)); }

EngineStats TransferEngine::stats() const {
  EngineStats stats = impl_->worker->stats();
  stats.ops_posted = impl_->ops.load(std::memory_order_relaxed);
  return stats;
}

}  // namespace ferry::te
