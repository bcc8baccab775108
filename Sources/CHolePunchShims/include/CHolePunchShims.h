// Umbrella header for the C shims: only what the clang importer cannot bring into Swift.
#pragma once
#include "hp_gnutls.h"
#include "hp_lua.h"
