#!/usr/bin/env python3
"""HolePunch lab probe: a tiny UDP toolkit to check the lab's NATs from the inside.

Runs inside the lab namespaces (lab.sh exec HOST -- python3 lab/probe.py …).
Standard library only.  Every subcommand prints one JSON object on stdout.

  serve     UDP responder on several address:port pairs (the rendezvous runs it on
            198.51.100.10/11 ports 3478/3479).  Replies tell the client which source
            address:port the server saw (its mapped address), and can be sent from another
            of the server's sockets on request (like RFC 5780 CHANGE-REQUEST).
  classify  RFC 4787 / RFC 5780-style NAT behaviour discovery against `serve`:
            mapping, filtering and port allocation.  Its JSON is the contract that
            `holepunch nat detect --json` is expected to satisfy later (see docs/lab.md).
  query     one request, prints the mapped address.
  rtt       N requests at a fixed interval; RTT statistics and loss.
  listen    receive on a port for a while, print what arrived.
  send      send N datagrams to a target, then report replies and ICMP errors seen.
  punch     raw UDP hole punch between two peers (register/lookup at `serve`).
  ping      ICMP echo until the first reply (there is no ping binary on the lab machines).

Wire format: JSON in one datagram.  Request {"op": "probe", "id": N, "reply_from": "ip:port"?};
response {"id": N, "mapped": "ip:port", "server": "ip:port", "from": "ip:port"}.
"""
import argparse
import json
import os
import select
import signal
import socket
import statistics
import sys
import time


def hostport(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected IP:PORT, got %r" % text)
    return host, int(port)


def fmt(addr):
    return "%s:%d" % (addr[0], addr[1])


def out(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def write_ready(path):
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(tmp, path)


# ---------------------------------------------------------------------------------------------
# serve
# ---------------------------------------------------------------------------------------------
def cmd_serve(args):
    socks = {}
    for addr in args.bind:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        socks[addr] = s
    first = socks[args.bind[0]]
    for target in args.knock or []:
        first.sendto(b"knock", target)
    write_ready(args.ready_file)
    deadline = time.monotonic() + args.lifetime if args.lifetime > 0 else None
    served = 0
    registry = {}
    while True:
        timeout = 1.0
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                break
        readable, _, _ = select.select(list(socks.values()), [], [], min(timeout, 1.0))
        for s in readable:
            try:
                data, src = s.recvfrom(65536)
            except OSError:
                continue
            try:
                req = json.loads(data.decode())
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(req, dict):
                continue
            local = s.getsockname()
            op = req.get("op", "probe")
            if op in ("register", "lookup"):
                # a minimal rendezvous for `punch`: names -> the mapped address seen here
                name = str(req.get("name", ""))
                if op == "register":
                    registry[name] = fmt(src)
                resp = {"id": req.get("id"), "mapped": fmt(src), "peer": registry.get(name)}
                try:
                    s.sendto(json.dumps(resp).encode(), src)
                except OSError:
                    pass
                continue
            sender = s
            rf = req.get("reply_from")
            if rf:
                try:
                    sender = socks.get(hostport(rf))
                except argparse.ArgumentTypeError:
                    sender = None
                if sender is None:
                    continue
            resp = {"id": req.get("id"), "mapped": fmt(src), "server": fmt(local),
                    "from": fmt(sender.getsockname())}
            try:
                sender.sendto(json.dumps(resp).encode(), src)
            except OSError:
                pass
            served += 1
    out({"served": served})
    return 0


# ---------------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------------
class Client:
    def __init__(self, bind=("0.0.0.0", 0), timeout=0.4, tries=3):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        self.timeout = timeout
        self.tries = tries
        self.next_id = 1

    @property
    def local_port(self):
        return self.sock.getsockname()[1]

    def query(self, server, reply_from=None, extra=None):
        """Returns the response dict, or None when nothing came back after all tries."""
        for _ in range(self.tries):
            rid = self.next_id
            self.next_id += 1
            req = {"op": "probe", "id": rid}
            if extra:
                req.update(extra)
            if reply_from:
                req["reply_from"] = fmt(reply_from)
            self.sock.sendto(json.dumps(req).encode(), server)
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                r, _, _ = select.select([self.sock], [], [], left)
                if not r:
                    break
                try:
                    data, _src = self.sock.recvfrom(65536)
                    resp = json.loads(data.decode())
                except (OSError, ValueError, UnicodeDecodeError):
                    continue
                if isinstance(resp, dict) and resp.get("id") == rid:
                    return resp
        return None

    def close(self):
        self.sock.close()


def port_of(mapped):
    return int(mapped.rpartition(":")[2])


def classify_allocation(ports, locals_=None):
    """'preserving' when every mapped port equals its local port, 'sequential' when successive
    new mappings differ by one constant small delta, else 'random'."""
    if locals_ is not None and len(ports) == len(locals_) and all(p == l for p, l in zip(ports, locals_)):
        return "preserving", None
    deltas = [(b - a) % 65536 for a, b in zip(ports, ports[1:])]
    deltas = [d - 65536 if d > 32768 else d for d in deltas]
    if deltas and len(set(deltas)) == 1 and 0 < abs(deltas[0]) <= 16:
        return "sequential", deltas[0]
    return "random", None


def cmd_classify(args):
    p1 = args.server            # A1:P1
    a2 = args.alt               # A2:P2
    a1p2 = (p1[0], a2[1])
    a2p1 = (a2[0], p1[1])
    res = {"server": fmt(p1), "alt": fmt(a2)}

    # 1. Mapping (RFC 5780 4.3): one local socket, three destinations.
    c = Client(timeout=args.timeout, tries=args.tries)
    r1 = c.query(p1)
    if r1 is None:
        res["error"] = "no response from %s" % fmt(p1)
        out(res)
        return 1
    r2 = c.query(a2p1)
    r3 = c.query(a2)
    if r2 is None or r3 is None:
        res["error"] = "no response from the alternate address"
        out(res)
        return 1
    m1, m2, m3 = r1["mapped"], r2["mapped"], r3["mapped"]
    res["mapped_address"] = m1
    res["local_port"] = c.local_port
    res["mapping_probes"] = [m1, m2, m3]
    if m1 == m2:
        res["mapping"] = "endpoint-independent"
    elif m2 == m3:
        res["mapping"] = "address-dependent"
    else:
        res["mapping"] = "address-and-port-dependent"
    first_preserved = port_of(m1) == c.local_port
    c.close()

    # 2. Filtering (RFC 5780 4.4): a fresh socket that only ever sends to A1:P1.
    f = Client(timeout=args.timeout, tries=args.tries)
    if f.query(p1) is None:
        res["error"] = "no response from %s (filtering socket)" % fmt(p1)
        out(res)
        return 1
    if f.query(p1, reply_from=a2) is not None:
        res["filtering"] = "endpoint-independent"
    elif f.query(p1, reply_from=a1p2) is not None:
        res["filtering"] = "address-dependent"
    else:
        res["filtering"] = "address-and-port-dependent"
    f.close()

    # 3. Allocation.
    alloc = {"first_mapping_preserved": first_preserved}
    if res["mapping"] == "endpoint-independent":
        # one new mapping per new local socket
        socks = [Client(timeout=args.timeout, tries=args.tries) for _ in range(args.sockets)]
        ports, locals_ = [], []
        for s in socks:
            r = s.query(p1)
            if r is not None:
                ports.append(port_of(r["mapped"]))
                locals_.append(s.local_port)
            s.close()
        kind, delta = classify_allocation(ports, locals_)
        alloc.update({"ports": ports, "local_ports": locals_})
    else:
        # one new mapping per new destination, from one fresh socket
        s = Client(timeout=args.timeout, tries=args.tries)
        ports = []
        for dst in (p1, a1p2, a2p1, a2):
            r = s.query(dst)
            if r is not None:
                ports.append(port_of(r["mapped"]))
        local = s.local_port
        s.close()
        seq_ports = ports[1:] if ports and ports[0] == local else ports
        kind, delta = classify_allocation(seq_ports)
        alloc.update({"ports": ports, "local_ports": [local]})
    alloc["port_preserving"] = bool(alloc["local_ports"]) and alloc["ports"][:1] == alloc["local_ports"][:1]
    alloc["kind"] = kind
    if delta is not None:
        alloc["delta"] = delta
    res["allocation"] = alloc
    out(res)
    return 0


def receive_for(sock, seconds):
    """Yields what reaches sock in the next `seconds`: (data, source) for each datagram, or the OSError a
    receive raised (an ICMP error reported on a connected socket), for the caller to count, skip or raise."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            continue
        try:
            item = sock.recvfrom(65536)
        except OSError as e:
            item = e
        yield item


def cmd_query(args):
    c = Client(bind=args.bind or ("0.0.0.0", 0), timeout=args.timeout, tries=args.tries)
    r = c.query(args.server, reply_from=args.reply_from)
    res = {"local_port": c.local_port, "response": r}
    if r:
        res["mapped"] = r["mapped"]
    if args.again:
        # the same query from the same socket again, N seconds after the start (mapping timeouts)
        start = time.monotonic()
        later = []
        for at in args.again:
            time.sleep(max(0.0, start + at - time.monotonic()))
            ra = c.query(args.server, reply_from=args.reply_from)
            later.append(ra["mapped"] if ra else None)
        res["again"] = later
    if args.listen:
        # keep the socket (and so the mapping's owner) and report what arrives unasked
        write_ready(args.ready_file)
        got = []
        listen_start = time.monotonic()
        for item in receive_for(c.sock, args.listen):
            if not isinstance(item, OSError):
                got.append({"from": fmt(item[1]), "at": round(time.monotonic() - listen_start, 3)})
        res["received"] = got
    out(res)
    return 0 if r else 1


def cmd_punch(args):
    """Raw UDP hole punch between two peers, via the probe server's register/lookup.

    Both sides register their mapped address under a name, look the other one up, then send a
    punch datagram every --interval ms to the looked-up address and to every address a punch
    from the peer arrived from.  Connected = we heard the peer and the peer says it heard us.
    Times are measured from the moment the peer's address is known."""
    c = Client(bind=args.bind or ("0.0.0.0", 0), timeout=args.rtt_timeout, tries=5)
    start = time.monotonic()
    deadline = start + args.timeout
    reg = c.query(args.rendezvous, extra={"op": "register", "name": args.name})
    res = {"name": args.name, "peer_name": args.peer, "local_port": c.local_port,
           "mapped": reg["mapped"] if reg else None, "connected": False}
    peer = None
    while peer is None and time.monotonic() < deadline:
        r = c.query(args.rendezvous, extra={"op": "lookup", "name": args.peer})
        if r and r.get("peer"):
            peer = hostport(r["peer"])
        else:
            time.sleep(0.02)
    if peer is None:
        res["error"] = "peer never registered"
        out(res)
        return 1
    res["peer_registered"] = fmt(peer)
    targets = [peer]
    heard_from = None
    peer_heard = False
    sent = 0
    t0 = time.monotonic()
    next_send = t0
    interval = args.interval / 1000.0
    sock = c.sock
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= next_send:
            msg = json.dumps({"punch": args.name, "heard": heard_from is not None}).encode()
            for t in targets:
                try:
                    sock.sendto(msg, t)
                    sent += 1
                except OSError:
                    pass
            next_send += interval
            continue
        rd, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - now))
        if not rd:
            continue
        try:
            data, src = sock.recvfrom(65536)
            d = json.loads(data.decode())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if not isinstance(d, dict) or d.get("punch") != args.peer:
            continue
        if heard_from is None:
            heard_from = src
            res["first_heard_ms"] = (time.monotonic() - t0) * 1000.0
            if src not in targets:
                targets.append(src)
        if d.get("heard"):
            peer_heard = True
        if heard_from is not None and peer_heard:
            res["connected"] = True
            res["time_ms"] = (time.monotonic() - t0) * 1000.0
            # tell the peer we heard it, a few times, so it completes as well
            msg = json.dumps({"punch": args.name, "heard": True}).encode()
            for _ in range(3):
                sock.sendto(msg, heard_from)
                sent += 1
                time.sleep(interval)
            break
    res["peer_observed"] = fmt(heard_from) if heard_from else None
    res["sent"] = sent
    out(res)
    return 0 if res["connected"] else 1


def cmd_rtt(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    sent = {}
    rtts = []
    interval = args.interval / 1000.0
    start = time.monotonic()
    next_send = start
    i = 0
    last_deadline = None
    while True:
        now = time.monotonic()
        if i < args.count and now >= next_send:
            i += 1
            sent[i] = time.monotonic()
            s.sendto(json.dumps({"op": "probe", "id": i}).encode(), args.server)
            next_send += interval
            if i == args.count:
                last_deadline = time.monotonic() + args.timeout
            continue
        if last_deadline is not None and (now >= last_deadline or len(rtts) == args.count):
            break
        wait = (next_send - now) if i < args.count else (last_deadline - now)
        r, _, _ = select.select([s], [], [], max(0.0, wait))
        if r:
            try:
                data, _ = s.recvfrom(65536)
                resp = json.loads(data.decode())
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            t = sent.pop(resp.get("id"), None) if isinstance(resp, dict) else None
            if t is not None:
                rtts.append((time.monotonic() - t) * 1000.0)
    res = {"sent": args.count, "received": len(rtts),
           "loss_pct": 100.0 * (args.count - len(rtts)) / args.count if args.count else 0.0}
    if rtts:
        srt = sorted(rtts)
        res["rtt_ms"] = {"min": srt[0], "median": statistics.median(srt), "mean": statistics.fmean(srt),
                         "p95": srt[min(len(srt) - 1, int(0.95 * len(srt)))], "max": srt[-1],
                         "stdev": statistics.pstdev(srt)}
    out(res)
    return 0


def cmd_listen(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(args.bind)
    write_ready(args.ready_file)
    got = []
    for item in receive_for(s, args.timeout):
        if isinstance(item, OSError):
            raise item
        data, src = item
        got.append({"from": fmt(src), "len": len(data)})
    out({"bind": fmt(args.bind), "received": got})
    return 0


def cmd_send(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(args.bind or ("0.0.0.0", 0))
    s.connect(args.to)  # connected: ICMP errors come back as ECONNREFUSED etc.
    replies = 0
    errors = []
    for _ in range(args.count):
        try:
            s.send(b"unsolicited")
        except OSError as e:
            errors.append(e.errno)
        time.sleep(0.01)
    for item in receive_for(s, args.wait):
        if isinstance(item, OSError):
            errors.append(item.errno)
        else:
            replies += 1
    out({"to": fmt(args.to), "local_port": s.getsockname()[1], "sent": args.count,
         "replies": replies, "icmp_errors": len(errors)})
    return 0


def icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def cmd_ping(args):
    """ICMP echo (the lab machines have no ping binary); exit 0 on the first reply."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    deadline = time.monotonic() + args.timeout
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        hdr = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
        payload = b"holepunch-lab"
        csum = icmp_checksum(hdr + payload)
        pkt = hdr[:2] + csum.to_bytes(2, "big") + hdr[4:] + payload
        t0 = time.monotonic()
        s.sendto(pkt, (args.to, 0))
        step_end = min(deadline, t0 + args.interval)
        for item in receive_for(s, step_end - time.monotonic()):
            if isinstance(item, OSError):
                raise item
            data, src = item
            ihl = (data[0] & 0x0F) * 4
            icmp = data[ihl:]
            if src[0] == args.to and len(icmp) >= 8 and icmp[0] == 0 and int.from_bytes(icmp[4:6], "big") == ident:
                out({"to": args.to, "reply": True, "rtt_ms": (time.monotonic() - t0) * 1000.0, "tries": seq})
                return 0
    out({"to": args.to, "reply": False, "tries": seq})
    return 1


def main():
    ap = argparse.ArgumentParser(description="HolePunch lab UDP probe")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("serve")
    p.add_argument("--bind", type=hostport, action="append", required=True)
    p.add_argument("--knock", type=hostport, action="append",
                   help="send one unsolicited datagram there from the first socket at start")
    p.add_argument("--lifetime", type=float, default=0, help="exit after this many seconds (0: run until killed)")
    p.add_argument("--ready-file")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("classify")
    p.add_argument("--server", type=hostport, default=("198.51.100.10", 3478), help="primary A1:P1")
    p.add_argument("--alt", type=hostport, default=("198.51.100.11", 3479), help="alternate A2:P2")
    p.add_argument("--timeout", type=float, default=0.4)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--sockets", type=int, default=4)
    p.set_defaults(fn=cmd_classify)

    p = sub.add_parser("query")
    p.add_argument("--server", type=hostport, required=True)
    p.add_argument("--reply-from", type=hostport)
    p.add_argument("--bind", type=hostport)
    p.add_argument("--timeout", type=float, default=0.4)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--again", type=float, action="append",
                   help="repeat the query from the same socket this many seconds after the first (repeatable)")
    p.add_argument("--listen", type=float, default=0,
                   help="afterwards, listen this many seconds on the same socket and report what arrives")
    p.add_argument("--ready-file", help="written when the listening starts")
    p.set_defaults(fn=cmd_query)

    p = sub.add_parser("punch")
    p.add_argument("--name", required=True, help="this side's name at the rendezvous")
    p.add_argument("--peer", required=True, help="the other side's name")
    p.add_argument("--rendezvous", type=hostport, default=("198.51.100.10", 3478))
    p.add_argument("--bind", type=hostport)
    p.add_argument("--interval", type=float, default=20.0, help="ms between punch datagrams")
    p.add_argument("--timeout", type=float, default=5.0, help="give up after this many seconds")
    p.add_argument("--rtt-timeout", type=float, default=0.5, help="s to wait for a rendezvous answer")
    p.set_defaults(fn=cmd_punch)

    p = sub.add_parser("rtt")
    p.add_argument("--server", type=hostport, required=True)
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--interval", type=float, default=20.0, help="ms between requests")
    p.add_argument("--timeout", type=float, default=1.0, help="s to wait after the last request")
    p.set_defaults(fn=cmd_rtt)

    p = sub.add_parser("listen")
    p.add_argument("--bind", type=hostport, required=True)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--ready-file")
    p.set_defaults(fn=cmd_listen)

    p = sub.add_parser("send")
    p.add_argument("--to", type=hostport, required=True)
    p.add_argument("--bind", type=hostport)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--wait", type=float, default=1.0)
    p.set_defaults(fn=cmd_send)

    p = sub.add_parser("ping")
    p.add_argument("--to", required=True)
    p.add_argument("--timeout", type=float, default=5.0, help="give up after this many seconds")
    p.add_argument("--interval", type=float, default=0.2, help="s between echo requests")
    p.set_defaults(fn=cmd_ping)

    args = ap.parse_args()
    # A parent may have spawned us with signals blocked (Foundation's Process does, from a
    # thread that blocks them); lab.sh and the tests stop us with SIGTERM, so unblock it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
