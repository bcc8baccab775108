#include "hp_lua.h"
