// Published EP latencies (other hardware) that ferry-bench can print beside its own, and the
// memory reference points of --dry-run. Decode = 128 tokens/rank, hidden 7168, top-8, 256 experts,
// fp8 dispatch, bf16 combine; prefill = the same shape with 4096 tokens/rank.
#pragma once
#include <string>
#include <vector>

#include "bench/ep/options.h"

namespace ferry::bench {

struct PublishedFigure {
  const char* system;   // "pplx-garden, EFA (2x200G)"
  const char* shape;    // "decode" | "prefill"
  int ep_size;
  double dispatch_us;
  double combine_us;
};

const std::vector<PublishedFigure>& published_figures();

// "decode" or "prefill" when the options are exactly that published shape, else "".
std::string published_shape(const Options& o);

// Figures for this EP size and shape (empty when the shape is not a published one).
std::vector<PublishedFigure> published_for(const Options& o, int ep_size);

// --dry-run reference points at EP64 decode.
constexpr double kPplxGardenEp64RecvBufferBytes = 670.0 * 1024 * 1024;   // ~670 MiB per receive buffer
constexpr double kDeepEpLowLatencyEp64BytesPerGpu = 1.9e9;               // ~1.9 GB per GPU

}  // namespace ferry::bench
