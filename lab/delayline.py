#!/usr/bin/env python3
"""HolePunch lab delay line: a userspace "wire" between two TAP devices.

The kernel on the lab machines has no netem qdisc, so delay and jitter are made here.
Each TAP device may live in a different network namespace; the forwarder enters each
namespace (setns through ctypes, since Python 3.11 has no os.setns), attaches to the
TAP there, and afterwards only works with the two file descriptors.

Every frame read from one side is written to the other side after
    delay + uniform(-jitter, +jitter)   milliseconds   (never below 0),
and frames of one direction are never reordered (a frame never leaves before the frame
read before it in the same direction), like a FIFO link whose latency varies.

Standard library only.  Started and stopped by lab.sh, which tracks its PID.
"""
import argparse
import ctypes
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_QUEUED = 20000  # frames in flight per delay line; beyond this, tail drop

_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "setns(%s): %s" % (path, os.strerror(err)))
    finally:
        os.close(fd)


def open_tap(netns_path, ifname):
    enter_netns(netns_path)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    ifr = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI)
    fcntl.ioctl(fd, TUNSETIFF, ifr)
    return fd


def parse_side(text):
    path, _, ifname = text.rpartition(":")
    if not path or not ifname:
        raise argparse.ArgumentTypeError("expected NETNS_PATH:IFNAME, got %r" % text)
    return path, ifname


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=parse_side, required=True, help="NETNS_PATH:TAP of side A")
    ap.add_argument("--b", type=parse_side, required=True, help="NETNS_PATH:TAP of side B")
    ap.add_argument("--home", help="netns path to stay in after attaching (default: side B's)")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay in ms")
    ap.add_argument("--jitter", type=float, default=0.0, help="+- jitter in ms (uniform)")
    ap.add_argument("--ready-file", help="file written once both TAPs are attached")
    args = ap.parse_args()
    # A parent may have spawned us with signals blocked (Foundation's Process does, from a
    # thread that blocks them); lab.sh and the tests stop us with SIGTERM, so unblock it.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

    fa = open_tap(*args.a)
    fb = open_tap(*args.b)
    enter_netns(args.home or args.b[0])
    other = {fa: fb, fb: fa}
    last_due = {fa: 0.0, fb: 0.0}
    delay = max(0.0, args.delay) / 1000.0
    jitter = max(0.0, args.jitter) / 1000.0

    def stop(_sig, _frm):
        raise SystemExit(0)  # interrupts select() at once; frames still queued are lost, like a cut cable

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % os.getpid())
        os.rename(tmp, args.ready_file)

    queue = []  # (due, seq, out_fd, frame)
    seq = 0
    clock = time.monotonic
    while True:
        now = clock()
        timeout = max(0.0, queue[0][0] - now) if queue else 0.5
        try:
            readable, _, _ = select.select([fa, fb], [], [], timeout)
        except InterruptedError:
            continue
        now = clock()
        for fd in readable:
            out = other[fd]
            while True:
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not frame:
                    break
                if len(queue) >= MAX_QUEUED:
                    continue
                d = delay + (random.uniform(-jitter, jitter) if jitter else 0.0)
                due = max(now + max(0.0, d), last_due[out])
                last_due[out] = due
                seq += 1
                heapq.heappush(queue, (due, seq, out, frame))
        now = clock()
        while queue and queue[0][0] <= now:
            _, _, out, frame = heapq.heappop(queue)
            try:
                os.write(out, frame)
            except OSError:
                pass  # the link is going away, or the TAP is full: the frame is lost


if __name__ == "__main__":
    sys.exit(main())
