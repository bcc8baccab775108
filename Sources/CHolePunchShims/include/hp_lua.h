// Lua 5.4 helpers: static inline wrappers for macros the clang importer drops, and C trampolines that
// raise Lua errors, so that no longjmp ever crosses a Swift frame.
#pragma once
#include <lua5.4/lua.h>
#include <lua5.4/lualib.h>
#include <lua5.4/lauxlib.h>
