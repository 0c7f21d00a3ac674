#include "bench/moe_layer/schedule.h"

#include <algorithm>

namespace ferry::moe {

namespace {

Schedule keep(const Schedule& s, bool gemm) {
  Schedule out;
  std::copy_if(s.begin(), s.end(), std::back_inserter(out), [&](const Op& op) { return (op.kind == OpKind::gemm) == gemm; });
  return out;
}

}  // namespace

const char* schedule_name(ScheduleKind kind) { return kind == ScheduleKind::tbo ? "tbo" : "plain"; }

Schedule make_schedule(ScheduleKind kind) {
  using K = OpKind;
  if (kind == ScheduleKind::plain)
    return {{K::dispatch_send, 0}, {K::dispatch_recv, 0}, {K::gemm, 0}, {K::combine_send, 0}, {K::combine_recv, 0}};
  return {{K::dispatch_send, 0}, {K::dispatch_recv, 0}, {K::dispatch_send, 1}, {K::gemm, 0},
          {K::dispatch_recv, 1}, {K::combine_send, 0},  {K::gemm, 1},          {K::combine_recv, 0},
          {K::combine_send, 1},  {K::combine_recv, 1}};
}

int num_micro_batches(const Schedule& s) {
  int n = 0;
  for (const Op& op : s) n = std::max(n, op.batch + 1);
  return n;
}

Schedule transfers_of(const Schedule& s) { return keep(s, false); }
Schedule gemms_of(const Schedule& s) { return keep(s, true); }

std::string describe(const Op& op) {
  const char* what = "";
  switch (op.kind) {
    case OpKind::dispatch_send: what = "dispatch SEND"; break;
    case OpKind::dispatch_recv: what = "dispatch RECV"; break;
    case OpKind::gemm: what = "grouped GEMM"; break;
    case OpKind::combine_send: what = "combine SEND"; break;
    case OpKind::combine_recv: what = "combine RECV"; break;
  }
  return std::string(what) + " of micro-batch " + std::to_string(op.batch);
}

std::string describe(const Schedule& s) {
  std::string out;
  for (const Op& op : s) {
    const char* code = "";
    switch (op.kind) {
      case OpKind::dispatch_send: code = "DS"; break;
      case OpKind::dispatch_recv: code = "DR"; break;
      case OpKind::gemm: code = "G"; break;
      case OpKind::combine_send: code = "CS"; break;
      case OpKind::combine_recv: code = "CR"; break;
    }
    out += (out.empty() ? "" : " ") + std::string(code) + std::to_string(op.batch);
  }
  return out;
}

}  // namespace ferry::moe
