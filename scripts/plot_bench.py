#!/usr/bin/env python3
"""Plots ferry-bench JSON results (ferry-bench --json FILE).

    scripts/plot_bench.py run_ep8.json run_ep16.json ... -o plots/

writes two PNGs into the output folder:
  latency_vs_ep.png      p50 dispatch and combine latency against EP size (runs grouped by shape),
                         with p90..p99 as a band, and the published decode figures (other hardware)
                         as dashed reference lines;
  latency_vs_tokens.png  p50 latency against tokens per rank (runs grouped by EP size), with the
                         published decode (128) and prefill (4096) points of pplx-garden on EFA.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

# Published figures, other hardware: (system, shape, EP size) -> (dispatch us, combine us).
# Decode = 128 tokens/rank, hidden 7168, top-8, 256 experts, fp8 dispatch, bf16 combine.
PUBLISHED = {
    ("pplx-garden EFA (2x200G)", "decode"): {8: (49.7, 64.2), 16: (214.8, 241.5), 32: (229.1, 335.0), 64: (266.7, 391.2)},
    ("pplx-garden ConnectX-7", "decode"): {8: (50.5, 65.3), 16: (110.2, 185.5), 32: (153.9, 266.3), 64: (187.5, 309.1)},
    ("DeepEP low-latency CX-7", "decode"): {8: (163, 318), 16: (173, 329), 32: (182, 350), 64: (186, 353)},
    ("UCCL-EP EFA p5en", "decode"): {16: (226, 293), 32: (465, 694)},
    ("pplx-garden EFA (2x200G)", "prefill"): {16: (3196.7, 5379.1), 64: (5334.3, 9779.3)},
}
TOKENS_OF_SHAPE = {"decode": 128, "prefill": 4096}


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if doc.get("tool") != "ferry-bench" or "results" not in doc:
            sys.exit(f"plot_bench: {path} is not ferry-bench --json output")
        doc["_path"] = path
        runs.append(doc)
    return runs


def shape_key(run):
    """Everything but EP size and tokens: runs that differ only there belong on one line (runs from
    different machines never share a line)."""
    cfg = run["config"]
    return (cfg["hidden"], cfg["topk"], cfg["experts"], cfg["in_dtype"], cfg["out_dtype"],
            cfg["backend"], cfg["provider"], machine_of(run))


def machine_of(run):
    env = run.get("environment", {})
    return f'{env.get("hostname", "?")}/{env.get("num_cpus", "?")}cpu'


def shape_label(key):
    hidden, topk, experts, in_dtype, out_dtype, backend, provider, host = key
    return f"h{hidden} top{topk} E{experts} {in_dtype}->{out_dtype} {backend}/{provider} @{host}"


def published_shape(cfg):
    if (cfg["hidden"], cfg["topk"], cfg["experts"], cfg["in_dtype"], cfg["out_dtype"]) != (7168, 8, 256, "fp8_e4m3", "bf16"):
        return None
    return {128: "decode", 4096: "prefill"}.get(cfg["tokens"])


def plot_vs_ep(plt, runs, out_path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    groups = defaultdict(list)
    for r in runs:
        groups[(shape_key(r), r["config"]["tokens"])].append(r)
    for (key, tokens), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda r: r["config"]["world_size"])
        eps = [r["config"]["world_size"] for r in rs]
        for ax, op in zip(axes, ("dispatch", "combine")):
            p50 = [r["results"][op]["p50_us"] for r in rs]
            p90 = [r["results"][op]["p90_us"] for r in rs]
            p99 = [r["results"][op]["p99_us"] for r in rs]
            line, = ax.plot(eps, p50, "o-", label=f"ferry {tokens} tok, {shape_label(key)}")
            ax.fill_between(eps, p90, p99, color=line.get_color(), alpha=0.15)
            mpi = [r["baseline"].get(op, {}).get("p50_us") if r.get("baseline") else None for r in rs]
            if any(v is not None for v in mpi):
                pts = [(e, v) for e, v in zip(eps, mpi) if v is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "x:", color=line.get_color(),
                        label=f"MPI baseline {tokens} tok")
    shapes = {published_shape(r["config"]) for r in runs} - {None}
    for ax, idx, op in ((axes[0], 0, "dispatch"), (axes[1], 1, "combine")):
        for (system, shape), figs in PUBLISHED.items():
            if shape not in (shapes or {"decode"}):
                continue
            eps = sorted(figs)
            ax.plot(eps, [figs[e][idx] for e in eps], "--", alpha=0.6,
                    label=f"{system} {shape} (published, other hardware)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("EP size (ranks)")
        ax.set_ylabel(f"{op} latency, p50 us (band: p90..p99)")
        ax.set_title(f"{op} vs EP size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot_vs_tokens(plt, runs, out_path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    groups = defaultdict(list)
    for r in runs:
        groups[(shape_key(r), r["config"]["world_size"])].append(r)
    eps_seen = set()
    for (key, ep), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        eps_seen.add(ep)
        rs.sort(key=lambda r: r["config"]["tokens"])
        tokens = [r["config"]["tokens"] for r in rs]
        for ax, op in zip(axes, ("dispatch", "combine")):
            ax.plot(tokens, [r["results"][op]["p50_us"] for r in rs], "o-", label=f"ferry EP{ep}, {shape_label(key)}")
    for ax, idx in ((axes[0], 0), (axes[1], 1)):
        for ep in sorted(eps_seen):
            pts = []
            for shape in ("decode", "prefill"):
                fig_ep = PUBLISHED[("pplx-garden EFA (2x200G)", shape)].get(ep)
                if fig_ep:
                    pts.append((TOKENS_OF_SHAPE[shape], fig_ep[idx]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", alpha=0.6,
                        label=f"pplx-garden EFA EP{ep} (published, other hardware)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel(("dispatch", "combine")[idx] + " latency, p50 us")
        ax.set_title(("dispatch", "combine")[idx] + " vs tokens per rank")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="ferry-bench --json outputs")
    ap.add_argument("-o", "--out-dir", default=".", help="folder for the PNGs (default: .)")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        # A python3 first in PATH (pyenv, venv) may lack the distribution's python3-matplotlib.
        system_python = "/usr/bin/python3"
        if os.path.realpath(sys.executable) != os.path.realpath(system_python) and os.access(system_python, os.X_OK) \
                and not os.environ.get("PLOT_BENCH_REEXEC"):
            os.environ["PLOT_BENCH_REEXEC"] = "1"
            os.execv(system_python, [system_python, os.path.abspath(__file__)] + sys.argv[1:])
        sys.stderr.write("plot_bench: matplotlib is not installed (apt-get install python3-matplotlib)\n")
        return 3
    runs = load(args.json)
    os.makedirs(args.out_dir, exist_ok=True)
    outputs = [os.path.join(args.out_dir, "latency_vs_ep.png"), os.path.join(args.out_dir, "latency_vs_tokens.png")]
    plot_vs_ep(plt, runs, outputs[0])
    plot_vs_tokens(plt, runs, outputs[1])
    for o in outputs:
        print(o)
    return 0


if __name__ == "__main__":
    sys.exit(main())
