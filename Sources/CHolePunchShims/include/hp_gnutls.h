// GnuTLS helpers that Swift cannot call directly.
#pragma once
#include <gnutls/gnutls.h>

/// `gnutls_free` is a global function-pointer variable; Swift 6 rejects touching it as shared mutable state.
void hp_gnutls_free(void *ptr);
