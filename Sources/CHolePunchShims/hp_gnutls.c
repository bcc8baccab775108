#include "hp_gnutls.h"

void hp_gnutls_free(void *ptr) {
    gnutls_free(ptr);
}

unsigned int hp_gnutls_curve_to_bits(gnutls_ecc_curve_t curve) {
    return GNUTLS_CURVE_TO_BITS(curve);
}
