// The official NATS C client (nats.c 3.4, Debian's libnats-dev). Its API is plain functions and function-pointer
// callbacks, which Swift imports directly, so no C shim sits between: only this header.
#include <nats/nats.h>
