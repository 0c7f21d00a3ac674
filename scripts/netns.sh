#!/usr/bin/env bash
# Several "hosts" with several "NICs" on one machine, laid out exactly as the netns tests build them
# (tests/common/netns.h), for running Ferry's programs by hand across hosts. Needs root.
#
#   scripts/netns.sh up HOSTS NICS [PREFIX]      PREFIX-host0.. with fnic<n> = 198.18.<n>.<h+1>/24,
#                                                one bridge fsw<n> per NIC plane in PREFIX-sw
#   scripts/netns.sh down [PREFIX]               removes them
#   scripts/netns.sh rate HOST NIC RATE [PREFIX] token bucket on that link, both ways ("100mbit";
#                                                "off" removes it)
#   scripts/netns.sh link HOST NIC up|down [PREFIX]
#   scripts/netns.sh exec HOST [PREFIX] -- CMD.. runs CMD inside host HOST
#   scripts/netns.sh clean                       removes namespaces left by killed test processes
#
# Example: two hosts, two NICs, a 4-rank run with two ranks per host over tcp:
#   scripts/netns.sh up 2 2
#   for h in 0 1; do for l in 0 1; do
#     scripts/netns.sh exec $h -- env MASTER_ADDR=198.18.0.1 MASTER_PORT=29500 RANK=$((2*h+l)) \
#       WORLD_SIZE=4 LOCAL_RANK=$l LOCAL_WORLD_SIZE=2 FERRY_DOMAINS=fnic0,fnic1 build/bench/ferry-bench ... &
#   done; done; wait
#   scripts/netns.sh down
set -euo pipefail

DEFAULT_PREFIX=ferrydev
usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
need_root() { [ "$(id -u)" = 0 ] || { echo "netns.sh: needs root (network namespaces)" >&2; exit 1; }; }

cmd=${1:-}
[ -n "$cmd" ] || usage
shift

case "$cmd" in
  up)
    need_root
    hosts=${1:?HOSTS}; nics=${2:?NICS}; prefix=${3:-$DEFAULT_PREFIX}
    [ "$hosts" -ge 1 ] && [ "$hosts" -le 250 ] || { echo "netns.sh: HOSTS must be 1..250" >&2; exit 2; }
    [ "$nics" -ge 1 ] && [ "$nics" -le 8 ] || { echo "netns.sh: NICS must be 1..8" >&2; exit 2; }
    sw=$prefix-sw
    # On any failure, take down what was built so far.
    trap '"$0" down "$prefix" >/dev/null 2>&1 || true' ERR
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    for ((n = 0; n < nics; n++)); do
      ip -n "$sw" link add "fsw$n" type bridge
      ip -n "$sw" link set "fsw$n" up
    done
    for ((h = 0; h < hosts; h++)); do
      ns=$prefix-host$h
      ip netns add "$ns"
      ip -n "$ns" link set lo up
      for ((n = 0; n < nics; n++)); do
        ip link add "fnic$n" netns "$ns" type veth peer name "h${h}n$n" netns "$sw"
        ip -n "$sw" link set "h${h}n$n" master "fsw$n"
        ip -n "$sw" link set "h${h}n$n" up
        ip -n "$ns" addr add "198.18.$n.$((h + 1))/24" dev "fnic$n"
        ip -n "$ns" link set "fnic$n" up
      done
    done
    trap - ERR
    echo "netns.sh: $hosts host(s) x $nics NIC(s): namespaces $prefix-host0..$((hosts - 1)), switch $sw"
    for ((h = 0; h < hosts; h++)); do
      addrs=""
      for ((n = 0; n < nics; n++)); do addrs+=" fnic$n=198.18.$n.$((h + 1))"; done
      echo "  host$h:$addrs"
    done
    ;;
  down)
    need_root
    prefix=${1:-$DEFAULT_PREFIX}
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${prefix}-(host[0-9]+|sw)$" || true); do
      ip netns del "$ns"
    done
    ;;
  rate)
    need_root
    h=${1:?HOST}; n=${2:?NIC}; rate=${3:?RATE}; prefix=${4:-$DEFAULT_PREFIX}
    for end in "$prefix-sw h${h}n$n" "$prefix-host$h fnic$n"; do
      set -- $end
      if [ "$rate" = off ]; then
        tc -n "$1" qdisc del dev "$2" root 2>/dev/null || true
      else
        tc -n "$1" qdisc replace dev "$2" root tbf rate "$rate" burst 64kb latency 100ms
      fi
    done
    ;;
  link)
    need_root
    h=${1:?HOST}; n=${2:?NIC}; state=${3:?up|down}; prefix=${4:-$DEFAULT_PREFIX}
    ip -n "$prefix-sw" link set "h${h}n$n" "$state"
    ;;
  exec)
    need_root
    h=${1:?HOST}; shift
    prefix=$DEFAULT_PREFIX
    if [ "${1:-}" != "--" ]; then prefix=${1:?PREFIX}; shift; fi
    [ "${1:-}" = "--" ] && shift
    exec ip netns exec "$prefix-host$h" "$@"
    ;;
  clean)
    need_root
    # Test namespaces are named ferry<pid>c<k>-...; remove those whose process is gone.
    for ns in $(ip netns list | awk '{print $1}' | grep -E '^ferry[0-9]+(c[0-9]+)?-' || true); do
      pid=$(echo "$ns" | sed -E 's/^ferry([0-9]+).*/\1/')
      if ! kill -0 "$pid" 2>/dev/null; then ip netns del "$ns" && echo "removed $ns"; fi
    done
    ;;
  *)
    usage
    ;;
esac
