#include "transfer_engine/cuda_driver.h"

#ifdef FERRY_HAVE_CUDA
#include <dlfcn.h>

#include <mutex>
#include <string>

namespace ferry::te {
namespace {

std::once_flag g_once;
CudaDriver g_driver;
bool g_loaded = false;
std::string g_error;

template <typename Fn>
bool resolve(void* lib, const char* name, Fn& out) {
  out = reinterpret_cast<Fn>(dlsym(lib, name));
  return out != nullptr;
}

void load() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* why = dlerror();
    g_error = std::string("cannot load libcuda.so.1 (") + (why ? why : "unknown") + ")";
    return;
  }
  // Kept open for the life of the process: the runtime holds the driver loaded anyway.
  if (!resolve(lib, "cuInit", g_driver.init) ||
      !resolve(lib, "cuGetErrorString", g_driver.get_error_string) ||
      !resolve(lib, "cuPointerGetAttribute", g_driver.pointer_get_attribute)) {
    g_error = "libcuda.so.1 lacks cuInit/cuGetErrorString/cuPointerGetAttribute";
    return;
  }
  resolve(lib, "cuMemGetHandleForAddressRange", g_driver.mem_get_handle_for_address_range);
  resolve(lib, "cuPointerSetAttribute", g_driver.pointer_set_attribute);
  g_loaded = true;
}

}  // namespace

const CudaDriver* cuda_driver() {
  std::call_once(g_once, load);
  return g_loaded ? &g_driver : nullptr;
}

const char* cuda_driver_error() {
  std::call_once(g_once, load);
  return g_error.c_str();
}

}  // namespace ferry::te
#endif
