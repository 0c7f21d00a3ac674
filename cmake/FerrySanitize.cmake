# Sanitizer and fuzzing builds (scripts/test.sh runs one after the main suite; scripts/fuzz.sh runs the
# fuzzers for longer). Both apply to every C and C++ target of the project, so the layers' own code is
# checked, not only the test drivers. CUDA stays off in these builds: nvcc does not take -fsanitize.
#
#   FERRY_SANITIZE  list of sanitizers, e.g. "address;undefined" (any compiler), "thread"
#   FERRY_FUZZ      ON: libFuzzer targets from fuzz/ (needs clang, and "address" in FERRY_SANITIZE)
set(FERRY_SANITIZE "" CACHE STRING "Sanitizers for every C/C++ target, e.g. address;undefined")
option(FERRY_FUZZ "Build the libFuzzer targets in fuzz/ (clang)" OFF)

if(FERRY_SANITIZE)
  list(JOIN FERRY_SANITIZE "," _ferry_sanitizers)
  set(_ferry_san_flags -fsanitize=${_ferry_sanitizers} -fno-omit-frame-pointer)
  if("undefined" IN_LIST FERRY_SANITIZE)
    # A report is a failure, not a line in a log nobody reads.
    list(APPEND _ferry_san_flags -fno-sanitize-recover=undefined)
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_ferry_san_flags}>")
  add_link_options(-fsanitize=${_ferry_sanitizers})
  if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    # Debian's gcc links --as-needed, clang does not: without it every test program would load
    # libfabric's psm provider libraries, whose SIGABRT handler turns an abort into exit(1).
    add_link_options(LINKER:--as-needed)
  endif()
  message(STATUS "ferry: sanitizers ${_ferry_sanitizers}")
endif()

if(FERRY_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "FERRY_FUZZ needs clang (libFuzzer): configure with -DCMAKE_CXX_COMPILER=clang++ "
                        "-DCMAKE_C_COMPILER=clang")
  endif()
  if(NOT "address" IN_LIST FERRY_SANITIZE)
    message(FATAL_ERROR "FERRY_FUZZ needs FERRY_SANITIZE to include address")
  endif()
  # Coverage feedback for the libraries the fuzz targets link; only the targets link libFuzzer's main.
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:-fsanitize=fuzzer-no-link>")
endif()
