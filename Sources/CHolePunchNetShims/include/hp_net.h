// Socket and clock helpers: Glibc imports these awkwardly (enum-typed flags, cmsg macros).
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>

/// CLOCK_MONOTONIC in nanoseconds: the one clock every ngtcp2 timestamp uses.
uint64_t hp_now_ns(void);

/// Reads one entry from the socket's error queue (IP_RECVERR / IPV6_RECVERR). Returns -1 when the queue is empty,
/// 1 when the entry is an ICMP destination-unreachable report (then `destination` holds the address the failed
/// datagram was sent to), and 0 for any other entry. The CMSG_* macros are why this lives in C.
int hp_read_icmp_unreachable(int fd, struct sockaddr_storage *destination);
