#include "bench/ep/published.h"

namespace ferry::bench {

const std::vector<PublishedFigure>& published_figures() {
  static const std::vector<PublishedFigure> figures = {
      {"pplx-garden, EFA (2x200G)", "decode", 8, 49.7, 64.2},
      {"pplx-garden, EFA (2x200G)", "decode", 16, 214.8, 241.5},
      {"pplx-garden, EFA (2x200G)", "decode", 32, 229.1, 335.0},
      {"pplx-garden, EFA (2x200G)", "decode", 64, 266.7, 391.2},
      {"pplx-garden, ConnectX-7", "decode", 8, 50.5, 65.3},
      {"pplx-garden, ConnectX-7", "decode", 16, 110.2, 185.5},
      {"pplx-garden, ConnectX-7", "decode", 32, 153.9, 266.3},
      {"pplx-garden, ConnectX-7", "decode", 64, 187.5, 309.1},
      {"DeepEP low-latency, CX-7", "decode", 8, 163, 318},
      {"DeepEP low-latency, CX-7", "decode", 16, 173, 329},
      {"DeepEP low-latency, CX-7", "decode", 32, 182, 350},
      {"DeepEP low-latency, CX-7", "decode", 64, 186, 353},
      {"UCCL-EP, EFA p5en", "decode", 16, 226, 293},
      {"UCCL-EP, EFA p5en", "decode", 32, 465, 694},
      {"pplx-garden, EFA (2x200G)", "prefill", 16, 3196.7, 5379.1},
      {"pplx-garden, EFA (2x200G)", "prefill", 64, 5334.3, 9779.3},
  };
  return figures;
}

std::string published_shape(const Options& o) {
  const bool base = o.hidden == 7168 && o.topk == 8 && o.experts == 256 &&
                    o.in_dtype == FERRY_FP8_E4M3 && o.out_dtype == FERRY_BF16;
  if (!base) return {};
  if (o.tokens == 128) return "decode";
  if (o.tokens == 4096) return "prefill";
  return {};
}

std::vector<PublishedFigure> published_for(const Options& o, int ep_size) {
  std::vector<PublishedFigure> out;
  const std::string shape = published_shape(o);
  if (shape.empty()) return out;
  for (const auto& f : published_figures()) {
    if (f.ep_size == ep_size && shape == f.shape) out.push_back(f);
  }
  return out;
}

}  // namespace ferry::bench
