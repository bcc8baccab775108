#!/usr/bin/env bash
# A real miniupnpd (Debian's miniupnpd-nftables: PCP, NAT-PMP and UPnP-IGD) on one router of a running lab, in
# front of whatever NAT that router has (symmetric ones included). See docs/port-mapping.md.
#
#   portmap.sh up [--router a|b] [--min-lifetime S]   start a STUN server on rdv and miniupnpd on nat-<router>
#   portmap.sh down                                    stop exactly what `up` started, remove its rules and leases
#   portmap.sh restart                                 restart miniupnpd (it multicasts a PCP ANNOUNCE)
#   portmap.sh flush                                   flush the router's conntrack (between test cases)
#   portmap.sh status [--env]
#
# Instance: env HP_LAB, as lab.sh (the lab must be up). Addresses come from `lab.sh status --env`, never from here.
# Run `portmap.sh down` before `lab.sh down`: a process left in a namespace keeps it alive.
set -euo pipefail

LAB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
P=${HP_LAB:-hp}
die() { echo "portmap.sh: $*" >&2; exit 1; }
log() { [[ -n ${HP_LAB_QUIET:-} ]] || echo "portmap[$P]: $*" >&2; }

ENV_TEXT=$("$LAB_DIR/lab.sh" status --env) || die "lab '$P' is not up (HP_LAB=$P lab.sh up first)"
while IFS='=' read -r key value; do
    [[ $key =~ ^HP_LAB_[A-Z0-9_]+$ ]] && printf -v "$key" '%s' "$value"
done <<<"$ENV_TEXT"
[[ ${HP_LAB_UP:-0} == 1 ]] || die "lab '$P' is not up"
STATE=$HP_LAB_STATE_DIR/portmap
STUN_PORT=3490          # beside the probe server's 3478/3479; coturn answers CHANGE-REQUEST from RDV_IP2:3491
HTTP_PORT=2189          # miniupnpd's UPnP SOAP port on the router's LAN address
TABLE=hpupnp            # family inet: miniupnpd's nftables backend fails on `ip` tables (NAT-PMP then says
                        # "network failure")

router_env() {  # $1 = a|b: sets NS, LAN, PUB, TYPE
    local u=${1^^}
    local nsv=HP_LAB_NS_NAT_$u lanv=HP_LAB_NAT_${u}_LAN pubv=HP_LAB_NAT_${u}_PUBLIC typev=HP_LAB_NAT_${u}_TYPE
    NS=${!nsv}; LAN=${!lanv}; PUB=${!pubv}; TYPE=${!typev}
}

alive() { [[ -r /proc/$1/stat ]] && [[ $(sed 's/.*) //' "/proc/$1/stat" | cut -c1) != Z ]]; }

stop_pid_file() {  # $1 pid file, $2 a word its command line must contain (PIDs get reused)
    local pid
    pid=$(cat "$1" 2>/dev/null || true)
    rm -f "$1"
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$2" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 150); do alive "$pid" || return 0; sleep 0.02; done
    kill -KILL "$pid" 2>/dev/null || true
}

start_bg() {  # $1 name, rest: command. Detached, inherited fds closed, PID recorded.
    local name=$1; shift
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)) && { eval "exec $fd>&-" 2>/dev/null || true; }
        done
        exec "$@" </dev/null >"$STATE/$name.log" 2>&1
    ) &
    echo $! >"$STATE/$name.pid"
}

wait_for_log() {  # $1 file, $2 pattern, $3 seconds, $4 what
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        [[ $SECONDS -lt $deadline ]] || { tail -20 "$1" >&2 || true; die "timed out waiting for $4"; }
        sleep 0.05
    done
}

ruleset() {  # the router's miniupnpd chains (the lab's own `ip hpnat` table stays as it is)
    cat <<NFT
table inet $TABLE {
    chain prerouting { type nat hook prerouting priority dstnat - 5; policy accept; jump miniupnpd_dnat; }
    chain forward { type filter hook forward priority filter - 5; policy accept; jump miniupnpd_forward; }
    chain postrouting { type nat hook postrouting priority srcnat - 5; policy accept; jump miniupnpd_snat; }
    chain miniupnpd_dnat { }
    chain miniupnpd_forward { }
    chain miniupnpd_snat { }
}
NFT
}

config() {
    cat <<CONF
ext_ifname=wan0
listening_ip=lan0
http_port=$HTTP_PORT
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
lease_file=$STATE/miniupnpd.leases
uuid=3b0cbc9a-1d7c-4b67-9d0e-6e5a1f5b17a$ROUTER
ext_perform_stun=yes
ext_stun_host=$HP_LAB_RDV_IP1
ext_stun_port=$STUN_PORT
upnp_table_name=$TABLE
upnp_nat_table_name=$TABLE
upnp_forward_chain=miniupnpd_forward
upnp_nat_chain=miniupnpd_dnat
upnp_nat_postrouting_chain=miniupnpd_snat
min_lifetime=${MIN_LIFETIME}
max_lifetime=86400
clean_ruleset_interval=600
allow 1024-65535 ${LAN%.*}.0/24 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
CONF
}

start_miniupnpd() {
    # The old one is gone (or a zombie nobody reaped yet, whose PID still answers kill -0): its PID file would make
    # the new one exit with "already running".
    rm -f "$STATE/miniupnpd.leases" "$STATE/miniupnpd.run.pid"
    : >"$STATE/miniupnpd.log"
    start_bg miniupnpd ip netns exec "$NS" miniupnpd -f "$STATE/miniupnpd.conf" -d -P "$STATE/miniupnpd.run.pid"
    # miniupnpd tries STUN three times at start-up only; it says so when the router's NAT lets mappings work.
    wait_for_log "$STATE/miniupnpd.log" "Port forwarding is now enabled" 20 "miniupnpd's STUN check"
    wait_for_log "$STATE/miniupnpd.log" "Listening for NAT-PMP/PCP" 5 "miniupnpd's PCP socket"
}

cmd_up() {
    ROUTER=a MIN_LIFETIME=120
    while [[ $# -gt 0 ]]; do
        case $1 in
            --router) ROUTER=$2; shift 2 ;;
            --min-lifetime) MIN_LIFETIME=$2; shift 2 ;;
            *) die "unknown option $1" ;;
        esac
    done
    [[ $ROUTER == a || $ROUTER == b ]] || die "--router must be a or b"
    [[ -e $STATE/router ]] && die "already up on nat-$(cat "$STATE/router") (portmap.sh down first)"
    command -v miniupnpd >/dev/null || die "miniupnpd not found (apt-get install miniupnpd-nftables)"
    command -v turnserver >/dev/null || die "turnserver not found (apt-get install coturn)"
    router_env "$ROUTER"
    mkdir -p "$STATE"
    echo "$ROUTER" >"$STATE/router"
    trap 'cmd_down >/dev/null 2>&1 || true' ERR

    # STUN with CHANGE-REQUEST (RFC 5780) on both rendezvous addresses: miniupnpd needs it to believe that the
    # documentation-range WAN address can be forwarded to.
    start_bg stun ip netns exec "$HP_LAB_NS_RDV" turnserver -n --stun-only --no-cli --no-tls --no-dtls --no-tcp \
        --listening-ip "$HP_LAB_RDV_IP1" --listening-ip "$HP_LAB_RDV_IP2" \
        --listening-port $STUN_PORT --alt-listening-port $((STUN_PORT + 1)) \
        --pidfile "$STATE/stun.run.pid" --log-file stdout --simple-log
    wait_for_log "$STATE/stun.log" "Total General servers" 10 "the STUN server"

    ip netns exec "$NS" nft -f - <<<"$(ruleset)"
    # The answers from the other address/port are unsolicited for the router's conntrack: let exactly those in
    # (the lab's input chain drops unsolicited WAN input), or miniupnpd concludes the NAT is restrictive.
    ip netns exec "$NS" nft insert rule ip hpnat input iifname wan0 ip saddr "{ $HP_LAB_RDV_IP1, $HP_LAB_RDV_IP2 }" \
        udp sport "{ $STUN_PORT, $((STUN_PORT + 1)) }" accept comment hpportmap
    # The router's own packets (miniupnpd's STUN) leave with its address as they are: the lab's SNAT rules are
    # written for forwarded LAN traffic, and a symmetric one would give each STUN request a random port, so
    # miniupnpd would call its own WAN side "symmetric NAT" and refuse to forward.
    ip netns exec "$NS" nft insert rule ip hpnat postrouting oifname wan0 ip saddr "$PUB" accept comment hpportmap
    config >"$STATE/miniupnpd.conf"
    start_miniupnpd
    trap - ERR
    log "miniupnpd on nat-$ROUTER ($TYPE NAT): PCP/NAT-PMP $LAN:5351, UPnP http://$LAN:$HTTP_PORT, external $PUB"
    cmd_status --env
}

cmd_down() {
    [[ -d $STATE ]] || return 0
    stop_pid_file "$STATE/miniupnpd.pid" miniupnpd
    stop_pid_file "$STATE/stun.pid" turnserver
    if [[ -e $STATE/router ]]; then
        router_env "$(cat "$STATE/router")"
        # Rules outlive SIGTERM: remove the table miniupnpd wrote into and the two rules we added to the lab's.
        ip netns exec "$NS" nft delete table inet $TABLE 2>/dev/null || true
        local chain handle
        for chain in input postrouting; do
            for handle in $(ip netns exec "$NS" nft -a list chain ip hpnat $chain 2>/dev/null \
                    | sed -n 's/.*comment "hpportmap" # handle \([0-9]*\)$/\1/p'); do
                ip netns exec "$NS" nft delete rule ip hpnat $chain handle "$handle" || true
            done
        done
    fi
    rm -rf "$STATE"
    log "down"
}

cmd_restart() {
    [[ -e $STATE/router ]] || die "not up"
    router_env "$(cat "$STATE/router")"
    ROUTER=$(cat "$STATE/router")
    stop_pid_file "$STATE/miniupnpd.pid" miniupnpd
    # A real restart loses the router's state: rules and leases go too.
    ip netns exec "$NS" nft flush chain inet $TABLE miniupnpd_dnat
    ip netns exec "$NS" nft flush chain inet $TABLE miniupnpd_forward
    ip netns exec "$NS" nft flush chain inet $TABLE miniupnpd_snat
    start_miniupnpd
    log "miniupnpd restarted"
}

cmd_flush() {
    [[ -e $STATE/router ]] || die "not up"
    router_env "$(cat "$STATE/router")"
    ip netns exec "$NS" conntrack -F 2>/dev/null || true
}

cmd_status() {
    if [[ ! -e $STATE/router ]]; then
        [[ ${1:-} == --env ]] && echo "HP_PORTMAP_UP=0" || echo "portmap '$P' is down"
        return 3
    fi
    router_env "$(cat "$STATE/router")"
    if [[ ${1:-} == --env ]]; then
        echo "HP_PORTMAP_UP=1"
        echo "HP_PORTMAP_ROUTER=nat-$(cat "$STATE/router")"
        echo "HP_PORTMAP_GATEWAY=$LAN"
        echo "HP_PORTMAP_EXTERNAL=$PUB"
        echo "HP_PORTMAP_HTTP_PORT=$HTTP_PORT"
        echo "HP_PORTMAP_LOG=$STATE/miniupnpd.log"
    else
        echo "portmap '$P': miniupnpd on nat-$(cat "$STATE/router") ($TYPE), gateway $LAN, external $PUB"
        ip netns exec "$NS" nft list chain inet $TABLE miniupnpd_dnat | grep -o "dport [0-9]* dnat .*" | sed "s/^/  /" || true
    fi
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    restart) cmd_restart ;;
    flush) cmd_flush ;;
    status) shift; cmd_status "$@" ;;
    *) sed -n '4,10p' "$0" >&2; exit 2 ;;
esac
