// Where the arrival flags live, which the proxy raises and one GPU thread polls per receive half.
//
// With GDRCopy (NVIDIA's libgdrapi.so.2 and the gdrdrv kernel module, shipped by the EFA installer
// and the deep learning AMIs) they live in device memory that the CPU writes through a BAR mapping:
// the GPU polls its own memory instead of crossing PCIe on every poll. Without it, in pinned host
// memory mapped into the GPU. libgdrapi is loaded with dlopen at first use, never linked: most
// machines (CI, development hosts, the lent GPU machines) do not have it, and a program must still
// start there.
//
// FERRY_GDRCOPY=auto (default; unset or empty means auto): GDRCopy when the library loads and
// gdrdrv opens and maps a page, else mapped host memory, saying why in description().
// FERRY_GDRCOPY=1: GDRCopy or Status::unsupported naming what is missing. FERRY_GDRCOPY=0: never.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace ferry::cuda {

// Written by the proxy, read by the GPU.
struct ArrivalFlags {
  uint32_t dispatch_arrived;
  uint32_t pad0[15];  // separate cache lines: the GPU polls one while the CPU writes the other
  uint32_t combine_arrived;
  uint32_t pad1[15];
};

// How the proxy stores an epoch (a small value, copied into the proxy). Mapped host memory is
// ordinary coherent memory: a release store orders the bytes the epoch announces before it. A BAR
// mapping is write-combined: stores to it may pass earlier stores and linger in the CPU's WC
// buffers, so a fence goes before (order) and after (flush, so the GPU sees the epoch now).
class ArrivalFlagWriter {
 public:
  ArrivalFlagWriter() = default;
  ArrivalFlagWriter(ArrivalFlags* host, bool write_combined) : host_(host), write_combined_(write_combined) {}
  void raise_dispatch(uint32_t epoch) const { store(&host_->dispatch_arrived, epoch); }
  void raise_combine(uint32_t epoch) const { store(&host_->combine_arrived, epoch); }
  ArrivalFlags* host() const { return host_; }
  bool write_combined() const { return write_combined_; }

 private:
  void store(uint32_t* flag, uint32_t epoch) const;

  ArrivalFlags* host_ = nullptr;
  bool write_combined_ = false;
};

enum class GdrcopyMode { automatic, off, required };

// FERRY_GDRCOPY: auto (or unset, or empty), 0 or 1; anything else is Status::invalid_argument
// naming the value.
GdrcopyMode gdrcopy_mode();
const char* gdrcopy_mode_name(GdrcopyMode mode);  // "auto", "0", "1"

// The entry points of GDRCopy's user library this backend uses, with the types of GDRCopy's public
// include/gdrapi.h (API 2.x, stable since 2.0): gdr_t is an opaque pointer, gdr_mh_t a struct of one
// unsigned long passed by value, every int result 0 or an errno value. gdr_get_info is not used: its
// struct changed between versions.
struct GdrApi {
  struct Gdr;                            // struct gdr
  struct MemHandle { unsigned long h; }; // gdr_mh_t
  Gdr* (*open)() = nullptr;
  int (*close)(Gdr* g) = nullptr;
  int (*pin_buffer)(Gdr* g, unsigned long addr, size_t size, uint64_t p2p_token, uint32_t va_space,
                    MemHandle* handle) = nullptr;
  int (*unpin_buffer)(Gdr* g, MemHandle handle) = nullptr;
  int (*map)(Gdr* g, MemHandle handle, void** va, size_t size) = nullptr;
  int (*unmap)(Gdr* g, MemHandle handle, void* va, size_t size) = nullptr;
};

// Loads `library` and resolves GdrApi; nullopt with the reason in *error when it cannot be loaded
// or lacks an entry point. The library stays loaded for the life of the process.
std::optional<GdrApi> load_gdr_api(const char* library, std::string* error);
// libgdrapi.so.2, loaded once per process; nullptr with the reason in *error.
const GdrApi* gdr_api(std::string* error);

// GPU pages are 64 KiB: gdrdrv pins and maps whole pages.
constexpr size_t kGpuPageBytes = size_t(1) << 16;

// An open connection to gdrdrv (gdr_open/gdr_close).
class GdrConnection {
 public:
  GdrConnection() = default;
  // Empty with the reason in *why_not when libgdrapi.so.2 does not load or gdr_open fails.
  static GdrConnection open(std::string* why_not);
  ~GdrConnection();
  GdrConnection(GdrConnection&& o) noexcept;
  GdrConnection& operator=(GdrConnection&& o) noexcept;
  explicit operator bool() const { return g_ != nullptr; }
  const GdrApi& api() const { return *api_; }
  GdrApi::Gdr* get() const { return g_; }

 private:
  const GdrApi* api_ = nullptr;
  GdrApi::Gdr* g_ = nullptr;
};

// The arrival flags of one backend, zeroed, on the CUDA device current at construction.
class ArrivalFlagMemory {
 public:
  ArrivalFlagMemory();  // empty
  explicit ArrivalFlagMemory(GdrcopyMode mode);
  ~ArrivalFlagMemory();
  ArrivalFlagMemory(ArrivalFlagMemory&&) noexcept;
  ArrivalFlagMemory& operator=(ArrivalFlagMemory&&) noexcept;

  ArrivalFlags* device() const { return device_; }  // what the receive kernels poll
  ArrivalFlagWriter writer() const { return {host_, gdrcopy_}; }  // how the proxy raises them
  bool gdrcopy() const { return gdrcopy_; }
  // "GDRCopy BAR mapping" or "pinned mapped host memory: <why not GDRCopy>".
  const std::string& description() const { return description_; }

 private:
  struct GdrPage;
  struct HostPage;
  std::unique_ptr<GdrPage> gdr_;
  std::unique_ptr<HostPage> mapped_host_;
  ArrivalFlags* device_ = nullptr;
  ArrivalFlags* host_ = nullptr;
  bool gdrcopy_ = false;
  std::string description_;
};

// What ArrivalFlagMemory(mode) will use, decided without touching the GPU: a gdrdrv connection, or
// the reason for mapped host memory. Status::unsupported naming the missing piece under `required`.
struct FlagMemoryChoice {
  GdrConnection gdr;
  std::string why_not;  // empty when gdr is open
};
FlagMemoryChoice choose_flag_memory(GdrcopyMode mode);

}  // namespace ferry::cuda
