// miniupnpc 2.2 (Debian's libminiupnpc-dev), the UPnP-IGD client: SSDP discovery and the SOAP calls. Plain
// functions, which Swift imports directly, so no C shim sits between: only these headers.
#include <miniupnpc/miniupnpc.h>
#include <miniupnpc/upnpcommands.h>
#include <miniupnpc/upnperrors.h>
