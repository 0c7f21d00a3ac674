// The host backend's byte movers: pack (dispatch-send), unpack (dispatch-recv), combine-send and
// combine-recv as plain loops over the buffers the Protocol moves. They are the reference for the
// CUDA kernels, which must produce the same bytes.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "csrc/plan.h"

namespace ferry::ep::host {

// Quantize on dispatch (ferry.h, ferry_quantize_t): x holds bf16 and pack casts each token once,
// into its first record, with dtype::quantize_block; its other records copy those bytes.
struct Quantize {
  bool enabled = false;
  bool round_scale = false;
};

// Dispatch-send. Writes, for every destination d, the count header and the run of records (in
// source token order) at layout.send_section_offset(d, plan.dest_offset[d]) of send_buffer.
// x: [num_tokens][hidden] in_dtype (bf16 with quantize); x_scale: [num_tokens][num_scales], or null
// without scales and with quantize; indices/weights: [num_tokens][top_k], routing validated.
void pack_dispatch(const Layout& layout, const SendPlan& plan, const void* x, const float* x_scale,
                   const int32_t* indices, const float* weights, void* send_buffer, Quantize quantize = {});
// pack_dispatch in parts: the count headers, then the records of tokens [t_begin, t_end) (parts
// over disjoint token ranges write disjoint bytes).
void pack_count_headers(const Layout& layout, const SendPlan& plan, void* send_buffer);
void pack_dispatch_tokens(const Layout& layout, const SendPlan& plan, const void* x, const float* x_scale,
                          const int32_t* indices, const float* weights, void* send_buffer, Quantize quantize,
                          int64_t t_begin, int64_t t_end);

// What combine needs of every received record, in receive order (sender-major).
struct ReceivedRoutes {
  std::vector<int32_t> num_routes;  // [records]
  std::vector<int64_t> row;         // [records * top_k] row in the batched layout (e * max_rows + r)
  std::vector<float> weight;        // [records * top_k]
};

// Dispatch-recv. Reads every received record (record p of sender s at
// layout.recv_record_offset(s, p, plan.overflow_before[s])), checks its header against what the
// sender announced (Status::peer_failed naming the sender, before anything is written out of
// place), and writes the expert-major output: local expert e's rows at e * max_rows_per_expert,
// rows ordered by source rank then source token, rows from the count up to the aligned count
// zeroed (payload and scales). out_expert_x_scale may be null without scales; scale_layout is a
// ferry_scale_layout_t (Layout::out_scale_offset).
// out_src_token [rows] and out_num_tokens_per_rank [experts_per_rank][world_size] are optional
// (ferry_dispatch_args_t's out_expert_src_token and out_expert_num_tokens_per_rank).
void unpack_dispatch(const Layout& layout, const RecvPlan& plan, const void* recv_buffer,
                     int32_t* out_expert_num_tokens, void* out_expert_x, float* out_expert_x_scale,
                     ReceivedRoutes& routes, int scale_layout = kScaleRowMajor, int32_t* out_src_token = nullptr,
                     int32_t* out_num_tokens_per_rank = nullptr);

// Combine-send. Partial of received record i = sum over its routes of weight * expert_y[row],
// accumulated in fp32 and rounded once to out_dtype, at combine_send_buffer + i * partial_bytes.
// With weights at combine, record i's slot (combine_slot_bytes) holds its rows instead, route r's
// copied unweighted to r * partial_bytes.
void pack_combine(const Layout& layout, const ReceivedRoutes& routes, const void* expert_y, void* combine_send_buffer);
// Only records [first, end).
void pack_combine_records(const Layout& layout, const ReceivedRoutes& routes, const void* expert_y,
                          void* combine_send_buffer, int64_t first, int64_t end);

// Combine-recv. member_plans[j] is the send plan of member j of this rank's dp group (one plan
// when dp_size is 1); member j's slots follow the slots of members before it. For every token,
// sums its partials in fp32 in destination order and writes (or, with accumulate, adds to)
// out_tokens[t]; a token with no route gets 0 (or keeps its value).
void unpack_combine(const Layout& layout, std::span<const SendPlan> member_plans, const void* combine_recv_buffer,
                    void* out_tokens, bool accumulate);
// Only tokens [t_begin, t_end).
void unpack_combine_tokens(const Layout& layout, std::span<const SendPlan> member_plans,
                           const void* combine_recv_buffer, void* out_tokens, bool accumulate, int64_t t_begin,
                           int64_t t_end);

// Combine-recv with weights at combine (dp_size 1): for every token, acc = 0 (or out_tokens[t] with
// accumulate), then acc += weights[t][k] * row of route k (plan.route_row) for k in top-k order,
// in fp32, rounded once into out_tokens[t]. weights: [num_tokens][top_k].
void unpack_combine_rows(const Layout& layout, const SendPlan& plan, const void* combine_recv_buffer,
                         const float* weights, void* out_tokens, bool accumulate);
// Only tokens [t_begin, t_end).
void unpack_combine_rows_tokens(const Layout& layout, const SendPlan& plan, const void* combine_recv_buffer,
                                const float* weights, void* out_tokens, bool accumulate, int64_t t_begin,
                                int64_t t_end);

}  // namespace ferry::ep::host
