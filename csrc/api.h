// What the C API offers this repository's C++ programs beyond ferry.h: tools and tests that already
// run a te::Bootstrap hand it to ferry_a2a_create as it is, without a C callback in between (whose
// int result would lose the error's status and text).
#pragma once
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::api {

// A ferry_bootstrap_t over `bootstrap`, which the caller keeps alive until this handle and every
// ferry_a2a_t created from it are destroyed (ferry_bootstrap_destroy releases the handle only).
ferry_bootstrap_t borrow_bootstrap(te::Bootstrap& bootstrap);

}  // namespace ferry::api
