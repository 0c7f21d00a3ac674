// Ranks agree on the config before anything is built: ferry_a2a_create allgathers one fixed-size
// description of each rank's config (ConfigAgreement) and every rank checks all of them the same
// way, so a difference fails create on every rank with the same message, naming the field and the
// ranks' values.
//
// Must agree (compared field by field, against the lowest rank that sent a readable description):
//  world_size, num_experts, experts_per_token, max_tokens_per_rank, hidden_dim, in_dtype,
//  scale_block, out_dtype   the wire: record size and layout, count header size, partial size, and
//                           every offset derived from them. Some differences even keep the record
//                           size (hidden 128 bf16 and 64 f32), so nothing later would notice.
//  private_tokens           as resolved (-1 is max_tokens_per_rank): where records land in the
//                           receive region, and whether an overflow round follows.
//  dp_size                  which ranks get whose partials, at which combine slots.
//  combine_weights          what combine returns: one partial per record, or the record's expert
//                           rows (the combine regions' size and every slot's offset).
//  device                   the CUDA backend runs collective setup of its own (node and GPU
//                           discovery, IPC handles) that a host-backend rank never joins: the two
//                           backends cannot be mixed in one job.
//  nets_per_rank, provider  the transfer engine's address exchange: every rank opens as many
//                           endpoints of the same provider (provider after FERRY_PROVIDER).
//  wire version             two builds whose wire formats differ refuse each other.
// Each rank's own (not compared):
//  rank                     must be the bootstrap's rank (checked on each rank).
//  cuda_device              the GPU of each rank.
//  expert_alignment         pads only this rank's expert-major output; no peer sees it.
//  timeout_ms               each rank's deadline for its own waits.
// A rank whose config fails its own checks still takes part, with the reason, so that its peers
// fail at once naming it instead of waiting for it.
//
// check_agreement reads what peers sent: every byte is checked before use (the fuzz target
// fuzz/fuzz_agreement.cpp feeds it arbitrary bytes).
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "ferry/ferry.h"
#include "transfer_engine/error.h"

namespace ferry::ep {

constexpr uint32_t kAgreementMagic = 0x43595246;  // "FRYC" in memory on a little-endian host
// Bump whenever anything another rank reads changes: record or count header, tags, buffer layout.
constexpr uint32_t kWireVersion = 2;
// The same in every version, so that an older or newer build's description is still read far
// enough to say which version it is.
constexpr size_t kAgreementBytes = 256;

struct ConfigAgreement {
  uint32_t magic;
  uint32_t wire_version;
  int32_t rank;    // the bootstrap rank that sent it
  int32_t status;  // Status of the sender's own config checks (0: passed)
  int32_t world_size;
  int32_t num_experts;
  int32_t experts_per_token;
  int32_t max_tokens_per_rank;
  int32_t hidden_dim;
  int32_t in_dtype;
  int32_t scale_block;
  int32_t out_dtype;
  int32_t device;
  int32_t nets_per_rank;
  int32_t dp_size;
  int32_t private_tokens;  // -1 (automatic) as max_tokens_per_rank
  int32_t combine_weights;
  char provider[32];       // NUL-padded, truncated
  char error[156];         // the sender's own config error, NUL-padded, truncated
};
static_assert(sizeof(ConfigAgreement) == kAgreementBytes);

// This rank's description. `provider`: what the transfer engine will open (FERRY_PROVIDER, else
// the config's, else its default); `status`/`error`: the outcome of this rank's own checks.
ConfigAgreement describe_config(const ferry_a2a_config_t& config, int bootstrap_rank, const std::string& provider,
                                Status status, const std::string& error);

struct AgreementOutcome {
  Status status = Status::ok;
  std::string message;  // empty when every rank agrees and every config passed its own checks
};

// Every rank's description (world_size * kAgreementBytes bytes, rank-major) as this rank (`me`)
// received them. Reports, in this order, ranks running another build, fields that differ (each
// with the reference rank's value and the first few differing ranks' values), and other ranks
// whose configs failed their own checks. The text is bounded whatever the world size.
AgreementOutcome check_agreement(std::span<const uint8_t> all, int world_size, int me);

}  // namespace ferry::ep
