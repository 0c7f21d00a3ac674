// One checked step: runs a schedule on the layer (whose tokens were set) and compares every token of
// this rank's output with the dense reference, and the rows each local expert received with the
// reference router's, exactly (reference.h).
#pragma once
#include <string>

#include "bench/moe_layer/layer.h"
#include "bench/moe_layer/reference.h"

namespace ferry::moe {

// Collective (every rank runs the schedule). Empty when everything matches; otherwise what differs,
// naming the rank, the micro-batch, the token and the element.
std::string verify_schedule(MoeLayer& layer, const LayerShape& shape, const ReferenceOutput& want, int rank,
                            ScheduleKind kind);

}  // namespace ferry::moe
