#include "hp_gnutls.h"

void hp_gnutls_free(void *ptr) {
    gnutls_free(ptr);
}
