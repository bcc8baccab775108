// GnuTLS helpers that Swift cannot call directly.
#pragma once
#include <gnutls/gnutls.h>

/// `gnutls_free` is a global function-pointer variable; Swift 6 rejects touching it as shared mutable state.
void hp_gnutls_free(void *ptr);

/// `GNUTLS_CURVE_TO_BITS` is a function-like macro: the "bits" value that selects a curve in key generation.
unsigned int hp_gnutls_curve_to_bits(gnutls_ecc_curve_t curve);
