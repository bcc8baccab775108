// Socket and clock helpers: Glibc imports these awkwardly (enum-typed flags, cmsg macros).
#pragma once
#include <stdint.h>
#include <stddef.h>
#include <sys/socket.h>
#include <netinet/in.h>

/// CLOCK_MONOTONIC in nanoseconds: the one clock every ngtcp2 timestamp uses.
uint64_t hp_now_ns(void);
