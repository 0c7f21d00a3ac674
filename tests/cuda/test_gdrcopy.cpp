// Where the arrival flags live: FERRY_GDRCOPY is parsed strictly, libgdrapi.so.2 is loaded at first
// use and every reason not to use it is named (CPU only), and on a GPU the one-thread wait kernel
// sees the epochs the proxy's writer raises, whichever memory was chosen.
#include <cuda_runtime.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>

#include "csrc/backend.h"
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/gdrcopy.h"
#include "tests/common/a2a_case.h"
#include "csrc/cuda/memory.h"
#include "tests/cuda/gpu.h"
#include "transfer_engine/error.h"

namespace ferry::cuda {
namespace {

using ::testing::HasSubstr;

// Sets FERRY_GDRCOPY (or unsets it with nullptr) for one test and restores what was there.
class ScopedGdrcopyEnv {
 public:
  explicit ScopedGdrcopyEnv(const char* value) {
    if (const char* old = std::getenv("FERRY_GDRCOPY")) old_ = old;
    if (value) setenv("FERRY_GDRCOPY", value, 1);
    else unsetenv("FERRY_GDRCOPY");
  }
  ~ScopedGdrcopyEnv() {
    if (old_) setenv("FERRY_GDRCOPY", old_->c_str(), 1);
    else unsetenv("FERRY_GDRCOPY");
  }

 private:
  std::optional<std::string> old_;
};

bool libgdrapi_installed() { return gdr_api(nullptr) != nullptr; }
bool gdrdrv_loaded() { return access("/dev/gdrdrv", F_OK) == 0; }

// Runs fn, which must throw ferry::Error; returns it.
template <typename Fn>
Error error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e;
  }
  ADD_FAILURE() << "no ferry::Error was thrown";
  return Error(Status::ok, "");
}

TEST(GdrcopyMode, UnsetEmptyOrAutoMeansUseItWhereItWorks) {
  for (const char* value : {static_cast<const char*>(nullptr), "", "auto"}) {
    ScopedGdrcopyEnv env(value);
    EXPECT_EQ(gdrcopy_mode(), GdrcopyMode::automatic) << (value ? value : "(unset)");
  }
}

TEST(GdrcopyMode, ZeroNeverAndOneRequired) {
  {
    ScopedGdrcopyEnv env("0");
    EXPECT_EQ(gdrcopy_mode(), GdrcopyMode::off);
  }
  ScopedGdrcopyEnv env("1");
  EXPECT_EQ(gdrcopy_mode(), GdrcopyMode::required);
}

TEST(GdrcopyMode, AnyOtherValueIsRejectedNamingIt) {
  for (const char* value : {"yes", "true", "2", "AUTO", " 1"}) {
    ScopedGdrcopyEnv env(value);
    const Error e = error_of([] { gdrcopy_mode(); });
    EXPECT_EQ(e.status(), Status::invalid_argument) << value;
    EXPECT_THAT(e.what(), HasSubstr(std::string("FERRY_GDRCOPY=") + value + ":"));
    EXPECT_THAT(e.what(), HasSubstr("auto, 0 or 1"));
  }
}

TEST(GdrApiLoader, AnAbsentLibraryIsNamed) {
  std::string error;
  EXPECT_FALSE(load_gdr_api("libferry-no-such-gdrapi.so.2", &error).has_value());
  EXPECT_THAT(error, HasSubstr("cannot load libferry-no-such-gdrapi.so.2"));
}

TEST(GdrApiLoader, ALibraryWithoutGdrcopysEntryPointsIsRefusedNamingTheFirstMissing) {
  std::string error;
  EXPECT_FALSE(load_gdr_api("libm.so.6", &error).has_value());
  EXPECT_THAT(error, HasSubstr("libm.so.6 lacks gdr_open"));
}

TEST(FlagMemoryChoice, ZeroNeverOpensGdrdrvAndSaysSo) {
  const FlagMemoryChoice choice = choose_flag_memory(GdrcopyMode::off);
  EXPECT_FALSE(choice.gdr);
  EXPECT_EQ(choice.why_not, "FERRY_GDRCOPY=0");
}

TEST(FlagMemoryChoice, RequiredWithoutLibgdrapiIsUnsupportedNamingTheLibrary) {
  if (libgdrapi_installed()) GTEST_SKIP() << "libgdrapi.so.2 is installed on this machine";
  const Error e = error_of([] { choose_flag_memory(GdrcopyMode::required); });
  EXPECT_EQ(e.status(), Status::unsupported);
  EXPECT_THAT(e.what(), HasSubstr("FERRY_GDRCOPY=1"));
  EXPECT_THAT(e.what(), HasSubstr("cannot load libgdrapi.so.2"));
}

TEST(FlagMemoryChoice, AutoWithoutLibgdrapiFallsBackGivingTheReason) {
  if (libgdrapi_installed()) GTEST_SKIP() << "libgdrapi.so.2 is installed on this machine";
  const FlagMemoryChoice choice = choose_flag_memory(GdrcopyMode::automatic);
  EXPECT_FALSE(choice.gdr);
  EXPECT_THAT(choice.why_not, HasSubstr("cannot load libgdrapi.so.2"));
}

TEST(FlagMemoryChoice, LibgdrapiWithoutTheGdrdrvModuleNamesTheDeviceNode) {
  if (!libgdrapi_installed() || gdrdrv_loaded())
    GTEST_SKIP() << "needs libgdrapi.so.2 installed without the gdrdrv module loaded";
  const FlagMemoryChoice choice = choose_flag_memory(GdrcopyMode::automatic);
  EXPECT_FALSE(choice.gdr);
  EXPECT_THAT(choice.why_not, HasSubstr("/dev/gdrdrv does not exist"));
  const Error e = error_of([] { choose_flag_memory(GdrcopyMode::required); });
  EXPECT_EQ(e.status(), Status::unsupported);
  EXPECT_THAT(e.what(), HasSubstr("gdrdrv kernel module is not loaded"));
}

TEST(ArrivalFlagWriter, RaisesEachEpochInItsOwnFlagOnly) {
  for (const bool write_combined : {false, true}) {
    ArrivalFlags flags{};
    const ArrivalFlagWriter writer(&flags, write_combined);
    writer.raise_dispatch(5);
    EXPECT_EQ(flags.dispatch_arrived, 5u);
    EXPECT_EQ(flags.combine_arrived, 0u);
    writer.raise_combine(9);
    EXPECT_EQ(flags.dispatch_arrived, 5u);
    EXPECT_EQ(flags.combine_arrived, 9u);
  }
}

// ---- on a GPU

// A workspace for one rank of a small layout, of which wait_arrival uses the outcome and the error.
struct WaitRig {
  ep::Layout layout;
  DeviceBuffer ws_dev;
  MappedHostBuffer ws_host;
  DeviceBuffer epoch{sizeof(uint32_t)};
  Stream stream;
  Workspace ws{};

  WaitRig()
      : layout(small_layout()),
        ws_dev(workspace_device_bytes(layout)),
        ws_host(workspace_host_bytes(layout)) {
    check_cuda(cudaMemset(ws_dev.get(), 0, ws_dev.bytes()), "memset workspace");
    std::memset(ws_host.host(), 0, ws_host.bytes());
    ws = carve_workspace(layout, ws_dev.get(), ws_host.dev());
  }
  static ep::Layout small_layout() {
    testing::A2aCase c;
    c.max_tokens = 8;
    c.hidden = 64;
    return ep::make_layout(testing::config_of(c, 0, FERRY_DEVICE_CUDA));
  }
  // Launches the wait for *flag to reach `want` on the rig's stream (not waiting for it).
  void launch(const uint32_t* flag, uint32_t want, uint64_t timeout_ns) {
    check_cuda(cudaMemcpy(epoch.get(), &want, sizeof want, cudaMemcpyHostToDevice), "upload epoch");
    check_cuda(cudaMemset(ws.arrived, 0xff, sizeof(int32_t)), "poison arrived");
    check_cuda(cudaDeviceSynchronize(), "sync before wait");
    wait_arrival(flag, epoch.get<uint32_t>(), timeout_ns, kErrDispatchTimeout, ws, stream.get());
  }
  int32_t finish() {
    check_cuda(cudaStreamSynchronize(stream.get()), "wait_arrival");
    int32_t arrived = -1;
    check_cuda(cudaMemcpy(&arrived, ws.arrived, sizeof arrived, cudaMemcpyDeviceToHost), "download arrived");
    return arrived;
  }
  DeviceError error() const { return *ws_host.host<DeviceError>(); }
};

constexpr uint64_t kLongWaitNs = 20ull * 1000 * 1000 * 1000;

// The property every placement must have: an epoch the writer raises (before or while the kernel
// polls) is what the kernel sees, per flag, and a missing one times out naming what it saw.
void expect_kernels_see_raised_epochs(const ArrivalFlagMemory& flags) {
  WaitRig rig;
  const ArrivalFlagWriter writer = flags.writer();

  writer.raise_dispatch(5);
  rig.launch(&flags.device()->dispatch_arrived, 5, kLongWaitNs);
  EXPECT_EQ(rig.finish(), 1) << "epoch 5 raised before the wait";
  EXPECT_EQ(rig.error().code, kErrNone);

  rig.launch(&flags.device()->combine_arrived, 5, 50ull * 1000 * 1000);
  EXPECT_EQ(rig.finish(), 0) << "the combine flag was never raised";
  EXPECT_EQ(rig.error().code, kErrDispatchTimeout);
  EXPECT_EQ(rig.error().a, 5);
  EXPECT_EQ(rig.error().b, 0) << "value the kernel saw in the combine flag";
  std::memset(rig.ws_host.host<DeviceError>(), 0, sizeof(DeviceError));

  rig.launch(&flags.device()->combine_arrived, 7, kLongWaitNs);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the kernel is polling by now
  writer.raise_combine(7);
  EXPECT_EQ(rig.finish(), 1) << "epoch 7 raised while the kernel polled";
  EXPECT_EQ(rig.error().code, kErrNone);
}

TEST(ArrivalFlagMemoryOnGpu, AutoUsesGdrcopyOnlyWhereGdrdrvIsLoadedAndKernelsSeeTheFlags) {
  FERRY_REQUIRE_GPU();
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  const ArrivalFlagMemory flags(GdrcopyMode::automatic);
  std::printf("arrival flags in %s\n", flags.description().c_str());
  if (!libgdrapi_installed() || !gdrdrv_loaded()) {
    EXPECT_FALSE(flags.gdrcopy());
    EXPECT_THAT(flags.description(), HasSubstr("pinned mapped host memory: "));
    EXPECT_THAT(flags.description(), HasSubstr(libgdrapi_installed() ? "/dev/gdrdrv" : "libgdrapi.so.2"));
  } else if (flags.gdrcopy()) {
    EXPECT_EQ(flags.description(), "GDRCopy BAR mapping");
    EXPECT_TRUE(flags.writer().write_combined());
  }
  expect_kernels_see_raised_epochs(flags);
}

TEST(ArrivalFlagMemoryOnGpu, ZeroUsesMappedHostMemoryAndKernelsSeeTheFlags) {
  FERRY_REQUIRE_GPU();
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  const ArrivalFlagMemory flags(GdrcopyMode::off);
  EXPECT_FALSE(flags.gdrcopy());
  EXPECT_FALSE(flags.writer().write_combined());
  EXPECT_EQ(flags.description(), "pinned mapped host memory: FERRY_GDRCOPY=0");
  expect_kernels_see_raised_epochs(flags);
}

TEST(ArrivalFlagMemoryOnGpu, RequiredGivesGdrcopyOrUnsupportedNamingWhatIsMissing) {
  FERRY_REQUIRE_GPU();
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  if (!libgdrapi_installed() || !gdrdrv_loaded()) {
    const Error e = error_of([] { ArrivalFlagMemory flags(GdrcopyMode::required); });
    EXPECT_EQ(e.status(), Status::unsupported);
    EXPECT_THAT(e.what(), HasSubstr(libgdrapi_installed() ? "/dev/gdrdrv" : "libgdrapi.so.2"));
    return;
  }
  // gdrdrv is here: either it maps a page of this GPU or the failure says which call refused.
  try {
    const ArrivalFlagMemory flags(GdrcopyMode::required);
    EXPECT_TRUE(flags.gdrcopy());
    expect_kernels_see_raised_epochs(flags);
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::unsupported) << e.what();
    EXPECT_THAT(e.what(), HasSubstr("gdr_"));
  }
}

TEST(ArrivalFlagMemoryOnGpu, MovedOwnerKeepsTheSameFlags) {
  FERRY_REQUIRE_GPU();
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  ArrivalFlagMemory first(GdrcopyMode::automatic);
  ArrivalFlags* const device = first.device();
  ArrivalFlagMemory second;
  second = std::move(first);
  EXPECT_EQ(second.device(), device);
  EXPECT_EQ(first.device(), nullptr);
  expect_kernels_see_raised_epochs(second);
}

}  // namespace
}  // namespace ferry::cuda
