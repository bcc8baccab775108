// libnatpmp 20150609 (Debian's libnatpmp-dev), the NAT-PMP (RFC 6886) client. Plain functions over a caller-owned
// struct, which Swift imports directly, so no C shim sits between: only this header.
#include <natpmp.h>
