#!/usr/bin/env bash
# The main demo through real NATs: a lab with two NAT routers, a rendezvous on the "public" side, and one peer
# behind each router. Peer B waits and echoes; peer A punches to B by NodeID through the rendezvous, shows the
# punch's progress and time to connect, sends a line and prints the echo. Everything runs in network namespaces
# this script creates and always deletes (trap), on the documentation ranges 198.51.100.0/24 and 203.0.113.0/24.
#
# Usage: lab/demo.sh HOLEPUNCH_BINARY [--nat-a TYPE] [--nat-b TYPE] [--delay MS] [--strategy FILE]
set -euo pipefail

BIN=${1:?usage: lab/demo.sh HOLEPUNCH_BINARY [--nat-a TYPE] [--nat-b TYPE] [--delay MS] [--strategy FILE]}
shift
NAT_A=port_restricted
NAT_B=symmetric_seq
DELAY=20
STRATEGY=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --nat-a) NAT_A=$2; shift 2 ;;
        --nat-b) NAT_B=$2; shift 2 ;;
        --delay) DELAY=$2; shift 2 ;;
        --strategy) STRATEGY=$(realpath "$2"); shift 2 ;;
        *) echo "error: unknown option $1" >&2; exit 2 ;;
    esac
done

LAB_DIR=$(cd "$(dirname "$0")" && pwd)
BIN=$(realpath "$BIN")
export HP_LAB=demo$$
WORK=$(mktemp -d /tmp/holepunch-demo.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    "$LAB_DIR/lab.sh" down >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say() { printf '%s\n' "$*"; }

say "HolePunch demo through real Linux NATs (lab '$HP_LAB')"
say "  peer A behind a ${NAT_A} NAT (203.0.113.10), peer B behind a ${NAT_B} NAT (203.0.113.20)"
say "  rendezvous at 198.51.100.10, ${DELAY} ms one-way delay on each router's public link"
"$LAB_DIR/lab.sh" up --nat-a "$NAT_A" --nat-b "$NAT_B" --delay "$DELAY" >"$WORK/lab.log" 2>&1 || {
    cat "$WORK/lab.log" >&2; exit 1; }

"$BIN" identity create "$WORK/rdv.pem" >/dev/null
"$BIN" identity create "$WORK/a.pem" >/dev/null
B_ID=$("$BIN" identity create "$WORK/b.pem" | head -1)

"$LAB_DIR/lab.sh" exec rdv -- "$BIN" rendezvous --listen 198.51.100.10:7000 --identity "$WORK/rdv.pem" \
    --node-id-file "$WORK/rdv.id" --stun-port 3480 --alt-port 3481 --alt-address 198.51.100.11 \
    >"$WORK/rdv.out" 2>"$WORK/rdv.err" &
PIDS+=($!)
for _ in $(seq 1 200); do [[ -s $WORK/rdv.id ]] && break; sleep 0.05; done
[[ -s $WORK/rdv.id ]] || { say "the rendezvous did not start:"; cat "$WORK/rdv.err" >&2; exit 1; }

"$LAB_DIR/lab.sh" exec peer-b -- "$BIN" peer --rendezvous 198.51.100.10:7000 --rendezvous-id "@$WORK/rdv.id" \
    --identity "$WORK/b.pem" --echo ${STRATEGY:+--strategy "$STRATEGY"} >"$WORK/b.out" 2>"$WORK/b.err" </dev/null &
PIDS+=($!)
for _ in $(seq 1 200); do grep -q "^registered\|\"registered\"" "$WORK/b.err" 2>/dev/null && break; sleep 0.05; done
grep -q "registered" "$WORK/b.err" || { say "peer B did not register:"; cat "$WORK/b.err" >&2; exit 1; }
say "  peer B registered and waits (it echoes what it receives)"
say "  peer A punches to B (${B_ID:0:8}…) — progress:"

set +e
echo "hello through two NATs" | "$LAB_DIR/lab.sh" exec peer-a -- "$BIN" peer --rendezvous 198.51.100.10:7000 \
    --rendezvous-id "@$WORK/rdv.id" --identity "$WORK/a.pem" --connect "$B_ID" --timeout 20 \
    ${STRATEGY:+--strategy "$STRATEGY"} >"$WORK/a.out" 2>"$WORK/a.err"
status=$?
set -e
sed 's/^/    /' "$WORK/a.err"
if [[ $status -eq 0 ]] && grep -q "hello through two NATs" "$WORK/a.out"; then
    say "  A sent \"hello through two NATs\"; B echoed it back: \"$(head -1 "$WORK/a.out")\""
    say "demo: punch succeeded through ${NAT_A} × ${NAT_B}."
    exit 0
fi
say "demo: the punch did not succeed (exit $status). Peer B said:"
sed 's/^/    /' "$WORK/b.err"
exit 3
