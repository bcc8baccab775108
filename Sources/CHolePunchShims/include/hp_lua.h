// Lua 5.4 helpers: static inline wrappers for macros the clang importer drops, and C trampolines that
// raise Lua errors, so that no longjmp ever crosses a Swift frame.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <lua5.4/lua.h>
#include <lua5.4/lualib.h>
#include <lua5.4/lauxlib.h>

/// One sandboxed Lua state plus its limits. Opaque to Swift: Swift only holds the pointer and frees it once.
typedef struct hp_lua hp_lua;

/// Log sink for `hp.log`: called from C after the arguments were checked, so the Swift side never raises.
/// `level` is 0 trace, 1 debug, 2 info, 3 notice, 4 warning, 5 error.
typedef void (*hp_lua_log_fn)(void *user, int level, const char *msg, size_t len);

/// Why the last call was aborted by the sandbox (as opposed to an ordinary script error).
enum {
    HP_LUA_ABORT_NONE = 0,
    HP_LUA_ABORT_BUDGET = 1,
    HP_LUA_ABORT_TIME = 2,
    HP_LUA_ABORT_MEMORY = 3,
};

/// The chunk name of the `hp` helper library (Resources/hp.lua). Positions in errors and the last line seen
/// skip its frames, so they always name a line of the strategy.
#define HP_LUA_PRELUDE_CHUNK "@hp.lua"

/// Creates a state with a capped allocator and the sandboxed libraries, or NULL when out of memory.
hp_lua *hp_lua_new(size_t mem_limit, hp_lua_log_fn log_fn, void *log_user);
/// Closes the state and frees the wrapper.
void hp_lua_free(hp_lua *h);
/// Number of states alive in this process (a debug counter for leak tests).
long hp_lua_live_states(void);
/// The raw state, for the non-raising API calls Swift makes between protected calls. Between calls the
/// allocator ignores the cap ("headroom"), so those pushes cannot fail with a memory error either.
lua_State *hp_lua_state(hp_lua *h);
/// Bytes currently allocated by the state.
size_t hp_lua_mem_used(const hp_lua *h);
/// Seed for `math.random` (and so `hp.random_ports`) during the next call.
void hp_lua_set_seed(hp_lua *h, uint64_t seed);
/// Why the last protected call was aborted (HP_LUA_ABORT_*), or NONE.
int hp_lua_abort_reason(const hp_lua *h);
/// The script line last seen running (by the count hook or a bounded library call), or 0. Safe to read
/// from another thread while a call runs: it names where an abandoned call was when it was given up.
int hp_lua_last_line(const hp_lua *h);

/// Loads `src` as a text chunk named `chunkname` and runs it with the limits, passing it the top `nargs`
/// values as `...`; on LUA_OK the chunk's first result is on the top of the stack, otherwise the error
/// message (a string) is (and on a syntax error the arguments stay below it).
int hp_lua_load_run(hp_lua *h, const char *src, size_t len, const char *chunkname, int nargs,
                    int64_t budget, int64_t time_limit_ns);
/// Calls the function below the top `nargs` values, under the limits, with one result. On error the top is
/// a string message with a position when one is known.
int hp_lua_call(hp_lua *h, int nargs, int64_t budget, int64_t time_limit_ns);
// Watchdog for one call: hp_lua_watch returns a token before the call, hp_lua_unwatch retires it after;
// hp_lua_interrupt(h, token), from any thread, stops the call at its next instruction with a time error.
unsigned long long hp_lua_watch(hp_lua *h);
void hp_lua_unwatch(hp_lua *h);
void hp_lua_interrupt(hp_lua *h, unsigned long long token);

// Wrappers for function-like macros.
static inline void hp_lua_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline void hp_lua_newtable(lua_State *L) { lua_newtable(L); }
static inline int hp_lua_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline const char *hp_lua_tolstring(lua_State *L, int idx, size_t *len) { return lua_tolstring(L, idx, len); }
static inline int hp_lua_isinteger(lua_State *L, int idx) { return lua_isinteger(L, idx); }
