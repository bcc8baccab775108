#!/usr/bin/env bash
# HolePunch real-NAT lab: network namespaces, nftables NATs, userspace delay lines.
# See docs/lab.md for the topology, the addresses and how each NAT type is built.
#
#   lab.sh up [options]        create the lab (cleans up after itself if anything fails)
#   lab.sh down                delete everything the lab made (idempotent)
#   lab.sh exec HOST -- CMD…   run CMD inside HOST's namespace
#   lab.sh status [--json|--env]
#   lab.sh check               exit 0 if this machine can run the lab, else print why
#   lab.sh hosts               list the host names
#   lab.sh list                list the labs present on this machine (any name)
#   lab.sh renat [--nat-a T] [--nat-b T] [--port-preservation…] [--mapping-timeout…]
#                              re-make both routers' NAT in a running lab (links and delays stay)
#
# Instance name: env HP_LAB (default "hp"); every namespace is "$HP_LAB-<host>".
set -euo pipefail

if [[ -n ${HP_LAB_TRACE:-} ]]; then  # debugging: timestamped xtrace appended to this file
    exec 2>>"$HP_LAB_TRACE"
    PS4='+ $EPOCHREALTIME ${FUNCNAME[0]:-main}: '
    set -x
fi
LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
P=${HP_LAB:-hp}
if ! [[ $P =~ ^[a-z][a-z0-9]{0,15}$ ]]; then
    echo "lab.sh: HP_LAB must match [a-z][a-z0-9]{0,15}, got '$P'" >&2
    exit 2
fi
STATE=${HP_LAB_STATE_DIR:-${TMPDIR:-/tmp}/holepunch-lab-$P}
PYTHON=${HP_LAB_PYTHON:-python3}

HOSTS=(wan rdv other nat-a nat-b peer-a peer-b)

# ---- addresses (documentation ranges on the public side; private LANs exist only inside) ----
WAN_GW1=198.51.100.1      # the "internet" router (bridge in the wan namespace)
WAN_GW2=203.0.113.1
RDV_IP1=198.51.100.10     # rendezvous, primary address
RDV_IP2=198.51.100.11     # rendezvous, alternate address (RFC 5780)
OTHER_IP=198.51.100.20    # a third public host (impostors, third-party probes)
NAT_A_PUB=203.0.113.10
NAT_B_PUB=203.0.113.20
NAT_A_LAN=10.0.1.1
NAT_B_LAN=10.0.2.1
PEER_A_IP=10.0.1.2
PEER_B_IP=10.0.2.2
PROBE_PORTS=(3478 3479)   # probe/echo server ports on both rendezvous addresses
SEQ_BASE=20000            # symmetric_seq: first external port
SEQ_SIZE=4096             # symmetric_seq: ports SEQ_BASE … SEQ_BASE+SEQ_SIZE-1, then wraps
RANDOM_RANGE=1024-65535   # symmetric_random: fully-random allocation range
XOR_PORT=0x5a5a           # cone types without port preservation: external = internal XOR this

NAT_TYPES="full_cone restricted port_restricted symmetric_seq symmetric_random"

die() { echo "lab.sh: $*" >&2; exit 1; }
log() { [[ -n ${HP_LAB_QUIET:-} ]] || echo "lab[$P]: $*" >&2; }
ns() { echo "$P-$1"; }
nsx() { local h=$1; shift; ip netns exec "$(ns "$h")" "$@"; }
ns_exists() { [[ -e /run/netns/$1 ]]; }

usage() {
    sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

up options (a plain option applies to both routers; -a / -b suffixed ones to one router):
  --nat-a TYPE, --nat-b TYPE     one of: $NAT_TYPES  (default port_restricted)
  --port-preservation[-a|-b] on|off|auto   (auto: on for cone types, off for symmetric ones)
  --mapping-timeout[-a|-b] SEC   NAT mapping (and UDP conntrack) timeout, default 60
  --delay[-a|-b] MS              one-way delay on the router's WAN link, each direction
  --jitter[-a|-b] MS             +- uniform jitter added to that delay (no reordering)
  --loss[-a|-b] PCT              random loss on the router's WAN link, each direction
  --probe-server                 run lab/probe.py serve on the rendezvous (ports ${PROBE_PORTS[*]})
EOF
}

is_num() { [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]; }

# ------------------------------------------------------------------------------------------
# check: can this machine run the lab?
# ------------------------------------------------------------------------------------------
cmd_check() {
    [[ $(id -u) -eq 0 ]] || { echo "needs root (uid is $(id -u))"; return 1; }
    local t
    for t in ip nft "$PYTHON"; do
        command -v "$t" >/dev/null 2>&1 || { echo "missing tool: $t"; return 1; }
    done
    [[ -c /dev/net/tun ]] || { echo "missing /dev/net/tun (needed for delay lines)"; return 1; }
    local c; c="$P-chk$$"
    if ! ip netns add "$c" 2>/dev/null; then echo "cannot create network namespaces (ip netns add failed)"; return 1; fi
    local ok=0
    ip netns exec "$c" nft add table ip hpchk 2>/dev/null || ok=1
    ip netns delete "$c" 2>/dev/null || true
    [[ $ok -eq 0 ]] || { echo "nftables does not work inside a network namespace"; return 1; }
    echo "ok"
}

# ------------------------------------------------------------------------------------------
# down
# ------------------------------------------------------------------------------------------
alive() {  # $1 pid: running (a zombie waiting to be reaped by init counts as gone)
    local st
    st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && ${st:0:1} != Z ]]
}

kill_pid_file() {
    local f=$1 pid
    pid=$(cat "$f" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    # Only kill it if it still is the process we started (PIDs get reused).
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$LAB_DIR/"; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for i in $(seq 1 100); do alive "$pid" || break; sleep 0.02; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    fi
}

cmd_down() {
    local f n pids pid
    if [[ -d $STATE/pids ]]; then
        for f in "$STATE"/pids/*.pid; do [[ -e $f ]] && kill_pid_file "$f"; done
    fi
    # Every namespace with this lab's prefix; processes still inside them were started in
    # this lab (by its users), kill them by PID so the namespaces really go away.
    local names=()
    for n in "${HOSTS[@]}"; do ns_exists "$(ns "$n")" && names+=("$(ns "$n")"); done
    for n in "${names[@]}"; do
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
    done
    for n in "${names[@]}"; do
        pids=$(ip netns pids "$n" 2>/dev/null || true)
        local i
        for i in $(seq 1 40); do
            [[ -z $pids ]] && break
            sleep 0.05
            pids=$(ip netns pids "$n" 2>/dev/null || true)
        done
        for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns delete "$n" 2>/dev/null || true
    done
    rm -rf "$STATE"
    log "down"
}

# ------------------------------------------------------------------------------------------
# up
# ------------------------------------------------------------------------------------------
declare -A OPT=(
    [nat_a]=port_restricted [nat_b]=port_restricted
    [pp_a]=auto [pp_b]=auto
    [timeout_a]=60 [timeout_b]=60
    [delay_a]=0 [delay_b]=0 [jitter_a]=0 [jitter_b]=0 [loss_a]=0 [loss_b]=0
    [probe]=0
)

parse_up() {
    local o v key
    while [[ $# -gt 0 ]]; do
        o=$1
        case $o in
            --probe-server) OPT[probe]=1; shift; continue ;;
            -h|--help) usage; exit 0 ;;
        esac
        [[ $# -ge 2 ]] || die "option $o needs a value"
        v=$2; shift 2
        case $o in
            --nat-a) OPT[nat_a]=$v ;;
            --nat-b) OPT[nat_b]=$v ;;
            --port-preservation|--port-preservation-a|--port-preservation-b) key=pp ;;&
            --mapping-timeout|--mapping-timeout-a|--mapping-timeout-b) key=timeout ;;&
            --delay|--delay-a|--delay-b) key=delay ;;&
            --jitter|--jitter-a|--jitter-b) key=jitter ;;&
            --loss|--loss-a|--loss-b) key=loss ;;&
            --port-preservation*|--mapping-timeout*|--delay*|--jitter*|--loss*)
                case $o in
                    *-a) OPT[${key}_a]=$v ;;
                    *-b) OPT[${key}_b]=$v ;;
                    *) OPT[${key}_a]=$v; OPT[${key}_b]=$v ;;
                esac ;;
            --nat-*) ;;
            *) die "unknown option $o (see lab.sh up --help)" ;;
        esac
    done
    local s t
    for s in a b; do
        t=${OPT[nat_$s]}
        [[ " $NAT_TYPES " == *" $t "* ]] || die "unknown NAT type '$t' for router $s (one of: $NAT_TYPES)"
        case ${OPT[pp_$s]} in
            on|off) ;;
            auto) if [[ $t == symmetric_* ]]; then OPT[pp_$s]=off; else OPT[pp_$s]=on; fi ;;
            *) die "--port-preservation must be on, off or auto" ;;
        esac
        [[ ${OPT[timeout_$s]} =~ ^[0-9]+$ && ${OPT[timeout_$s]} -ge 1 ]] || die "--mapping-timeout must be a whole number of seconds >= 1"
        for key in delay jitter loss; do
            is_num "${OPT[${key}_$s]}" || die "--$key must be a non-negative number, got '${OPT[${key}_$s]}'"
        done
        awk -v l="${OPT[loss_$s]}" 'BEGIN{exit !(l <= 100)}' || die "--loss must be <= 100"
    done
}

# veth pair from namespace $1 (ifname $2) to namespace $3 (ifname $4); never in the host's namespace.
mkveth() {
    ip -n "$(ns "$1")" link add "$2" type veth peer name "$4" netns "$(ns "$3")"
}

ns_base() {  # per-namespace sysctls, loopback up; IPv6 off (no RS/DAD noise on the links)
    local n; n=$(ns "$1")
    ip netns add "$n"
    ip -n "$n" link set lo up
    # (tolerated to fail: a kernel booted without IPv6 has no such sysctls)
    ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
}

uses_delayline() { awk -v d="${OPT[delay_$1]}" -v j="${OPT[jitter_$1]}" 'BEGIN{exit !(d > 0 || j > 0)}'; }

# The ruleset of a NAT router.  $1 = a|b
nat_ruleset() {
    local s=$1 type=${OPT[nat_$1]} pp=${OPT[pp_$1]} to=${OPT[timeout_$1]} pub
    if [[ $s == a ]]; then pub=$NAT_A_PUB; else pub=$NAT_B_PUB; fi
    cat <<EOF
table ip hpnat {
    # external port -> internal address . port, written by every outbound UDP packet
    map eim {
        type inet_service : ipv4_addr . inet_service
        flags dynamic,timeout
        timeout ${to}s
        size 65535
    }
    # external port . remote address, for address-dependent (restricted) filtering
    set contacted {
        type inet_service . ipv4_addr
        flags dynamic,timeout
        timeout ${to}s
        size 65535
    }
    # UDP packets from the LAN to the routers' public range (probes and QUIC toward the other peer,
    # not the rendezvous): the matrix reads it before and after each punch to count packets sent
    counter topeer {
    }
    # internal endpoints that already have their first (port-preserving) mapping
    set first {
        type ipv4_addr . inet_service
        flags dynamic,timeout
        timeout ${to}s
        size 65535
    }
EOF
    if [[ $type == symmetric_seq ]]; then
        # index -> port map: nft 1.0.6 byte-swaps "numgen inc … offset N" used as a port.
        local i elems=""
        # Each renat moves the sequence to a new block of ports: the new table's counter restarts at 0, and
        # the previous table's conntrack entries (still alive) would otherwise hold the same ports, so a new
        # flow to the same destination could not get its port and would be dropped.
        local base=$((SEQ_BASE + (${OPT[seqgen]:-0} % 8) * SEQ_SIZE))
        for ((i = 0; i < SEQ_SIZE; i++)); do elems+="$i : $((base + i)), "; done
        cat <<EOF
    map seqport {
        typeof numgen inc mod $SEQ_SIZE : udp sport
        elements = { ${elems%, } }
    }
EOF
    fi
    cat <<EOF
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
EOF
    case $type in
        full_cone) echo '        iifname "wan0" meta l4proto udp dnat ip to udp dport map @eim' ;;
        restricted) echo '        iifname "wan0" meta l4proto udp udp dport . ip saddr @contacted dnat ip to udp dport map @eim' ;;
    esac
    cat <<EOF
    }
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
EOF
    case $type in
        full_cone|restricted|port_restricted)
            # plain snat keeps the source port when it can: endpoint-independent mapping.
            # Without port preservation the port is transformed by a fixed bijection (XOR),
            # which stays endpoint-independent (a per-connection random port would not).
            [[ $pp == off ]] && echo "        oifname \"wan0\" meta l4proto udp snat ip to $pub : udp sport ^ $XOR_PORT" \
                && echo "        oifname \"wan0\" meta l4proto tcp snat ip to $pub : tcp sport ^ $XOR_PORT"
            echo "        oifname \"wan0\" snat ip to $pub" ;;
        symmetric_seq)
            [[ $pp == on ]] && echo "        oifname \"wan0\" meta l4proto udp ip saddr . udp sport != @first add @first { ip saddr . udp sport } snat ip to $pub"
            echo "        oifname \"wan0\" meta l4proto udp snat ip to $pub : numgen inc mod $SEQ_SIZE map @seqport"
            echo "        oifname \"wan0\" snat ip to $pub" ;;
        symmetric_random)
            [[ $pp == on ]] && echo "        oifname \"wan0\" meta l4proto udp ip saddr . udp sport != @first add @first { ip saddr . udp sport } snat ip to $pub"
            echo "        oifname \"wan0\" meta l4proto { tcp, udp } snat ip to $pub:$RANDOM_RANGE fully-random"
            echo "        oifname \"wan0\" snat ip to $pub" ;;
    esac
    cat <<EOF
    }
    # after SNAT: remember the mapping (and the contacted remote address) of each outbound packet
    chain record {
        type filter hook postrouting priority srcnat + 10; policy accept;
EOF
    case $type in
        full_cone|restricted)
            echo '        oifname "wan0" iifname "lan0" meta l4proto udp update @eim { udp sport : ct original ip saddr . ct original proto-src }' ;;
    esac
    [[ $type == restricted ]] && echo '        oifname "wan0" iifname "lan0" meta l4proto udp update @contacted { udp sport . ip daddr }'
    cat <<EOF
    }
    # unsolicited inbound traffic is silently dropped (before conntrack confirms an entry)
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "lan0" oifname "wan0" ip daddr 203.0.113.0/24 meta l4proto udp counter name topeer accept
        iifname "lan0" oifname "wan0" accept
        ct state established,related accept
        iifname "wan0" ct status dnat accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" drop
    }
}
EOF
}

# netdev ingress loss on one device: $1 host, $2 ifname, $3 percent
# Loss hits IPv4 only: dropping ARP as well stalled the first packets between the two routers (one segment, so
# they resolve each other) for a second or more per lost exchange, which a real path's loss never does.
add_loss() {
    local h=$1 dev=$2 pct=$3 n
    n=$(awk -v p="$pct" 'BEGIN{printf "%d", p * 100 + 0.5}')
    [[ $n -gt 0 ]] || return 0
    nsx "$h" nft -f - <<EOF
table netdev hploss_$dev {
    chain ingress {
        type filter hook ingress device "$dev" priority -500; policy accept;
        meta protocol ip numgen random mod 10000 < $n drop
    }
}
EOF
}

wait_for_file() {  # $1 file, $2 seconds, $3 what
    local deadline=$((SECONDS + $2))
    while [[ ! -e $1 ]]; do
        [[ $SECONDS -lt $deadline ]] || die "timed out waiting for $3"
        sleep 0.05
    done
}

start_bg() {  # $1 name, rest: command. Detached, fds closed, PID recorded.
    local name=$1; shift
    (
        # Close every inherited descriptor above 2: a caller's pipe or socket (Foundation's
        # Process watches one to see its child exit) must not stay open in a long-lived child.
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)) && { eval "exec $fd>&-" 2>/dev/null || true; }
        done
        exec "$@" </dev/null >"$STATE/logs/$name.log" 2>&1
    ) &
    echo $! >"$STATE/pids/$name.pid"
}

up_router() {  # $1 = a|b
    local s=$1 h=nat-$1 peer=peer-$1 pub lanip peerip wside
    if [[ $s == a ]]; then pub=$NAT_A_PUB; lanip=$NAT_A_LAN; peerip=$PEER_A_IP; wside=na
    else pub=$NAT_B_PUB; lanip=$NAT_B_LAN; peerip=$PEER_B_IP; wside=nb; fi

    # WAN link: a veth straight to the bridge, or two TAPs joined by the delay line.
    if uses_delayline "$s"; then
        ip -n "$(ns "$h")" tuntap add dev wan0 mode tap
        ip -n "$(ns wan)" tuntap add dev "$wside" mode tap
    else
        mkveth "$h" wan0 wan "$wside"
    fi
    ip -n "$(ns wan)" link set "$wside" master br0 up
    ip -n "$(ns "$h")" addr add "$pub/24" dev wan0
    ip -n "$(ns "$h")" link set wan0 up
    ip -n "$(ns "$h")" route add default via "$WAN_GW2"

    mkveth "$h" lan0 "$peer" eth0
    ip -n "$(ns "$h")" addr add "$lanip/24" dev lan0
    ip -n "$(ns "$h")" link set lan0 up
    ip -n "$(ns "$peer")" addr add "$peerip/24" dev eth0
    ip -n "$(ns "$peer")" link set eth0 up
    ip -n "$(ns "$peer")" route add default via "$lanip"

    nsx "$h" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv4.conf.all.send_redirects=0
    nat_ruleset "$s" >"$STATE/nat-$s.nft"
    nsx "$h" nft -f "$STATE/nat-$s.nft"
    # conntrack is loaded now: its UDP timeouts are the mapping timeout
    nsx "$h" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="${OPT[timeout_$s]}" \
        net.netfilter.nf_conntrack_udp_timeout_stream="${OPT[timeout_$s]}"

    # loss: inbound on the router's wan0, outbound on the bridge side of the link
    add_loss "$h" wan0 "${OPT[loss_$s]}"
    add_loss wan "$wside" "${OPT[loss_$s]}"

    if uses_delayline "$s"; then
        start_bg "delay-$s" ip netns exec "$(ns wan)" "$PYTHON" "$LAB_DIR/delayline.py" \
            --a "/run/netns/$(ns "$h"):wan0" --b "/run/netns/$(ns wan):$wside" \
            --delay "${OPT[delay_$s]}" --jitter "${OPT[jitter_$s]}" --ready-file "$STATE/delay-$s.ready"
    fi
}

write_summary() {
    local s dl_a=false dl_b=false
    uses_delayline a && dl_a=true
    uses_delayline b && dl_b=true
    cat >"$STATE/lab.json" <<EOF
{
  "lab": "$P",
  "state_dir": "$STATE",
  "hosts": {
    "wan":    {"netns": "$(ns wan)",    "addresses": ["$WAN_GW1", "$WAN_GW2"]},
    "rdv":    {"netns": "$(ns rdv)",    "addresses": ["$RDV_IP1", "$RDV_IP2"], "gateway": "$WAN_GW1"},
    "other":  {"netns": "$(ns other)",  "addresses": ["$OTHER_IP"], "gateway": "$WAN_GW1"},
    "nat-a":  {"netns": "$(ns nat-a)",  "addresses": ["$NAT_A_PUB", "$NAT_A_LAN"], "public": "$NAT_A_PUB", "lan": "$NAT_A_LAN", "gateway": "$WAN_GW2"},
    "nat-b":  {"netns": "$(ns nat-b)",  "addresses": ["$NAT_B_PUB", "$NAT_B_LAN"], "public": "$NAT_B_PUB", "lan": "$NAT_B_LAN", "gateway": "$WAN_GW2"},
    "peer-a": {"netns": "$(ns peer-a)", "addresses": ["$PEER_A_IP"], "gateway": "$NAT_A_LAN", "router": "nat-a"},
    "peer-b": {"netns": "$(ns peer-b)", "addresses": ["$PEER_B_IP"], "gateway": "$NAT_B_LAN", "router": "nat-b"}
  },
  "nat": {
    "a": {"type": "${OPT[nat_a]}", "public": "$NAT_A_PUB", "port_preservation": "${OPT[pp_a]}", "mapping_timeout": ${OPT[timeout_a]}, "delay_ms": ${OPT[delay_a]}, "jitter_ms": ${OPT[jitter_a]}, "loss_pct": ${OPT[loss_a]}, "delay_line": $dl_a},
    "b": {"type": "${OPT[nat_b]}", "public": "$NAT_B_PUB", "port_preservation": "${OPT[pp_b]}", "mapping_timeout": ${OPT[timeout_b]}, "delay_ms": ${OPT[delay_b]}, "jitter_ms": ${OPT[jitter_b]}, "loss_pct": ${OPT[loss_b]}, "delay_line": $dl_b}
  },
  "probe_server": $( [[ ${OPT[probe]} == 1 ]] && echo "[\"$RDV_IP1:${PROBE_PORTS[0]}\", \"$RDV_IP1:${PROBE_PORTS[1]}\", \"$RDV_IP2:${PROBE_PORTS[0]}\", \"$RDV_IP2:${PROBE_PORTS[1]}\"]" || echo null)
}
EOF
    {
        echo "HP_LAB=$P"
        echo "HP_LAB_STATE_DIR=$STATE"
        for s in wan rdv other nat-a nat-b peer-a peer-b; do
            local u=${s^^}; u=${u//-/_}
            echo "HP_LAB_NS_$u=$(ns "$s")"
        done
        echo "HP_LAB_WAN_GW1=$WAN_GW1"
        echo "HP_LAB_WAN_GW2=$WAN_GW2"
        echo "HP_LAB_RDV_IP1=$RDV_IP1"
        echo "HP_LAB_RDV_IP2=$RDV_IP2"
        echo "HP_LAB_OTHER_IP=$OTHER_IP"
        echo "HP_LAB_NAT_A_PUBLIC=$NAT_A_PUB"
        echo "HP_LAB_NAT_B_PUBLIC=$NAT_B_PUB"
        echo "HP_LAB_NAT_A_LAN=$NAT_A_LAN"
        echo "HP_LAB_NAT_B_LAN=$NAT_B_LAN"
        echo "HP_LAB_PEER_A_IP=$PEER_A_IP"
        echo "HP_LAB_PEER_B_IP=$PEER_B_IP"
        echo "HP_LAB_NAT_A_TYPE=${OPT[nat_a]}"
        echo "HP_LAB_NAT_B_TYPE=${OPT[nat_b]}"
    } >"$STATE/lab.env"
}

cmd_up() {
    parse_up "$@"
    local h
    for h in "${HOSTS[@]}"; do
        ns_exists "$(ns "$h")" && die "lab '$P' (namespace $(ns "$h")) already exists; run 'HP_LAB=$P lab.sh down' first"
    done
    command -v nft >/dev/null || die "nft not found (apt-get install nftables)"
    [[ $(id -u) -eq 0 ]] || die "needs root"

    # From here on, any failure (or Ctrl-C) removes whatever was made.
    trap 'rc=$?; trap - EXIT INT TERM; if [[ $rc -ne 0 && -z ${HP_LAB_KEEP_ON_FAIL:-} ]]; then echo "lab.sh: up failed (exit $rc), cleaning up" >&2; cmd_down; fi; exit $rc' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM

    rm -rf "$STATE"
    mkdir -p "$STATE/pids" "$STATE/logs"
    for h in "${HOSTS[@]}"; do ns_base "$h"; done

    # The public segment: a bridge inside the wan namespace, routing between both /24s.
    ip -n "$(ns wan)" link add br0 type bridge
    ip -n "$(ns wan)" addr add "$WAN_GW1/24" dev br0
    ip -n "$(ns wan)" addr add "$WAN_GW2/24" dev br0
    ip -n "$(ns wan)" link set br0 up
    nsx wan sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.br0.send_redirects=0 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0

    mkveth rdv eth0 wan rdv
    ip -n "$(ns wan)" link set rdv master br0 up
    ip -n "$(ns rdv)" addr add "$RDV_IP1/24" dev eth0
    ip -n "$(ns rdv)" addr add "$RDV_IP2/24" dev eth0
    ip -n "$(ns rdv)" link set eth0 up
    ip -n "$(ns rdv)" route add default via "$WAN_GW1"

    mkveth other eth0 wan other
    ip -n "$(ns wan)" link set other master br0 up
    ip -n "$(ns other)" addr add "$OTHER_IP/24" dev eth0
    ip -n "$(ns other)" link set eth0 up
    ip -n "$(ns other)" route add default via "$WAN_GW1"

    [[ ${HP_LAB_FAIL_AT:-} == public ]] && die "failing on purpose after the public segment (HP_LAB_FAIL_AT)"

    up_router a
    up_router b
    [[ ${HP_LAB_FAIL_AT:-} == routers ]] && die "failing on purpose after the routers (HP_LAB_FAIL_AT)"

    for s in a b; do
        uses_delayline "$s" && wait_for_file "$STATE/delay-$s.ready" 10 "the delay line of router $s"
    done

    if [[ ${OPT[probe]} == 1 ]]; then
        start_bg probe-server ip netns exec "$(ns rdv)" "$PYTHON" "$LAB_DIR/probe.py" serve \
            --bind "$RDV_IP1:${PROBE_PORTS[0]}" --bind "$RDV_IP1:${PROBE_PORTS[1]}" \
            --bind "$RDV_IP2:${PROBE_PORTS[0]}" --bind "$RDV_IP2:${PROBE_PORTS[1]}" \
            --ready-file "$STATE/probe-server.ready"
        wait_for_file "$STATE/probe-server.ready" 10 "the probe server"
    fi

    # Bounded wait until both peers reach the rendezvous through their NAT (ARP resolved, links up).
    for s in a b; do
        nsx "peer-$s" "$PYTHON" "$LAB_DIR/probe.py" ping --to "$RDV_IP1" --timeout 10 >/dev/null \
            || die "peer-$s cannot reach the rendezvous"
    done
    # (the pings leave only ICMP conntrack entries behind; no UDP mapping exists yet)

    write_summary
    declare -p OPT | sed 's/^declare -A/declare -gA/' >"$STATE/opts"
    trap - EXIT INT TERM
    log "up: nat-a=${OPT[nat_a]} nat-b=${OPT[nat_b]} (state in $STATE)"
}

# Re-make both routers' NAT (types, port preservation, mapping timeout) in a running lab, keeping the
# links, delay lines and background processes: the matrix runs all 25 pairs in one lab this way.
# The table is replaced atomically (its dynamic maps start empty); conntrack entries of old flows stay
# but belong to ports no new punch uses (each punch binds fresh ephemeral ports).
cmd_renat() {
    local h
    for h in "${HOSTS[@]}"; do ns_exists "$(ns "$h")" || die "lab '$P' is not up (no namespace $(ns "$h"))"; done
    [[ -e $STATE/opts ]] || die "lab '$P' has no saved options (made by an older lab.sh?)"
    # shellcheck disable=SC1091
    source "$STATE/opts"
    # the previous types' auto port preservation must be re-derived for the new types
    OPT[pp_a]=auto; OPT[pp_b]=auto
    OPT[seqgen]=$(( ${OPT[seqgen]:-0} + 1 ))
    parse_up "$@"
    local s
    for s in a b; do
        nat_ruleset "$s" >"$STATE/nat-$s.nft"
        { echo "delete table ip hpnat"; cat "$STATE/nat-$s.nft"; } | nsx "nat-$s" nft -f -
        nsx "nat-$s" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="${OPT[timeout_$s]}" \
            net.netfilter.nf_conntrack_udp_timeout_stream="${OPT[timeout_$s]}"
    done
    declare -p OPT | sed 's/^declare -A/declare -gA/' >"$STATE/opts"
    write_summary
    log "renat: nat-a=${OPT[nat_a]} nat-b=${OPT[nat_b]}"
}

cmd_status() {
    local fmt=${1:-text}
    local up=1 h
    for h in "${HOSTS[@]}"; do ns_exists "$(ns "$h")" || up=0; done
    if [[ $up == 0 || ! -e $STATE/lab.json ]]; then
        case $fmt in
            --json) echo "{\"lab\": \"$P\", \"up\": false}" ;;
            --env) echo "HP_LAB=$P"; echo "HP_LAB_UP=0" ;;
            *) echo "lab '$P' is down" ;;
        esac
        return 3
    fi
    case $fmt in
        --json) cat "$STATE/lab.json" ;;
        --env) echo "HP_LAB_UP=1"; cat "$STATE/lab.env" ;;
        *)
            "$PYTHON" - "$STATE/lab.json" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print("lab %s is up (state in %s)" % (j["lab"], j["state_dir"]))
for name, h in j["hosts"].items():
    print("  %-7s netns %-14s %s" % (name, h["netns"], ", ".join(h["addresses"])))
for r in ("a", "b"):
    n = j["nat"][r]
    print("  nat-%s: %s, public %s, port preservation %s, mapping timeout %ss, delay %sms +-%sms, loss %s%%"
          % (r, n["type"], n["public"], n["port_preservation"], n["mapping_timeout"], n["delay_ms"], n["jitter_ms"], n["loss_pct"]))
if j.get("probe_server"):
    print("  probe server on rdv: " + ", ".join(j["probe_server"]))
EOF
            ;;
    esac
}

cmd_exec() {
    [[ $# -ge 1 ]] || die "usage: lab.sh exec HOST -- CMD…"
    local h=$1; shift
    [[ " ${HOSTS[*]} " == *" $h "* ]] || die "unknown host '$h' (one of: ${HOSTS[*]})"
    [[ ${1:-} == -- ]] && shift
    [[ $# -ge 1 ]] || die "usage: lab.sh exec HOST -- CMD…"
    ns_exists "$(ns "$h")" || die "lab '$P' is not up (no namespace $(ns "$h"))"
    exec ip netns exec "$(ns "$h")" "$@"
}

cmd_list() {  # every lab: a namespace "<name>-wan" next to "<name>-rdv"
    local f n
    for f in /run/netns/*-wan; do
        [[ -e $f ]] || continue
        n=${f##*/}; n=${n%-wan}
        [[ $n =~ ^[a-z][a-z0-9]{0,15}$ && -e /run/netns/$n-rdv ]] && echo "$n"
    done
    return 0
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case $cmd in
        up) cmd_up "$@" ;;
        down) cmd_down ;;
        exec) cmd_exec "$@" ;;
        status) cmd_status "$@" ;;
        check) cmd_check ;;
        hosts) echo "${HOSTS[*]}" ;;
        list) cmd_list ;;
        renat) cmd_renat "$@" ;;
        ruleset) parse_up "$@"; nat_ruleset a ;;  # debugging: print router a's ruleset for these options
        -h|--help|help|"") usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
