// The HTML face of the report. One file a user can mail or attach to a ticket: inline CSS, no
// scripts, fonts or images, so it renders the same offline and in a sandboxed viewer.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>

#include "tools/check/report.h"

namespace ferry::check {

static std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

static std::string fixed(double v, int digits) {
  if (v < 0) return "&ndash;";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// Heat map colour: red (slowest) through yellow to green (fastest of the slot), as an HSL hue.
static std::string heat_colour(double gbps, double max_gbps) {
  if (gbps < 0 || max_gbps <= 0) return "#e5e7eb";
  const double t = std::clamp(gbps / max_gbps, 0.0, 1.0);
  char buf[64];
  std::snprintf(buf, sizeof buf, "hsl(%d, 70%%, %d%%)", int(std::lround(120 * t)), int(std::lround(82 - 20 * t)));
  return buf;
}

static const char* kCss = R"(
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #111827; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; }
h2 { font-size: 17px; margin: 28px 0 8px 0; border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 16px 0 6px 0; }
.meta { color: #4b5563; font-size: 13px; }
.banner { display: inline-block; padding: 6px 14px; border-radius: 6px; font-weight: 700; font-size: 18px; margin: 10px 0; }
.banner.PASS { background: #dcfce7; color: #166534; }
.banner.FAIL { background: #fee2e2; color: #991b1b; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 0 12px 0; }
th, td { border: 1px solid #d1d5db; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.verdict { font-weight: 700; text-align: center; }
td.PASS { color: #166534; background: #f0fdf4; }
td.FAIL { color: #991b1b; background: #fef2f2; }
td.SKIP { color: #6b7280; background: #f9fafb; }
table.heat td { text-align: center; min-width: 56px; font-variant-numeric: tabular-nums; }
table.heat td.self { background: #f3f4f6; color: #9ca3af; }
table.heat td.slow { outline: 3px solid #b91c1c; outline-offset: -3px; font-weight: 700; }
table.heat td.failed { background: #7f1d1d; color: #fff; font-weight: 700; }
.legend { font-size: 12px; color: #4b5563; }
.swatch { display: inline-block; width: 14px; height: 14px; vertical-align: middle; border: 1px solid #d1d5db; margin: 0 4px 0 10px; }
pre { background: #f9fafb; border: 1px solid #e5e7eb; padding: 8px; font-size: 12px; overflow-x: auto; }
)";

static void summary_section(std::ostringstream& o, const Report& r) {
  o << "<h2 id=\"summary\">Summary</h2>\n<table id=\"summary-table\">\n"
    << "<tr><th>stage</th><th>check</th><th>result</th><th>reason</th></tr>\n";
  // Failures first: the reader opened the page to find them.
  std::vector<const CheckResult*> order;
  for (const CheckResult& c : r.checks) order.push_back(&c);
  std::stable_sort(order.begin(), order.end(), [](const CheckResult* a, const CheckResult* b) {
    return (a->verdict == Verdict::fail) > (b->verdict == Verdict::fail);
  });
  for (const CheckResult* c : order) {
    const char* v = verdict_name(c->verdict);
    o << "<tr class=\"check\"><td>" << escape(c->stage) << "</td><td>" << escape(c->name)
      << "</td><td class=\"verdict " << v << "\">" << v << "</td><td>" << escape(c->reason) << "</td></tr>\n";
  }
  o << "</table>\n<p class=\"meta\">" << r.count(Verdict::pass) << " passed, " << r.count(Verdict::fail)
    << " failed, " << r.count(Verdict::skip) << " skipped</p>\n";
}

static void inventory_section(std::ostringstream& o, const Report& r) {
  const std::string nodes = nodes_line(r);
  o << "<h2 id=\"inventory\">Inventory</h2>\n";
  if (!nodes.empty()) o << "<p class=\"meta\" id=\"nodes\">" << escape(nodes) << "</p>\n";
  o << "<table id=\"inventory-table\">\n"
    << "<tr><th>rank</th><th>host</th>" << (nodes.empty() ? "" : "<th>node</th>")
    << "<th>local rank</th><th>GPU</th><th>NICs used</th><th>cores</th><th>NUMA</th>"
       "<th>NICs on host (link speed)</th><th>GPUs on host</th></tr>\n";
  for (const RankInventory& inv : r.inventory) {
    std::string nics, host_nics, gpus;
    for (size_t i = 0; i < inv.nics.size(); ++i) nics += (i ? ", " : "") + (inv.nics[i].empty() ? "(none)" : inv.nics[i]);
    for (const std::string& m : inv.missing_nics) nics += " <b>missing: " + escape(m) + "</b>";
    for (size_t i = 0; i < inv.host_nics.size(); ++i) {
      const NicInfo& n = inv.host_nics[i];
      host_nics += (i ? "<br>" : "") + escape(n.name) + " (" +
                   (n.link_gbps < 0 ? std::string("?") : fixed(n.link_gbps, 0) + " Gb/s") + ", link " +
                   escape(n.link_state.empty() ? "unknown" : n.link_state) + ")";
    }
    for (size_t i = 0; i < inv.host_gpus.size(); ++i)
      gpus += (i ? "<br>" : "") + std::to_string(inv.host_gpus[i].index) + ": " + escape(inv.host_gpus[i].name);
    o << "<tr><td class=\"num\">" << inv.rank << "</td><td>" << escape(inv.host) << "</td>"
      << (nodes.empty() ? "" : "<td>" + escape(inv.node_id.empty() ? "-" : inv.node_id) + "</td>")
      << "<td class=\"num\">"
      << inv.local_rank << "</td><td>" << (inv.gpu < 0 ? "&ndash;" : std::to_string(inv.gpu)) << "</td><td>"
      << nics << "</td><td>" << (inv.cores.empty() ? "&ndash;" : escape(inv.cores)) << "</td><td>"
      << (inv.numa_node < 0 ? "&ndash;" : std::to_string(inv.numa_node)) << "</td><td>"
      << (host_nics.empty() ? "&ndash;" : host_nics) << "</td><td>" << (gpus.empty() ? "&ndash;" : gpus)
      << "</td></tr>\n";
  }
  o << "</table>\n";
}

static void links_section(std::ostringstream& o, const Report& r) {
  o << "<h2 id=\"links\">Links</h2>\n";
  if (r.links.empty()) {
    o << "<p class=\"meta\">No link measurements.</p>\n";
    return;
  }
  const int n = r.world_size;
  std::map<int, std::vector<std::vector<const LinkResult*>>> by_slot;
  for (const LinkResult& l : r.links) {
    auto& m = by_slot[l.slot];
    if (m.empty()) m.assign(n, std::vector<const LinkResult*>(n, nullptr));
    if (l.src >= 0 && l.src < n && l.dst >= 0 && l.dst < n) m[l.src][l.dst] = &l;
  }
  // Colour is the fraction of the median of links of the same kind (intra-host links run through
  // memory and would make every wire look slow on one absolute scale), over all NIC slots, so a
  // slow rail stands out next to the others.
  std::map<bool, std::vector<double>> kinds;
  double max_gbps = 0;
  for (const LinkResult& l : r.links) {
    if (!l.ok || l.gbps < 0) continue;
    kinds[l.src_host == l.dst_host].push_back(l.gbps);
    max_gbps = std::max(max_gbps, l.gbps);
  }
  std::map<bool, double> median_of;
  for (auto& [intra, v] : kinds) {
    std::sort(v.begin(), v.end());
    median_of[intra] = v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
  }
  for (const auto& [slot, m] : by_slot) {
    o << "<h3>NIC slot " << slot << ": write bandwidth, Gb/s (row = sender, column = receiver)</h3>\n"
      << "<table class=\"heat\" id=\"bandwidth-slot-" << slot << "\">\n<tr><th>from \\ to</th>";
    for (int b = 0; b < n; ++b) o << "<th>" << b << "</th>";
    o << "</tr>\n";
    for (int a = 0; a < n; ++a) {
      o << "<tr><th>" << a << "</th>";
      for (int b = 0; b < n; ++b) {
        const LinkResult* l = m[a][b];
        if (!l) {
          o << "<td class=\"self\">&ndash;</td>";
          continue;
        }
        const std::string title = "rank " + std::to_string(a) + " (" + l->src_host + ", " + l->src_nic +
                                  ") to rank " + std::to_string(b) + " (" + l->dst_host + ", " + l->dst_nic + ")" +
                                  (l->error.empty() ? "" : ": " + l->error);
        if (!l->ok) {
          o << "<td class=\"failed\" title=\"" << escape(title) << "\">FAIL</td>";
        } else {
          o << "<td class=\"" << (l->slow ? "slow" : "ok") << "\" style=\"background:"
            << heat_colour(l->gbps, median_of[l->src_host == l->dst_host]) << "\" title=\"" << escape(title) << "\">" << fixed(l->gbps, 2)
            << "</td>";
        }
      }
      o << "</tr>\n";
    }
    o << "</table>\n<p class=\"legend\">colour: fraction of the median of same-kind links (intra-host "
      << fixed(median_of.count(true) ? median_of[true] : -1, 2) << " Gb/s, inter-host "
      << fixed(median_of.count(false) ? median_of[false] : -1, 2) << " Gb/s; fastest " << fixed(max_gbps, 2)
      << " Gb/s)<span class=\"swatch\" style=\"background:" << heat_colour(0.001, 1)
      << "\"></span>0<span class=\"swatch\" style=\"background:" << heat_colour(0.5, 1)
      << "\"></span>0.5<span class=\"swatch\" style=\"background:" << heat_colour(1, 1)
      << "\"></span>&ge; 1<span class=\"swatch\" style=\"outline:3px solid #b91c1c\"></span>slow link"
      << "<span class=\"swatch\" style=\"background:#7f1d1d\"></span>failed</p>\n";

    o << "<h3>NIC slot " << slot << ": small-write latency, &micro;s (half round trip, p50)</h3>\n"
      << "<table class=\"heat\" id=\"latency-slot-" << slot << "\">\n<tr><th>from \\ to</th>";
    for (int b = 0; b < n; ++b) o << "<th>" << b << "</th>";
    o << "</tr>\n";
    for (int a = 0; a < n; ++a) {
      o << "<tr><th>" << a << "</th>";
      for (int b = 0; b < n; ++b) {
        const LinkResult* l = m[a][b];
        if (!l) o << "<td class=\"self\">&ndash;</td>";
        else if (!l->ok) o << "<td class=\"failed\">FAIL</td>";
        else o << "<td>" << fixed(l->latency_us_p50, 1) << "</td>";
      }
      o << "</tr>\n";
    }
    o << "</table>\n";
  }
  std::vector<const LinkResult*> bad;
  for (const LinkResult& l : r.links)
    if (!l.ok || l.slow) bad.push_back(&l);
  if (!bad.empty()) {
    o << "<h3>Slow or failed links</h3>\n<table id=\"bad-links\">\n<tr><th>slot</th><th>from</th><th>to</th>"
         "<th>Gb/s</th><th>problem</th></tr>\n";
    for (const LinkResult* l : bad) {
      o << "<tr><td class=\"num\">" << l->slot << "</td><td>rank " << l->src << " (" << escape(l->src_host)
        << ", " << escape(l->src_nic) << ")</td><td>rank " << l->dst << " (" << escape(l->dst_host) << ", "
        << escape(l->dst_nic) << ")</td><td class=\"num\">" << fixed(l->gbps, 2) << "</td><td>"
        << escape(l->ok ? "slow" : l->error) << "</td></tr>\n";
    }
    o << "</table>\n";
  }
}

static void alltoall_section(std::ostringstream& o, const Report& r) {
  o << "<h2 id=\"alltoall\">All-to-all (dispatch / combine)</h2>\n";
  if (r.alltoall.empty()) {
    o << "<p class=\"meta\">Not run.</p>\n";
    return;
  }
  o << "<table id=\"alltoall-table\">\n<tr><th>shape</th><th>routing</th><th>tokens</th><th>hidden</th>"
       "<th>top-k</th><th>experts</th><th>dtype</th><th>device</th><th>iterations</th><th>bytes checked</th>"
       "<th>dispatch p50 / p99 &micro;s</th><th>combine p50 / p99 &micro;s</th><th>result</th></tr>\n";
  for (const AlltoallResult& a : r.alltoall) {
    const char* v = a.ok ? "PASS" : "FAIL";
    o << "<tr><td>" << escape(a.shape) << "</td><td>" << escape(a.routing) << "</td><td class=\"num\">"
      << a.num_tokens << "</td><td class=\"num\">" << a.hidden << "</td><td class=\"num\">" << a.top_k
      << "</td><td class=\"num\">" << a.num_experts << "</td><td>" << escape(a.dtype) << "</td><td>"
      << escape(a.device) << "</td><td class=\"num\">"
      << a.iterations << "</td><td class=\"num\">" << a.bytes_checked << "</td><td class=\"num\">"
      << fixed(a.dispatch_us_p50, 1) << " / " << fixed(a.dispatch_us_p99, 1) << "</td><td class=\"num\">"
      << fixed(a.combine_us_p50, 1) << " / " << fixed(a.combine_us_p99, 1) << "</td><td class=\"verdict " << v
      << "\">" << v << (a.error.empty() ? "" : "<br><small>" + escape(a.error) + "</small>") << "</td></tr>\n";
  }
  o << "</table>\n";
}

std::string render_html(const Report& r) {
  std::ostringstream o;
  const char* result = r.passed() ? "PASS" : "FAIL";
  o << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
    << "<title>ferry-check: " << result << "</title>\n<style>" << kCss << "</style>\n</head>\n<body>\n"
    << "<h1>ferry-check report</h1>\n<div class=\"meta\">" << escape(r.started_utc) << " &middot; provider "
    << escape(r.provider) << " &middot; " << r.world_size << " ranks on " << r.hosts.size() << " host"
    << (r.hosts.size() == 1 ? "" : "s") << " &middot; " << fixed(r.duration_s, 1) << " s &middot; ferry "
    << escape(r.version) << "</div>\n<div class=\"banner " << result << "\" id=\"result\">" << result << "</div>\n";
  summary_section(o, r);
  inventory_section(o, r);
  links_section(o, r);
  alltoall_section(o, r);
  o << "<h2 id=\"options\">Options</h2>\n<pre>" << escape(r.options.dump(2)) << "</pre>\n</body>\n</html>\n";
  return o.str();
}

}  // namespace ferry::check
