#include "csrc/cuda/gdrcopy.h"

#include <cuda.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/memory.h"
#include "transfer_engine/cuda_driver.h"
#include "transfer_engine/error.h"

namespace ferry::cuda {
namespace {

constexpr const char* kGdrLibrary = "libgdrapi.so.2";
constexpr const char* kGdrDevice = "/dev/gdrdrv";

// Orders earlier stores before, and drains, stores to a write-combined mapping.
inline void write_combining_fence() {
  __atomic_thread_fence(__ATOMIC_RELEASE);
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#elif defined(__aarch64__)
  // The BAR is outer shareable device memory as far as the CPU is concerned.
  asm volatile("dmb oshst" ::: "memory");
#else
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

int current_device() {
  int device = -1;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
}

// Why gdr_open failed: it only returns NULL, and what it logs is off unless GDRCOPY_ENABLE_LOGGING is
// set, so the likely causes are told apart by looking at the device node ourselves.
std::string gdr_open_failure() {
  if (access(kGdrDevice, F_OK) != 0)
    return std::string("gdr_open failed: ") + kGdrDevice + " does not exist (the gdrdrv kernel module is not loaded)";
  if (access(kGdrDevice, R_OK | W_OK) != 0)
    return std::string("gdr_open failed: ") + kGdrDevice + " is not readable and writable by this user";
  return std::string("gdr_open failed although ") + kGdrDevice + " exists (gdrdrv and " + kGdrLibrary +
         " versions may not match; GDRCOPY_ENABLE_LOGGING=1 makes the library say why)";
}

// gdrdrv refuses to pin memory whose synchronous copies could complete out of order with the BAR
// writes; CUDA guarantees that order only for allocations with SYNC_MEMOPS set.
void set_sync_memops(uintptr_t address) {
  const te::CudaDriver* driver = te::cuda_driver();
  if (!driver) raise(Status::unsupported, std::string("CUDA driver: ") + te::cuda_driver_error());
  if (!driver->pointer_set_attribute)
    raise(Status::unsupported, "the CUDA driver (libcuda.so.1) lacks cuPointerSetAttribute");
  unsigned int one = 1;
  const CUresult r = driver->pointer_set_attribute(&one, CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, CUdeviceptr(address));
  if (r != CUDA_SUCCESS) {
    const char* text = nullptr;
    if (driver->get_error_string) driver->get_error_string(r, &text);
    raise(Status::internal, std::string("cuPointerSetAttribute(SYNC_MEMOPS) on the arrival flags: ") +
                                (text ? text : "error " + std::to_string(int(r))));
  }
}

// gdr_pin_buffer .. gdr_unpin_buffer.
class PinnedPages {
 public:
  PinnedPages(const GdrConnection& gdr, uintptr_t address, size_t bytes) : gdr_(&gdr) {
    const int err = gdr.api().pin_buffer(gdr.get(), address, bytes, 0, 0, &handle_);
    if (err != 0)
      raise(Status::unsupported, "gdr_pin_buffer of " + std::to_string(bytes >> 10) + " KiB of device memory on "
                                 "cuda device " + std::to_string(current_device()) + ": " + errno_text(err) +
                                 " (a GPU or driver without GPUDirect RDMA BAR mappings)");
  }
  ~PinnedPages() { gdr_->api().unpin_buffer(gdr_->get(), handle_); }
  PinnedPages(const PinnedPages&) = delete;
  PinnedPages& operator=(const PinnedPages&) = delete;
  GdrApi::MemHandle handle() const { return handle_; }

 private:
  const GdrConnection* gdr_;
  GdrApi::MemHandle handle_{};
};

// gdr_map .. gdr_unmap: the pinned pages in this process's address space, through the GPU's BAR.
class BarMapping {
 public:
  BarMapping(const GdrConnection& gdr, const PinnedPages& pages, size_t bytes)
      : gdr_(&gdr), handle_(pages.handle()), bytes_(bytes) {
    const int err = gdr.api().map(gdr.get(), handle_, &va_, bytes);
    if (err != 0 || !va_)
      raise(Status::unsupported, "gdr_map of " + std::to_string(bytes >> 10) + " KiB pinned on cuda device " +
                                     std::to_string(current_device()) + ": " + errno_text(err ? err : EINVAL));
  }
  ~BarMapping() { gdr_->api().unmap(gdr_->get(), handle_, va_, bytes_); }
  BarMapping(const BarMapping&) = delete;
  BarMapping& operator=(const BarMapping&) = delete;
  void* get() const { return va_; }

 private:
  const GdrConnection* gdr_;
  GdrApi::MemHandle handle_;
  size_t bytes_;
  void* va_ = nullptr;
};

template <typename Fn>
bool resolve(void* lib, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(lib, name));
  return out != nullptr;
}

}  // namespace

void ArrivalFlagWriter::store(uint32_t* flag, uint32_t epoch) const {
  if (!write_combined_) {
    __atomic_store_n(flag, epoch, __ATOMIC_RELEASE);
    return;
  }
  write_combining_fence();
  *static_cast<volatile uint32_t*>(flag) = epoch;
  write_combining_fence();
}

GdrcopyMode gdrcopy_mode() {
  const char* env = std::getenv("FERRY_GDRCOPY");
  if (!env || !*env) return GdrcopyMode::automatic;
  const std::string v = env;
  if (v == "auto") return GdrcopyMode::automatic;
  if (v == "0") return GdrcopyMode::off;
  if (v == "1") return GdrcopyMode::required;
  raise(Status::invalid_argument, "FERRY_GDRCOPY=" + v + ": expected auto, 0 or 1");
}

const char* gdrcopy_mode_name(GdrcopyMode mode) {
  switch (mode) {
    case GdrcopyMode::automatic: return "auto";
    case GdrcopyMode::off: return "0";
    case GdrcopyMode::required: return "1";
  }
  return "?";
}

std::optional<GdrApi> load_gdr_api(const char* library, std::string* error) {
  void* lib = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    if (error) *error = std::string("cannot load ") + library + " (" + (why ? why : "unknown") + ")";
    return std::nullopt;
  }
  // Kept loaded: mappings made through it may outlive any one owner.
  GdrApi api;
  const char* missing = nullptr;
  if (!resolve(lib, "gdr_open", api.open)) missing = "gdr_open";
  else if (!resolve(lib, "gdr_close", api.close)) missing = "gdr_close";
  else if (!resolve(lib, "gdr_pin_buffer", api.pin_buffer)) missing = "gdr_pin_buffer";
  else if (!resolve(lib, "gdr_unpin_buffer", api.unpin_buffer)) missing = "gdr_unpin_buffer";
  else if (!resolve(lib, "gdr_map", api.map)) missing = "gdr_map";
  else if (!resolve(lib, "gdr_unmap", api.unmap)) missing = "gdr_unmap";
  if (missing) {
    if (error) *error = std::string(library) + " lacks " + missing + " (not GDRCopy's API 2.x)";
    return std::nullopt;
  }
  return api;
}

const GdrApi* gdr_api(std::string* error) {
  static std::once_flag once;
  static std::optional<GdrApi> api;
  static std::string load_error;
  std::call_once(once, [] { api = load_gdr_api(kGdrLibrary, &load_error); });
  if (!api && error) *error = load_error;
  return api ? &*api : nullptr;
}

GdrConnection GdrConnection::open(std::string* why_not) {
  GdrConnection c;
  std::string error;
  c.api_ = gdr_api(&error);
  if (!c.api_) {
    if (why_not) *why_not = error;
    return c;
  }
  c.g_ = c.api_->open();
  if (!c.g_ && why_not) *why_not = gdr_open_failure();
  return c;
}

GdrConnection::~GdrConnection() {
  if (g_) api_->close(g_);
}

GdrConnection::GdrConnection(GdrConnection&& o) noexcept
    : api_(std::exchange(o.api_, nullptr)), g_(std::exchange(o.g_, nullptr)) {}

GdrConnection& GdrConnection::operator=(GdrConnection&& o) noexcept {
  std::swap(api_, o.api_);
  std::swap(g_, o.g_);
  return *this;
}

FlagMemoryChoice choose_flag_memory(GdrcopyMode mode) {
  FlagMemoryChoice choice;
  if (mode == GdrcopyMode::off) {
    choice.why_not = "FERRY_GDRCOPY=0";
    return choice;
  }
  std::string why_not;
  choice.gdr = GdrConnection::open(&why_not);
  if (choice.gdr) return choice;
  if (mode == GdrcopyMode::required)
    raise(Status::unsupported, "FERRY_GDRCOPY=1 asks for arrival flags in GPU memory through GDRCopy, but " + why_not);
  choice.why_not = why_not;
  return choice;
}

// One GPU page of device memory, pinned by gdrdrv and mapped into this process. Members are released
// in reverse order: unmap, unpin, free the memory, close the connection.
struct ArrivalFlagMemory::GdrPage {
  GdrConnection gdr;
  DeviceBuffer memory;  // two pages, so that one whole aligned page lies inside
  uintptr_t page;
  PinnedPages pinned;
  BarMapping mapping;

  explicit GdrPage(GdrConnection connection)
      : gdr(std::move(connection)),
        memory(2 * kGpuPageBytes),
        page(aligned_page(memory)),
        pinned(gdr, page, kGpuPageBytes),
        mapping(gdr, pinned, kGpuPageBytes) {
    // Zeroed through the mapping itself: no GPU work that a later stream could run ahead of.
    volatile uint32_t* words = static_cast<volatile uint32_t*>(mapping.get());
    for (size_t i = 0; i < sizeof(ArrivalFlags) / sizeof(uint32_t); ++i) words[i] = 0;
    write_combining_fence();
  }

  static uintptr_t aligned_page(const DeviceBuffer& memory) {
    const uintptr_t page = (reinterpret_cast<uintptr_t>(memory.get()) + kGpuPageBytes - 1) & ~(kGpuPageBytes - 1);
    set_sync_memops(page);
    return page;
  }
};

struct ArrivalFlagMemory::HostPage {
  MappedHostBuffer buffer;
};

ArrivalFlagMemory::ArrivalFlagMemory() = default;
ArrivalFlagMemory::~ArrivalFlagMemory() = default;
ArrivalFlagMemory::ArrivalFlagMemory(ArrivalFlagMemory&& o) noexcept { *this = std::move(o); }

// Swaps, so the moved-from owner is left empty or with what this one held, released with it.
ArrivalFlagMemory& ArrivalFlagMemory::operator=(ArrivalFlagMemory&& o) noexcept {
  std::swap(gdr_, o.gdr_);
  std::swap(mapped_host_, o.mapped_host_);
  std::swap(device_, o.device_);
  std::swap(host_, o.host_);
  std::swap(gdrcopy_, o.gdrcopy_);
  std::swap(description_, o.description_);
  return *this;
}

ArrivalFlagMemory::ArrivalFlagMemory(GdrcopyMode mode) {
  FlagMemoryChoice choice = choose_flag_memory(mode);
  if (choice.gdr) {
    try {
      gdr_ = std::make_unique<GdrPage>(std::move(choice.gdr));
      device_ = reinterpret_cast<ArrivalFlags*>(gdr_->page);
      host_ = static_cast<ArrivalFlags*>(gdr_->mapping.get());
      gdrcopy_ = true;
      description_ = "GDRCopy BAR mapping";
      return;
    } catch (const Error& e) {
      // A failed CUDA call must not linger as the error a later launch check reports.
      cudaGetLastError();
      if (mode == GdrcopyMode::required)
        raise(e.status() == Status::out_of_memory ? e.status() : Status::unsupported,
              std::string("FERRY_GDRCOPY=1 asks for arrival flags in GPU memory through GDRCopy, but ") + e.what());
      choice.why_not = e.what();
    }
  }
  mapped_host_ = std::make_unique<HostPage>(HostPage{MappedHostBuffer(sizeof(ArrivalFlags))});
  std::memset(mapped_host_->buffer.host(), 0, sizeof(ArrivalFlags));
  device_ = mapped_host_->buffer.dev<ArrivalFlags>();
  host_ = mapped_host_->buffer.host<ArrivalFlags>();
  description_ = "pinned mapped host memory: " + choice.why_not;
}

}  // namespace ferry::cuda
