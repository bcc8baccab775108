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
#   lab.sh topologies          list the topology names (up --topology NAME)
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

# Every host any topology has (down deletes whichever exist); HOSTS is the running topology's set.
ALL_HOSTS=(wan rdv other cgn nat-a nat-b peer-a peer-b)
HOSTS=(wan rdv other nat-a nat-b peer-a peer-b)
TOPOLOGIES="two-nats same-lan same-lan-hairpin cgnat-homes cgnat-vs-nat dual-stack"

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
PEER_B_SAME_LAN_IP=10.0.1.3  # same-lan topologies: peer-b on router a's LAN
LAN_A_NET=10.0.1.0/24
LAN_B_NET=10.0.2.0/24
# carrier-grade NAT (cgnat-* topologies): public 203.0.113.30, inside 100.64.0.0/24 (RFC 6598 shared space)
CGN_PUB=203.0.113.30
CGN_IN=100.64.0.1
CGN_NET=100.64.0.0/24
NAT_A_CGN=100.64.0.10     # router a's WAN address behind the carrier NAT
NAT_B_CGN=100.64.0.20     # router b's (cgnat-homes)
# IPv6 (dual-stack only): documentation prefix, no NAT66, a stateful firewall on each router
WAN6_GW=2001:db8:0:ff::1
RDV6_IP1=2001:db8:0:ff::10
RDV6_IP2=2001:db8:0:ff::11
OTHER6_IP=2001:db8:0:ff::20
NAT_A_WAN6=2001:db8:0:ff::a
NAT_B_WAN6=2001:db8:0:ff::b
LAN6_A_NET=2001:db8:0:1::/64
LAN6_B_NET=2001:db8:0:2::/64
NAT_A_LAN6=2001:db8:0:1::1
NAT_B_LAN6=2001:db8:0:2::1
PEER_A_IP6=2001:db8:0:1::2
PEER_B_IP6=2001:db8:0:2::2
PROBE_PORTS=(3478 3479)   # probe/echo server ports on both rendezvous addresses
TURN_PORT=3500            # coturn's TURN port on RDV_IP1 (up --turn); 3478/3479 are the probe server's, 3490 portmap.sh's
TURN_RELAY_PORTS=(50000 50199)  # coturn's relayed ports on RDV_IP1: a bounded range, well clear of the rest
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
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<EOF

up options (a plain option applies to both routers; -a / -b suffixed ones to one router):
  --topology NAME                one of: $TOPOLOGIES  (default two-nats; docs/lab.md)
  --nat-a TYPE, --nat-b TYPE     one of: $NAT_TYPES  (default port_restricted)
  --port-preservation[-a|-b] on|off|auto   (auto: on for cone types, off for symmetric ones)
  --mapping-timeout[-a|-b] SEC   NAT mapping (and UDP conntrack) timeout, default 60
  --delay[-a|-b] MS              one-way delay on the router's WAN link, each direction
  --jitter[-a|-b] MS             +- uniform jitter added to that delay (no reordering)
  --loss[-a|-b] PCT              random loss on the router's WAN link, each direction
  --probe-server                 run lab/probe.py serve on the rendezvous (ports ${PROBE_PORTS[*]})
  --turn                         run coturn on the rendezvous as a TURN server ($RDV_IP1:$TURN_PORT, REST shared
                                 secret in \$STATE/turn.secret; see docs/lab.md)
  --turn-loss PCT                with --turn: random loss on the relayed leg (datagrams to and from coturn's relayed
                                 ports, each way), a lossy relay for tests
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
    # coturn is not a lab script: its command line names its config file in this lab's state dir instead.
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -e "$LAB_DIR/" -e "$STATE/"; then
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
    for n in "${ALL_HOSTS[@]}"; do ns_exists "$(ns "$n")" && names+=("$(ns "$n")"); done
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
# Router keys: a (nat-a), b (nat-b), c (the carrier-grade NAT `cgn`, cgnat-* topologies only: always an
# endpoint-independent, port-preserving, hairpinning NAT; only its mapping timeout follows --mapping-timeout).
declare -A OPT=(
    [topology]=two-nats
    [nat_a]=port_restricted [nat_b]=port_restricted [nat_c]=port_restricted
    [pp_a]=auto [pp_b]=auto [pp_c]=on
    [timeout_a]=60 [timeout_b]=60 [timeout_c]=60
    [delay_a]=0 [delay_b]=0 [jitter_a]=0 [jitter_b]=0 [loss_a]=0 [loss_b]=0
    [delay_c]=0 [jitter_c]=0 [loss_c]=0
    [probe]=0 [turn]=0 [turn_loss]=0
)

# The hosts of the topology in OPT[topology] (same-lan: one router; cgnat-*: a carrier NAT as well).
topology_hosts() {
    case ${OPT[topology]} in
        same-lan|same-lan-hairpin) HOSTS=(wan rdv other nat-a peer-a peer-b) ;;
        cgnat-homes|cgnat-vs-nat) HOSTS=(wan rdv other cgn nat-a nat-b peer-a peer-b) ;;
        *) HOSTS=(wan rdv other nat-a nat-b peer-a peer-b) ;;
    esac
}

# A running lab's options (and so its topology and hosts), when it has saved them.
load_state() {
    # shellcheck disable=SC1091
    if [[ -e $STATE/opts ]]; then source "$STATE/opts"; fi
    topology_hosts
}

has_ipv6() { [[ ${OPT[topology]} == dual-stack ]]; }
router_host() { case $1 in a) echo nat-a ;; b) echo nat-b ;; c) echo cgn ;; esac; }

# R_PUB: the router's WAN address (behind the carrier NAT: its 100.64 address); R_LANNET: its inside network;
# R_HAIRPIN: 1 when it reflects inside traffic sent to its own public address.  $1 = a|b|c
router_params() {
    R_HAIRPIN=0
    case $1 in
        a) R_PUB=$NAT_A_PUB; R_LANNET=$LAN_A_NET
           [[ ${OPT[topology]} == cgnat-* ]] && R_PUB=$NAT_A_CGN
           [[ ${OPT[topology]} == same-lan-hairpin ]] && R_HAIRPIN=1 ;;
        b) R_PUB=$NAT_B_PUB; R_LANNET=$LAN_B_NET
           [[ ${OPT[topology]} == cgnat-homes ]] && R_PUB=$NAT_B_CGN ;;
        c) R_PUB=$CGN_PUB; R_LANNET=$CGN_NET; R_HAIRPIN=1 ;;
    esac
    return 0
}

parse_up() {
    local o v key
    while [[ $# -gt 0 ]]; do
        o=$1
        case $o in
            --probe-server) OPT[probe]=1; shift; continue ;;
            --turn) OPT[turn]=1; shift; continue ;;
            --topology)
                [[ $# -ge 2 ]] || die "option $o needs a value"
                [[ " $TOPOLOGIES " == *" $2 "* ]] || die "unknown topology '$2' (one of: $TOPOLOGIES)"
                OPT[topology]=$2; shift 2; continue ;;
            -h|--help) usage; exit 0 ;;
        esac
        [[ $# -ge 2 ]] || die "option $o needs a value"
        v=$2; shift 2
        case $o in
            --nat-a) OPT[nat_a]=$v ;;
            --nat-b) OPT[nat_b]=$v ;;
            --turn-loss) is_num "$v" && awk -v l="$v" 'BEGIN{exit !(l <= 100)}' || die "--turn-loss must be 0-100"
                         OPT[turn_loss]=$v ;;
            --port-preservation|--port-preservation-a|--port-preservation-b) key=pp ;;&
            --mapping-timeout|--mapping-timeout-a|--mapping-timeout-b) key=timeout ;;&
            --delay|--delay-a|--delay-b) key=delay ;;&
            --jitter|--jitter-a|--jitter-b) key=jitter ;;&
            --loss|--loss-a|--loss-b) key=loss ;;&
            --port-preservation*|--mapping-timeout*|--delay*|--jitter*|--loss*)
                case $o in
                    *-a) OPT[${key}_a]=$v ;;
                    *-b) OPT[${key}_b]=$v ;;
                    *) OPT[${key}_a]=$v; OPT[${key}_b]=$v; [[ $key == timeout ]] && OPT[timeout_c]=$v ;;
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
        [[ ${OPT[timeout_$s]} =~ ^[0-9]+$ && ${OPT[timeout_$s]} -ge 1 && ${OPT[timeout_c]} =~ ^[0-9]+$ ]] || die "--mapping-timeout must be a whole number of seconds >= 1"
        for key in delay jitter loss; do
            is_num "${OPT[${key}_$s]}" || die "--$key must be a non-negative number, got '${OPT[${key}_$s]}'"
        done
        awk -v l="${OPT[loss_$s]}" 'BEGIN{exit !(l <= 100)}' || die "--loss must be <= 100"
    done
    topology_hosts
}

# veth pair from namespace $1 (ifname $2) to namespace $3 (ifname $4); never in the host's namespace.
mkveth() {
    ip -n "$(ns "$1")" link add "$2" type veth peer name "$4" netns "$(ns "$3")"
}

ns_base() {  # per-namespace sysctls, loopback up; IPv6 off (no RS/DAD noise on the links) except in dual-stack
    local n; n=$(ns "$1")
    ip netns add "$n"
    ip -n "$n" link set lo up
    if has_ipv6; then
        # Static addresses only: no router advertisements or solicitations, and no duplicate address detection
        # (an address stays "tentative" for a second or more, and a peer binding it early would fail).
        ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
            net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_ra=0 \
            net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.default.router_solicitations=0
    else
        # (tolerated to fail: a kernel booted without IPv6 has no such sysctls)
        ip netns exec "$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null || true
    fi
}

uses_delayline() { awk -v d="${OPT[delay_$1]}" -v j="${OPT[jitter_$1]}" 'BEGIN{exit !(d > 0 || j > 0)}'; }

# The ruleset of a NAT router.  $1 = a|b
nat_ruleset() {
    local s=$1 type=${OPT[nat_$1]} pp=${OPT[pp_$1]} to=${OPT[timeout_$1]} pub lannet hairpin
    router_params "$s"
    pub=$R_PUB lannet=$R_LANNET hairpin=$R_HAIRPIN
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
    # Hairpinning: inside traffic to our own public address goes to the inside endpoint that holds that mapping.
    [[ $hairpin == 1 ]] && echo "        iifname \"lan0\" ip daddr $pub meta l4proto udp dnat ip to udp dport map @eim"
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
    if [[ $hairpin == 1 ]]; then
        # ...and leaves with our public address as its source, so the answer comes back through us (and the
        # receiver sees the sender's public endpoint, as from outside).
        if [[ $pp == off && $type != symmetric_* ]]; then
            echo "        oifname \"lan0\" ip saddr $lannet ct status dnat meta l4proto udp snat ip to $pub : udp sport ^ $XOR_PORT"
        fi
        echo "        oifname \"lan0\" ip saddr $lannet ct status dnat snat ip to $pub"
    fi
    cat <<EOF
    }
    # after SNAT: remember the mapping (and the contacted remote address) of each outbound packet
    chain record {
        type filter hook postrouting priority srcnat + 10; policy accept;
EOF
    if [[ $type == full_cone || $type == restricted || $hairpin == 1 ]]; then
        echo '        oifname "wan0" iifname "lan0" meta l4proto udp update @eim { udp sport : ct original ip saddr . ct original proto-src }'
    fi
    [[ $type == restricted ]] && echo '        oifname "wan0" iifname "lan0" meta l4proto udp update @contacted { udp sport . ip daddr }'
    cat <<EOF
    }
    # unsolicited inbound traffic is silently dropped (before conntrack confirms an entry)
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "lan0" oifname "wan0" ip daddr 203.0.113.0/24 meta l4proto udp counter name topeer accept
        iifname "lan0" oifname "wan0" accept
        # inside to inside: hairpinned flows (only DNATed ones are routed back in; counted, as they were sent to a
        # public address) and, with br_netfilter, the bridge
        iifname "lan0" oifname "lan0" ct status dnat meta l4proto udp counter name topeer accept
        iifname "lan0" oifname "lan0" accept
        ct state established,related accept
        iifname "wan0" ct status dnat accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" drop
        # inside UDP to our public address that no hairpin rule took: dropped, as a router without hairpinning does
        iifname "lan0" ip daddr $pub meta l4proto udp counter name topeer drop
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

# coturn in rdv as the lab's TURN server (up --turn): REST shared-secret auth (the lab rendezvous mints credentials
# from $STATE/turn.secret), UDP only, relayed addresses on RDV_IP1 in a bounded port range, quotas per user (one
# per NodeID and expiry) and in total (lab peers delete theirs as they exit; 300 leaves room for killed ones). The secret is in a mode-600 config file, never on a command line.
up_turn() {
    command -v turnserver >/dev/null || die "turnserver not found (apt-get install coturn)"
    local mask
    mask=$(umask)
    umask 077
    od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$STATE/turn.secret"
    : >"$STATE/turnserver.conf.tmp"
    umask "$mask"
    (
        cat <<CONF
listening-ip=$RDV_IP1
listening-port=$TURN_PORT
relay-ip=$RDV_IP1
min-port=${TURN_RELAY_PORTS[0]}
max-port=${TURN_RELAY_PORTS[1]}
use-auth-secret
static-auth-secret=$(cat "$STATE/turn.secret")
realm=holepunch.lab
user-quota=4
total-quota=300
no-tls
no-dtls
no-tcp
no-tcp-relay
no-multicast-peers
no-cli
pidfile=$STATE/turnserver.run.pid
userdb=$STATE/turndb
log-file=stdout
simple-log
CONF
    ) >"$STATE/turnserver.conf.tmp"  # made under umask 077 above, so never readable by others
    mv "$STATE/turnserver.conf.tmp" "$STATE/turnserver.conf"
    # (No -n: it would make coturn ignore the config file.)
    start_bg turn ip netns exec "$(ns rdv)" turnserver -c "$STATE/turnserver.conf"
    turn_loss
    local deadline=$((SECONDS + 10))
    until grep -q "Total General servers" "$STATE/logs/turn.log" 2>/dev/null; do
        [[ $SECONDS -lt $deadline ]] || { tail -20 "$STATE/logs/turn.log" >&2 || true; die "timed out waiting for coturn"; }
        sleep 0.05
    done
}

# --turn-loss: drop that share of the datagrams to coturn's relayed ports (arriving at rdv) and from them (arriving
# at the wan bridge from rdv), as add_loss does: the leg between the relay and the peer that dials it.
turn_loss() {
    local n ports="${TURN_RELAY_PORTS[0]}-${TURN_RELAY_PORTS[1]}"
    n=$(awk -v p="${OPT[turn_loss]}" 'BEGIN{printf "%d", p * 100 + 0.5}')
    [[ $n -gt 0 ]] || return 0
    local host dev match
    for host in rdv wan; do
        if [[ $host == rdv ]]; then dev=eth0 match="udp dport $ports"; else dev=rdv match="udp sport $ports"; fi
        nsx "$host" nft -f - <<EOF
table netdev hpturnloss {
    chain ingress {
        type filter hook ingress device "$dev" priority -500; policy accept;
        meta protocol ip meta l4proto udp $match numgen random mod 10000 < $n drop
    }
}
EOF
    done
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

# A router's WAN side: $1 = a|b|c, $2 the upstream host (wan, or cgn behind the carrier NAT), $3 the name of the
# link's far end there (it joins that host's bridge: br0 in wan, lan0 in cgn), $4 the upstream gateway.
up_router() {
    local s=$1 up=$2 wside=$3 gw=$4 h bridge=br0
    h=$(router_host "$s")
    [[ $up == cgn ]] && bridge=lan0
    router_params "$s"

    # WAN link: a veth straight to the upstream bridge, or two TAPs joined by the delay line.
    if uses_delayline "$s"; then
        ip -n "$(ns "$h")" tuntap add dev wan0 mode tap
        ip -n "$(ns "$up")" tuntap add dev "$wside" mode tap
    else
        mkveth "$h" wan0 "$up" "$wside"
    fi
    ip -n "$(ns "$up")" link set "$wside" master "$bridge" up
    ip -n "$(ns "$h")" addr add "$R_PUB/24" dev wan0
    ip -n "$(ns "$h")" link set wan0 up
    ip -n "$(ns "$h")" route add default via "$gw"

    nsx "$h" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 \
        net.ipv4.conf.all.send_redirects=0
    nat_ruleset "$s" >"$STATE/nat-$s.nft"
    nsx "$h" nft -f "$STATE/nat-$s.nft"
    # conntrack is loaded now: its UDP timeouts are the mapping timeout
    nsx "$h" sysctl -qw net.netfilter.nf_conntrack_udp_timeout="${OPT[timeout_$s]}" \
        net.netfilter.nf_conntrack_udp_timeout_stream="${OPT[timeout_$s]}"

    # loss: inbound on the router's wan0, outbound on the upstream side of the link
    add_loss "$h" wan0 "${OPT[loss_$s]}"
    add_loss "$up" "$wside" "${OPT[loss_$s]}"

    if uses_delayline "$s"; then
        start_bg "delay-$s" ip netns exec "$(ns wan)" "$PYTHON" "$LAB_DIR/delayline.py" \
            --a "/run/netns/$(ns "$h"):wan0" --b "/run/netns/$(ns "$up"):$wside" \
            --delay "${OPT[delay_$s]}" --jitter "${OPT[jitter_$s]}" --ready-file "$STATE/delay-$s.ready"
    fi
}

# A bridge lan0 with the router's inside address $2/24 in host $1: a LAN (or the carrier NAT's inside) that more
# than one host joins. Bridged frames skip the IP hooks (br_netfilter off), as in a home switch.
lan_bridge() {
    ip -n "$(ns "$1")" link add lan0 type bridge
    ip -n "$(ns "$1")" addr add "$2/24" dev lan0
    ip -n "$(ns "$1")" link set lan0 up
    nsx "$1" sysctl -qw net.bridge.bridge-nf-call-iptables=0 net.bridge.bridge-nf-call-ip6tables=0 2>/dev/null || true
}

# Peer $2 (address $3) on router $1's LAN with gateway $4: a veth named lan0 in the router, or, when the router
# has a bridge lan0 already, a port $5 of it.
lan_peer() {
    local h=$1 peer=$2 ip=$3 gw=$4 port=${5:-}
    if [[ -n $port ]]; then
        mkveth "$h" "$port" "$peer" eth0
        ip -n "$(ns "$h")" link set "$port" master lan0 up
    else
        mkveth "$h" lan0 "$peer" eth0
        ip -n "$(ns "$h")" addr add "$gw/24" dev lan0
        ip -n "$(ns "$h")" link set lan0 up
    fi
    ip -n "$(ns "$peer")" addr add "$ip/24" dev eth0
    ip -n "$(ns "$peer")" link set eth0 up
    ip -n "$(ns "$peer")" route add default via "$gw"
}

# One UDP datagram to a closed port of $1 and its ICMPv6 error back (exit 0), or nothing within 2 s (exit 1).
PRIME6='
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(2); s.connect((sys.argv[1], 9))
s.send(b"x")
try:
    s.recv(1)
except ConnectionRefusedError:
    sys.exit(0)
except OSError:
    sys.exit(1)
'

# dual-stack: IPv6 on the public segment, the routers and the peers; global addresses, no NAT66; each router
# forwards and lets into its LAN only what belongs to a flow the LAN opened (a stateful firewall).
up_ipv6() {
    local s h peer wan6 lan6 net6 peer6
    ip -n "$(ns wan)" -6 addr add "$WAN6_GW/64" dev br0 nodad
    ip -n "$(ns rdv)" -6 addr add "$RDV6_IP1/64" dev eth0 nodad
    ip -n "$(ns rdv)" -6 addr add "$RDV6_IP2/64" dev eth0 nodad
    ip -n "$(ns rdv)" -6 route add default via "$WAN6_GW"
    ip -n "$(ns other)" -6 addr add "$OTHER6_IP/64" dev eth0 nodad
    ip -n "$(ns other)" -6 route add default via "$WAN6_GW"
    nsx wan sysctl -qw net.ipv6.conf.all.forwarding=1
    for s in a b; do
        h=nat-$s peer=peer-$s
        if [[ $s == a ]]; then wan6=$NAT_A_WAN6 lan6=$NAT_A_LAN6 net6=$LAN6_A_NET peer6=$PEER_A_IP6
        else wan6=$NAT_B_WAN6 lan6=$NAT_B_LAN6 net6=$LAN6_B_NET peer6=$PEER_B_IP6; fi
        ip -n "$(ns "$h")" -6 addr add "$wan6/64" dev wan0 nodad
        ip -n "$(ns "$h")" -6 addr add "$lan6/64" dev lan0 nodad
        ip -n "$(ns "$h")" -6 route add default via "$WAN6_GW"
        ip -n "$(ns wan)" -6 route add "$net6" via "$wan6"
        ip -n "$(ns "$peer")" -6 addr add "$peer6/64" dev eth0 nodad
        ip -n "$(ns "$peer")" -6 route add default via "$lan6"
        nsx "$h" sysctl -qw net.ipv6.conf.all.forwarding=1
        nsx "$h" nft -f - <<EOF
table ip6 hpfw6 {
    # UDP from the LAN to the peers' IPv6 LANs (the IPv4 table's topeer, for IPv6 paths): the matrix adds it up too
    counter topeer {
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        iifname "lan0" oifname "wan0" ip6 daddr { $LAN6_A_NET, $LAN6_B_NET } meta l4proto udp counter name topeer accept
        iifname "lan0" oifname "wan0" accept
        ct state established,related accept
    }
}
EOF
    done
}

jarr() {  # a JSON array of the arguments, as strings
    local out="" x
    for x in "$@"; do out+="\"$x\", "; done
    echo "[${out%, }]"
}

# The topology's addresses as variables: each peer's own address, its router, the router's WAN address and
# gateway, and the outermost public address the peer's traffic leaves with (the carrier NAT's behind one).
topology_addresses() {
    router_params a; A_WAN=$R_PUB
    router_params b; B_WAN=$R_PUB
    A_GW=$WAN_GW2 B_GW=$WAN_GW2 PUB_A=$NAT_A_PUB PUB_B=$NAT_B_PUB B_IP=$PEER_B_IP B_ROUTER=nat-b B_LANGW=$NAT_B_LAN
    case ${OPT[topology]} in
        same-lan|same-lan-hairpin) B_IP=$PEER_B_SAME_LAN_IP B_ROUTER=nat-a B_LANGW=$NAT_A_LAN PUB_B=$NAT_A_PUB ;;
        cgnat-homes) A_GW=$CGN_IN B_GW=$CGN_IN PUB_A=$CGN_PUB PUB_B=$CGN_PUB ;;
        cgnat-vs-nat) A_GW=$CGN_IN PUB_A=$CGN_PUB ;;
    esac
    return 0
}

nat_json() {  # $1 = a|b|c
    local s=$1 dl=false
    uses_delayline "$s" && dl=true
    router_params "$s"
    echo "\"$s\": {\"type\": \"${OPT[nat_$s]}\", \"public\": \"$R_PUB\", \"port_preservation\": \"${OPT[pp_$s]}\", \"mapping_timeout\": ${OPT[timeout_$s]}, \"delay_ms\": ${OPT[delay_$s]}, \"jitter_ms\": ${OPT[jitter_$s]}, \"loss_pct\": ${OPT[loss_$s]}, \"delay_line\": $dl, \"hairpin\": $([[ $R_HAIRPIN == 1 ]] && echo true || echo false)}"
}

write_summary() {
    local s v6=0 hosts=() nats=()
    has_ipv6 && v6=1
    topology_addresses
    six() { [[ $v6 == 1 ]] && echo "$@"; return 0; }  # IPv6 addresses, dual-stack only
    hosts+=("\"wan\":    {\"netns\": \"$(ns wan)\", \"addresses\": $(jarr "$WAN_GW1" "$WAN_GW2" $(six "$WAN6_GW"))}")
    hosts+=("\"rdv\":    {\"netns\": \"$(ns rdv)\", \"addresses\": $(jarr "$RDV_IP1" "$RDV_IP2" $(six "$RDV6_IP1" "$RDV6_IP2")), \"gateway\": \"$WAN_GW1\"}")
    hosts+=("\"other\":  {\"netns\": \"$(ns other)\", \"addresses\": $(jarr "$OTHER_IP" $(six "$OTHER6_IP")), \"gateway\": \"$WAN_GW1\"}")
    if [[ " ${HOSTS[*]} " == *" cgn "* ]]; then
        hosts+=("\"cgn\":    {\"netns\": \"$(ns cgn)\", \"addresses\": $(jarr "$CGN_PUB" "$CGN_IN"), \"public\": \"$CGN_PUB\", \"lan\": \"$CGN_IN\", \"gateway\": \"$WAN_GW2\"}")
    fi
    hosts+=("\"nat-a\":  {\"netns\": \"$(ns nat-a)\", \"addresses\": $(jarr "$A_WAN" "$NAT_A_LAN" $(six "$NAT_A_WAN6" "$NAT_A_LAN6")), \"public\": \"$A_WAN\", \"lan\": \"$NAT_A_LAN\", \"gateway\": \"$A_GW\"}")
    if [[ " ${HOSTS[*]} " == *" nat-b "* ]]; then
        hosts+=("\"nat-b\":  {\"netns\": \"$(ns nat-b)\", \"addresses\": $(jarr "$B_WAN" "$NAT_B_LAN" $(six "$NAT_B_WAN6" "$NAT_B_LAN6")), \"public\": \"$B_WAN\", \"lan\": \"$NAT_B_LAN\", \"gateway\": \"$B_GW\"}")
    fi
    hosts+=("\"peer-a\": {\"netns\": \"$(ns peer-a)\", \"addresses\": $(jarr "$PEER_A_IP" $(six "$PEER_A_IP6")), \"gateway\": \"$NAT_A_LAN\", \"router\": \"nat-a\", \"public\": \"$PUB_A\"}")
    hosts+=("\"peer-b\": {\"netns\": \"$(ns peer-b)\", \"addresses\": $(jarr "$B_IP" $(six "$PEER_B_IP6")), \"gateway\": \"$B_LANGW\", \"router\": \"$B_ROUTER\", \"public\": \"$PUB_B\"}")
    nats+=("$(nat_json a)")
    [[ " ${HOSTS[*]} " == *" nat-b "* ]] && nats+=("$(nat_json b)")
    [[ " ${HOSTS[*]} " == *" cgn "* ]] && nats+=("$(nat_json c)")
    local IFS=$'\n'
    {
        echo "{"
        echo "  \"lab\": \"$P\","
        echo "  \"topology\": \"${OPT[topology]}\","
        echo "  \"state_dir\": \"$STATE\","
        echo "  \"hosts\": {"
        printf '    %s\n' "${hosts[@]}" | sed '$!s/$/,/'
        echo "  },"
        echo "  \"nat\": {"
        printf '    %s\n' "${nats[@]}" | sed '$!s/$/,/'
        echo "  },"
        echo "  \"turn_server\": $( [[ ${OPT[turn]} == 1 ]] && echo "\"$RDV_IP1:$TURN_PORT\"" || echo null),"
        echo "  \"probe_server\": $( [[ ${OPT[probe]} == 1 ]] && echo "[\"$RDV_IP1:${PROBE_PORTS[0]}\", \"$RDV_IP1:${PROBE_PORTS[1]}\", \"$RDV_IP2:${PROBE_PORTS[0]}\", \"$RDV_IP2:${PROBE_PORTS[1]}\"]" || echo null)"
        echo "}"
    } >"$STATE/lab.json"
    unset IFS
    {
        echo "HP_LAB=$P"
        echo "HP_LAB_STATE_DIR=$STATE"
        echo "HP_LAB_TOPOLOGY=${OPT[topology]}"
        for s in "${HOSTS[@]}"; do
            local u=${s^^}; u=${u//-/_}
            echo "HP_LAB_NS_$u=$(ns "$s")"
        done
        echo "HP_LAB_WAN_GW1=$WAN_GW1"
        echo "HP_LAB_WAN_GW2=$WAN_GW2"
        echo "HP_LAB_RDV_IP1=$RDV_IP1"
        echo "HP_LAB_RDV_IP2=$RDV_IP2"
        echo "HP_LAB_OTHER_IP=$OTHER_IP"
        echo "HP_LAB_NAT_A_PUBLIC=$A_WAN"
        [[ " ${HOSTS[*]} " == *" nat-b "* ]] && echo "HP_LAB_NAT_B_PUBLIC=$B_WAN"
        [[ " ${HOSTS[*]} " == *" cgn "* ]] && echo "HP_LAB_CGN_PUBLIC=$CGN_PUB"
        echo "HP_LAB_NAT_A_LAN=$NAT_A_LAN"
        [[ " ${HOSTS[*]} " == *" nat-b "* ]] && echo "HP_LAB_NAT_B_LAN=$NAT_B_LAN"
        echo "HP_LAB_PEER_A_IP=$PEER_A_IP"
        echo "HP_LAB_PEER_B_IP=$B_IP"
        echo "HP_LAB_PEER_A_PUBLIC=$PUB_A"
        echo "HP_LAB_PEER_B_PUBLIC=$PUB_B"
        if [[ $v6 == 1 ]]; then
            echo "HP_LAB_RDV_IP6=$RDV6_IP1"
            echo "HP_LAB_PEER_A_IP6=$PEER_A_IP6"
            echo "HP_LAB_PEER_B_IP6=$PEER_B_IP6"
        fi
        if [[ ${OPT[turn]} == 1 ]]; then
            echo "HP_LAB_TURN_SERVER=$RDV_IP1:$TURN_PORT"
            echo "HP_LAB_TURN_SECRET_FILE=$STATE/turn.secret"
        fi
        echo "HP_LAB_NAT_A_TYPE=${OPT[nat_a]}"
        echo "HP_LAB_NAT_B_TYPE=${OPT[nat_b]}"
    } >"$STATE/lab.env"
}

cmd_up() {
    parse_up "$@"
    local h
    for h in "${ALL_HOSTS[@]}"; do
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

    case ${OPT[topology]} in
        same-lan|same-lan-hairpin)  # both peers on router a's LAN (a bridge)
            up_router a wan na "$WAN_GW2"
            lan_bridge nat-a "$NAT_A_LAN"
            lan_peer nat-a peer-a "$PEER_A_IP" "$NAT_A_LAN" pa
            lan_peer nat-a peer-b "$PEER_B_SAME_LAN_IP" "$NAT_A_LAN" pb ;;
        cgnat-homes|cgnat-vs-nat)  # router a (and in cgnat-homes b) behind the carrier NAT
            up_router c wan nc "$WAN_GW2"
            lan_bridge cgn "$CGN_IN"
            up_router a cgn na "$CGN_IN"
            if [[ ${OPT[topology]} == cgnat-homes ]]; then up_router b cgn nb "$CGN_IN"; else up_router b wan nb "$WAN_GW2"; fi
            lan_peer nat-a peer-a "$PEER_A_IP" "$NAT_A_LAN"
            lan_peer nat-b peer-b "$PEER_B_IP" "$NAT_B_LAN" ;;
        *)
            up_router a wan na "$WAN_GW2"
            up_router b wan nb "$WAN_GW2"
            lan_peer nat-a peer-a "$PEER_A_IP" "$NAT_A_LAN"
            lan_peer nat-b peer-b "$PEER_B_IP" "$NAT_B_LAN" ;;
    esac
    has_ipv6 && up_ipv6
    [[ ${HP_LAB_FAIL_AT:-} == routers ]] && die "failing on purpose after the routers (HP_LAB_FAIL_AT)"

    for s in a b; do
        [[ " ${HOSTS[*]} " == *" nat-$s "* ]] || continue
        uses_delayline "$s" && wait_for_file "$STATE/delay-$s.ready" 10 "the delay line of router $s"
    done

    # dual-stack: resolve the IPv6 neighbours along both peers' paths now, as the IPv4 ones are by the first
    # registration: one UDP datagram from each peer to a closed port of the rendezvous, whose ICMPv6 "port
    # unreachable" comes back the same way. Otherwise a fresh lab's first IPv6 packets wait for neighbour discovery
    # at every hop, and the first punch's IPv6 check lost the race to IPv4 (1 trial in 3, always the first).
    # The peers' path to each other also crosses each router's next hop on the public segment, the `wan` router
    # (rdv is on-link there, so the priming above does not resolve it): a datagram from each router to a closed
    # port of `wan` resolves it both ways. Without it the first punch's IPv6 check lost to IPv4 in the first trial of
    # each of 9 fresh labs (2026-12-01; 3 of 3 on IPv6 with it), its first probes waiting for neighbour discovery
    # across the delayed link.
    if has_ipv6; then
        for h in peer-a peer-b; do
            nsx "$h" "$PYTHON" -c "$PRIME6" "$RDV6_IP1" || log "IPv6 neighbour priming from $h got no answer"
        done
        for h in nat-a nat-b; do
            nsx "$h" "$PYTHON" -c "$PRIME6" "$WAN6_GW" || log "IPv6 neighbour priming from $h to wan got no answer"
        done
    fi

    if [[ ${OPT[probe]} == 1 ]]; then
        start_bg probe-server ip netns exec "$(ns rdv)" "$PYTHON" "$LAB_DIR/probe.py" serve \
            --bind "$RDV_IP1:${PROBE_PORTS[0]}" --bind "$RDV_IP1:${PROBE_PORTS[1]}" \
            --bind "$RDV_IP2:${PROBE_PORTS[0]}" --bind "$RDV_IP2:${PROBE_PORTS[1]}" \
            --ready-file "$STATE/probe-server.ready"
        wait_for_file "$STATE/probe-server.ready" 10 "the probe server"
    fi

    [[ ${OPT[turn]} == 1 ]] && up_turn

    # Bounded wait until both peers reach the rendezvous through their NAT (ARP resolved, links up).
    for s in a b; do
        nsx "peer-$s" "$PYTHON" "$LAB_DIR/probe.py" ping --to "$RDV_IP1" --timeout 10 >/dev/null \
            || die "peer-$s cannot reach the rendezvous"
    done
    # (the pings leave only ICMP conntrack entries behind; no UDP mapping exists yet)

    write_summary
    declare -p OPT | sed 's/^declare -A/declare -gA/' >"$STATE/opts"
    trap - EXIT INT TERM
    log "up: topology ${OPT[topology]}, nat-a=${OPT[nat_a]} nat-b=${OPT[nat_b]} (state in $STATE)"
}

# Re-make both routers' NAT (types, port preservation, mapping timeout) in a running lab, keeping the
# links, delay lines and background processes: the matrix runs all 25 pairs in one lab this way.
# The table is replaced atomically (its dynamic maps start empty); conntrack entries of old flows stay
# but belong to ports no new punch uses (each punch binds fresh ephemeral ports).
cmd_renat() {
    local h
    [[ -e $STATE/opts ]] || die "lab '$P' is not up or has no saved options (made by an older lab.sh?)"
    load_state
    for h in "${HOSTS[@]}"; do ns_exists "$(ns "$h")" || die "lab '$P' is not up (no namespace $(ns "$h"))"; done
    # the previous types' auto port preservation must be re-derived for the new types
    OPT[pp_a]=auto; OPT[pp_b]=auto
    OPT[seqgen]=$(( ${OPT[seqgen]:-0} + 1 ))
    parse_up "$@"
    local s
    for s in a b; do
        [[ " ${HOSTS[*]} " == *" nat-$s "* ]] || continue  # same-lan: one home router
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
    load_state
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
print("lab %s is up, topology %s (state in %s)" % (j["lab"], j.get("topology", "two-nats"), j["state_dir"]))
for name, h in j["hosts"].items():
    print("  %-7s netns %-14s %s" % (name, h["netns"], ", ".join(h["addresses"])))
for r, n in j["nat"].items():
    print("  %s: %s, public %s, port preservation %s, mapping timeout %ss, delay %sms +-%sms, loss %s%%%s"
          % ("cgn" if r == "c" else "nat-" + r, n["type"], n["public"], n["port_preservation"], n["mapping_timeout"],
             n["delay_ms"], n["jitter_ms"], n["loss_pct"], ", hairpinning" if n.get("hairpin") else ""))
if j.get("probe_server"):
    print("  probe server on rdv: " + ", ".join(j["probe_server"]))
EOF
            ;;
    esac
}

cmd_exec() {
    [[ $# -ge 1 ]] || die "usage: lab.sh exec HOST -- CMD…"
    local h=$1; shift
    load_state
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
        hosts) load_state; echo "${HOSTS[*]}" ;;
        topologies) echo "$TOPOLOGIES" ;;
        list) cmd_list ;;
        renat) cmd_renat "$@" ;;
        ruleset) parse_up "$@"; nat_ruleset a ;;  # debugging: print router a's ruleset for these options
        -h|--help|help|"") usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

main "$@"
