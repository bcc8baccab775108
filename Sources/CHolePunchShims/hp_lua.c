// Sandboxed Lua states for strategy scripts. Everything that can raise a Lua error from C lives here: the
// count hook, the capped allocator's consequences, `hp.log`, and the replacements for base functions that
// would let a script escape its limits (the rest of the `hp` library is Lua: Resources/hp.lua). Swift only enters Lua through hp_lua_call
// (a lua_pcall), so a longjmp never crosses a Swift frame.
#include "hp_lua.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// Longest `hp.log` message and most messages per call: a script must not flood the host's logs.
#define HP_MAX_LOG_LEN 1024
#define HP_MAX_LOGS_PER_CALL 64
// Work, in "units" of roughly one VM instruction (a few nanoseconds): the C library functions a script can
// reach charge their work to the instruction budget before they start, so a single call cannot run for
// long inside C where the count hook never fires. A byte copied or compared costs 1/64 unit, an element
// moved in a table about 8.
#define HP_BYTES_PER_UNIT 64.0
#define HP_UNITS_PER_ELEMENT 8.0
// Most work one C call may do whatever the budget, so huge budgets (tests, `--instruction-budget`) still
// leave the wall-clock check a chance to run between calls: 16M units, around 100 ms of memcpy.
#define HP_MAX_CALL_WORK (16.0 * 1024 * 1024)
// `load` inside a script: at most this many chunks, and bytes in total, per hook call; one chunk at most
// HP_MAX_LOAD_CHUNK bytes. Compiling is linear but not cheap, and it runs in C.
#define HP_MAX_LOADS_PER_CALL 64
#define HP_MAX_LOAD_CHUNK (256 * 1024)
#define HP_MAX_LOAD_TOTAL (1024 * 1024)
// Allocations at least this large check the budget and the deadline on the spot.
#define HP_BIG_ALLOC (64 * 1024)

struct hp_lua {
    lua_State *L;
    size_t limit;
    size_t used;
    int headroom;        // 1 outside protected calls: Swift-side pushes must never fail
    int in_call;         // 1 between hp_begin and hp_end: the budget and the deadline are those of this call
    int abort_reason;    // HP_LUA_ABORT_*, sticky for the duration of one call
    int64_t budget;      // instructions allowed in this call
    int64_t spent;       // instructions counted so far (in hook granules)
    int granularity;     // instructions between two hook invocations
    int64_t deadline_ns; // CLOCK_MONOTONIC deadline of this call
    uint64_t seed;       // from ctx.seed, restarts the generator at every call
    uint64_t rng;
    int log_count;
    int load_count;      // chunks compiled by `load` in this call
    size_t load_bytes;   // and their total size
    atomic_int last_line; // line of the script last seen running: read by another thread when a call is abandoned
    atomic_ullong call_seq;   // which watched call is running (hp_lua_watch); a stale interrupt is ignored
    atomic_int interrupted;   // set by hp_lua_interrupt from another thread: the call is past its deadline
    hp_lua_log_fn log_fn;
    void *log_user;
};

static atomic_long hp_live_states;

static int64_t hp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static hp_lua *hp_from(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return (hp_lua *)ud;
}

// The capped allocator. Refusing an allocation makes Lua raise a memory error inside the protected call;
// the refusal is remembered so that a script cannot swallow it with pcall and carry on.
static void *hp_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    hp_lua *h = (hp_lua *)ud;
    size_t old = ptr ? osize : 0; // with ptr == NULL, osize encodes an object type, not a size
    if (nsize == 0) {
        if (ptr) {
            __atomic_store_n(&h->used, h->used - old, __ATOMIC_RELAXED);
            free(ptr);
        }
        return NULL;
    }
    if (nsize > old && !h->headroom) {
        if (h->used + (nsize - old) > h->limit) {
            h->abort_reason = HP_LUA_ABORT_MEMORY;
            return NULL;
        }
        // Work the VM does in a single instruction (`a .. b` of long strings, table growth) is proportional
        // to what it allocates: charge it, and let large allocations stop a call that is out of budget or
        // time without waiting for the next hook granule.
        h->spent += (int64_t)((nsize - old) / 64);
        if (nsize - old >= HP_BIG_ALLOC && h->in_call) {
            if (h->abort_reason == HP_LUA_ABORT_NONE) {
                if (h->spent >= h->budget) {
                    h->abort_reason = HP_LUA_ABORT_BUDGET;
                } else if (hp_now_ns() >= h->deadline_ns) {
                    h->abort_reason = HP_LUA_ABORT_TIME;
                }
            }
            // Keep refusing: Lua retries a failed allocation once after a full collection.
            if (h->abort_reason == HP_LUA_ABORT_BUDGET || h->abort_reason == HP_LUA_ABORT_TIME) {
                return NULL;
            }
        }
    }
    void *p = realloc(ptr, nsize);
    if (p == NULL) {
        return NULL;
    }
    // Relaxed atomic store: `memoryUsed` may read it from another thread while a call runs.
    __atomic_store_n(&h->used, h->used - old + nsize, __ATOMIC_RELAXED);
    return p;
}

// Finds the innermost frame, from `level` outwards, that runs the script's code and has a line. Frames of the
// `hp` library (HP_LUA_PRELUDE_CHUNK) are passed over: a limit hit inside `hp.merge` belongs to the script's
// line that called it, not to a line of a file the script's author never wrote.
static int hp_script_frame(lua_State *L, int level, lua_Debug *ar) {
    for (; lua_getstack(L, level, ar); level++) {
        if (lua_getinfo(L, "Sl", ar) && ar->currentline > 0 && strcmp(ar->source, HP_LUA_PRELUDE_CHUNK) != 0) {
            return 1;
        }
    }
    return 0;
}

// Raises `msg` prefixed with the position of the innermost script frame that has a line.
static int hp_raise_at(lua_State *L, int first_level, const char *msg) {
    lua_Debug ar;
    if (hp_script_frame(L, first_level, &ar)) {
        lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, msg);
        return lua_error(L);
    }
    lua_pushstring(L, msg);
    return lua_error(L);
}

// Count hook: enforces the instruction budget and the wall-clock deadline. Once tripped it keeps raising,
// so a script that catches the error only burns another granule before it is raised again.
static void hp_hook(lua_State *L, lua_Debug *ar) {
    hp_lua *h = hp_from(L);
    lua_Debug frame;
    (void)ar; // the running function's record; hp_script_frame looks further out when it is the library's
    if (hp_script_frame(L, 0, &frame)) {
        atomic_store_explicit(&h->last_line, frame.currentline, memory_order_relaxed);
    }
    if (atomic_load_explicit(&h->interrupted, memory_order_relaxed)) {
        // The watchdog saw the deadline pass while one granule ran long (single instructions that do
        // unbounded work without allocating, such as comparing long strings full of NUL bytes).
        h->abort_reason = HP_LUA_ABORT_TIME;
        hp_raise_at(L, 0, "time limit exceeded");
    }
    h->spent += h->granularity;
    if (h->abort_reason == HP_LUA_ABORT_BUDGET || h->spent >= h->budget) {
        h->abort_reason = HP_LUA_ABORT_BUDGET;
        hp_raise_at(L, 0, "instruction budget exceeded");
    }
    if (h->abort_reason == HP_LUA_ABORT_TIME || hp_now_ns() >= h->deadline_ns) {
        h->abort_reason = HP_LUA_ABORT_TIME;
        hp_raise_at(L, 0, "time limit exceeded");
    }
}

// Message handler: string errors already carry a position; other error values get one, and a type name.
static int hp_msgh(lua_State *L) {
    if (lua_type(L, 1) == LUA_TSTRING) {
        return 1;
    }
    const char *tn = luaL_typename(L, 1);
    lua_Debug ar;
    for (int level = 1; lua_getstack(L, level, &ar); level++) {
        if (lua_getinfo(L, "Sl", &ar) && ar.currentline > 0) {
            lua_pushfstring(L, "%s:%d: (error object is a %s value)", ar.short_src, ar.currentline, tn);
            return 1;
        }
    }
    lua_pushfstring(L, "(error object is a %s value)", tn);
    return 1;
}

static uint64_t hp_next_random(hp_lua *h) {
    // splitmix64: tiny, good enough for port spreading, and identical on every platform.
    uint64_t z = (h->rng += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// MARK: replacements for base functions

static int hp_abort(lua_State *L, int reason, const char *msg);
static void hp_charge(lua_State *L, double units, const char *fn);

// pcall that cannot catch sandbox aborts (budget, time, memory).
static int hp_sb_pcall(lua_State *L) {
    luaL_checkany(L, 1);
    int st = lua_pcall(L, lua_gettop(L) - 1, LUA_MULTRET, 0);
    if (st != LUA_OK) {
        if (hp_from(L)->abort_reason != HP_LUA_ABORT_NONE) {
            return lua_error(L);
        }
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushboolean(L, 1);
    lua_insert(L, 1);
    return lua_gettop(L);
}

// xpcall with the same rule.
static int hp_sb_xpcall(lua_State *L) {
    int n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_pushvalue(L, 1);
    lua_copy(L, 2, 1);
    lua_replace(L, 2); // stack: handler, f, args...
    int st = lua_pcall(L, n - 2, LUA_MULTRET, 1);
    if (st != LUA_OK && hp_from(L)->abort_reason != HP_LUA_ABORT_NONE) {
        return lua_error(L);
    }
    lua_pushboolean(L, st == LUA_OK);
    lua_replace(L, 1);
    return lua_gettop(L);
}

// setmetatable that refuses finalisers: a __gc would run Lua code outside any budgeted call.
static int hp_sb_setmetatable(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    int t = lua_type(L, 2);
    luaL_argexpected(L, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");
    if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL) {
        return luaL_error(L, "cannot change a protected metatable");
    }
    if (t == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL) {
            return luaL_error(L, "finalisers (__gc) are not allowed in strategies");
        }
        lua_pop(L, 1);
    }
    lua_settop(L, 2);
    lua_setmetatable(L, 1);
    return 1;
}

// load restricted to text chunks given as strings.
static int hp_sb_load(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING) {
        return luaL_error(L, "load: only string chunks are allowed in strategies");
    }
    size_t len = 0;
    const char *src = lua_tolstring(L, 1, &len);
    const char *name = luaL_optstring(L, 2, "=(load)");
    hp_lua *h = hp_from(L);
    if (len > HP_MAX_LOAD_CHUNK) {
        lua_pushfstring(L, "load: refused, a chunk of %I bytes (at most %d)", (lua_Integer)len, HP_MAX_LOAD_CHUNK);
        return hp_abort(L, HP_LUA_ABORT_BUDGET, lua_tostring(L, -1));
    }
    if (h->load_count >= HP_MAX_LOADS_PER_CALL || h->load_bytes + len > HP_MAX_LOAD_TOTAL) {
        lua_pushfstring(L, "load: refused, more than %d chunks or %d bytes compiled in one call",
                        HP_MAX_LOADS_PER_CALL, HP_MAX_LOAD_TOTAL);
        return hp_abort(L, HP_LUA_ABORT_BUDGET, lua_tostring(L, -1));
    }
    h->load_count++;
    h->load_bytes += len;
    // Compiling costs far more per byte than copying: charge 2 units a byte.
    hp_charge(L, (double)len * 2.0, "load");
    int has_env = !lua_isnone(L, 4);
    int st = luaL_loadbufferx(L, src, len, name, "t");
    if (st != LUA_OK) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    if (has_env) {
        lua_pushvalue(L, 4);
        if (!lua_setupvalue(L, -2, 1)) {
            lua_pop(L, 1);
        }
    }
    return 1;
}

// math.random driven by the per-call generator, so plans stay deterministic for a given ctx.seed.
static int hp_sb_random(lua_State *L) {
    hp_lua *h = hp_from(L);
    uint64_t r = hp_next_random(h);
    lua_Integer lo, hi;
    switch (lua_gettop(L)) {
    case 0:
        lua_pushnumber(L, (lua_Number)(r >> 11) * 0x1.0p-53);
        return 1;
    case 1:
        lo = 1;
        hi = luaL_checkinteger(L, 1);
        break;
    case 2:
        lo = luaL_checkinteger(L, 1);
        hi = luaL_checkinteger(L, 2);
        break;
    default:
        return luaL_error(L, "wrong number of arguments");
    }
    luaL_argcheck(L, lo <= hi, lua_gettop(L), "interval is empty");
    uint64_t span = (uint64_t)hi - (uint64_t)lo;
    uint64_t v = span == UINT64_MAX ? r : r % (span + 1);
    lua_pushinteger(L, (lua_Integer)((uint64_t)lo + v));
    return 1;
}

// MARK: bounded library functions
//
// Each wrapper works out, from its arguments alone, how much work the original C function is about to do,
// charges it (hp_charge), and only then calls the original, kept as upvalue 1. A call that would do more
// than the budget left, or more than HP_MAX_CALL_WORK, is refused before it starts with a sandbox abort
// (which pcall cannot catch), so the budget and the deadline also hold inside the C library.

// Remembers the line of the Lua code that called the running C function, for errors raised from outside.
static void hp_note_caller_line(lua_State *L, hp_lua *h) {
    lua_Debug ar;
    if (hp_script_frame(L, 1, &ar)) {
        atomic_store_explicit(&h->last_line, ar.currentline, memory_order_relaxed);
    }
}

// Raises a sandbox abort of `reason` with `msg`, positioned at the calling Lua line.
static int hp_abort(lua_State *L, int reason, const char *msg) {
    hp_from(L)->abort_reason = reason;
    return hp_raise_at(L, 1, msg);
}

// Charges `units` of work for `fn` to the call's budget, or refuses it. Also checks the deadline, so that a
// loop of cheap-looking C calls is stopped as promptly as a loop of Lua instructions.
static void hp_charge(lua_State *L, double units, const char *fn) {
    hp_lua *h = hp_from(L);
    // Fast path for the common small call (table.insert in a port loop): the count hook checks the clock
    // every granule anyway, so only large charges pay for a position and a clock read here.
    if (units < 1024 && h->abort_reason == HP_LUA_ABORT_NONE && h->spent + 1024 < h->budget) {
        h->spent += (int64_t)units + 1;
        return;
    }
    hp_note_caller_line(L, h);
    if (h->abort_reason != HP_LUA_ABORT_NONE) {
        hp_raise_at(L, 1, h->abort_reason == HP_LUA_ABORT_TIME ? "time limit exceeded" : "instruction budget exceeded");
    }
    if (!(units <= HP_MAX_CALL_WORK)) { // also catches NaN
        lua_pushfstring(L, "%s: refused, about %I units of work in one call (at most %I)", fn,
                        (lua_Integer)(units < 9.0e18 ? units : 9.0e18), (lua_Integer)HP_MAX_CALL_WORK);
        hp_abort(L, HP_LUA_ABORT_BUDGET, lua_tostring(L, -1));
    }
    h->spent += (int64_t)units + 1;
    if (h->spent >= h->budget) {
        lua_pushfstring(L, "%s: instruction budget exceeded (the call needs about %I units)", fn, (lua_Integer)units);
        hp_abort(L, HP_LUA_ABORT_BUDGET, lua_tostring(L, -1));
    }
    if (hp_now_ns() >= h->deadline_ns) {
        hp_abort(L, HP_LUA_ABORT_TIME, "time limit exceeded");
    }
}

// Refuses a result that could never fit under the memory cap, before any of it is built.
static void hp_check_result_size(lua_State *L, double bytes, const char *fn) {
    hp_lua *h = hp_from(L);
    if (!(bytes <= (double)h->limit)) {
        hp_note_caller_line(L, h);
        lua_pushfstring(L, "%s: the result (about %I bytes) is too large for the memory limit of %I bytes", fn,
                        (lua_Integer)(bytes < 9.0e18 ? bytes : 9.0e18), (lua_Integer)h->limit);
        hp_abort(L, HP_LUA_ABORT_MEMORY, lua_tostring(L, -1));
    }
}

// Whether `msg` starts with a `chunk:line:` position.
static int hp_has_position(const char *msg) {
    const char *colon = strchr(msg, ':');
    if (colon == NULL || colon[1] < '0' || colon[1] > '9') return 0;
    const char *p = colon + 1;
    while (*p >= '0' && *p <= '9') p++;
    return *p == ':';
}

// Calls the function below the top `nargs` values, all results kept. Called from a wrapper, the original
// would report errors without a position and as "bad argument #1 to '?'" (Lua names functions by how they
// were called); its own errors get the wrapper's name and the calling line back. Sandbox aborts, memory
// errors and errors that already carry a position (from Lua callbacks) pass through unchanged.
static void hp_call_original(lua_State *L, int nargs) {
    int st = lua_pcall(L, nargs, LUA_MULTRET, 0);
    if (st == LUA_OK) {
        return;
    }
    if (st == LUA_ERRMEM || hp_from(L)->abort_reason != HP_LUA_ABORT_NONE || lua_type(L, -1) != LUA_TSTRING ||
        hp_has_position(lua_tostring(L, -1))) {
        lua_error(L);
    }
    const char *full = lua_tostring(L, lua_upvalueindex(2));
    const char *dot = full ? strrchr(full, '.') : NULL;
    lua_pushfstring(L, "'%s'", dot ? dot + 1 : (full ? full : "?"));
    luaL_gsub(L, lua_tostring(L, -2), "'?'", lua_tostring(L, -1));
    hp_raise_at(L, 1, lua_tostring(L, -1));
}

// Calls the original function (upvalue 1) with the wrapper's arguments, returning all its results.
static int hp_forward(lua_State *L) {
    int n = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    hp_call_original(L, n);
    return lua_gettop(L);
}

static double hp_bytes(size_t n) { return (double)n / HP_BYTES_PER_UNIT; }

// Lua's rule for string positions (negative counts from the end), clipped to 1...len+1 like string.byte.
static lua_Integer hp_start_pos(lua_Integer pos, size_t len) {
    if (pos > 0) return pos;
    if (pos == 0) return 1;
    if (pos < -(lua_Integer)len) return 1;
    return (lua_Integer)len + pos + 1;
}

static lua_Integer hp_end_pos(lua_Integer pos, size_t len) {
    if (pos > (lua_Integer)len) return (lua_Integer)len;
    if (pos >= 0) return pos;
    if (pos < -(lua_Integer)len) return 0;
    return (lua_Integer)len + pos + 1;
}

// Elements in i...j, as a double so that huge ranges cannot overflow.
static double hp_span(lua_Integer i, lua_Integer j) { return j < i ? 0.0 : (double)j - (double)i + 1.0; }

// string.rep(s, n [, sep]): `string.rep('', 2^40)` loops 2^40 times without allocating anything.
static int hp_sb_rep(lua_State *L) {
    size_t l = 0, lsep = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer n = luaL_checkinteger(L, 2);
    luaL_optlstring(L, 3, "", &lsep);
    if (n > 0) {
        double total = (double)n * (double)l + ((double)n - 1) * (double)lsep;
        hp_check_result_size(L, total, "string.rep");
        hp_charge(L, (double)n / 8.0 + hp_bytes((size_t)total), "string.rep");
    }
    return hp_forward(L);
}

// Plain string.find: the naive search is subject x needle in the worst case ("aaa…ab" in "aaa…a").
static int hp_sb_find(lua_State *L) {
    size_t ls = 0, lp = 0;
    luaL_checklstring(L, 1, &ls);
    luaL_checklstring(L, 2, &lp);
    lua_Integer init = luaL_optinteger(L, 3, 1);
    lua_Integer start = hp_start_pos(init, ls);
    double scanned = start > (lua_Integer)ls ? 0.0 : (double)ls - (double)start + 1.0;
    hp_charge(L, hp_bytes((size_t)scanned) * (lp > 1 ? (double)lp : 1.0), "string.find");
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_pushinteger(L, init);
    lua_pushboolean(L, 1);
    hp_call_original(L, 4);
    return lua_gettop(L) - 2;
}

// string.byte(s, i, j) and utf8.codepoint(s, i, j): one value pushed per position.
static int hp_sb_slice(lua_State *L) {
    size_t l = 0;
    luaL_checklstring(L, 1, &l);
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer j = luaL_optinteger(L, 3, i);
    double n = hp_span(hp_start_pos(i, l), hp_end_pos(j, l));
    hp_charge(L, n * 2.0, lua_tostring(L, lua_upvalueindex(2)));
    return hp_forward(L);
}

// Functions whose work is linear in the total size of their string arguments plus their argument count:
// string.format, string.char, string.sub/upper/lower/reverse, string.pack/unpack, utf8.char/len/offset,
// tonumber, table.pack, select. Upvalue 2 is the name for messages.
static int hp_sb_linear(lua_State *L) {
    int n = lua_gettop(L);
    double bytes = 0;
    for (int i = 1; i <= n; i++) {
        if (lua_type(L, i) == LUA_TSTRING) {
            bytes += (double)lua_rawlen(L, i);
        }
    }
    // string.format('%q') and utf8 decoding look at each byte several times: charge 1/16 unit per byte.
    hp_charge(L, (double)n + bytes / 16.0, lua_tostring(L, lua_upvalueindex(2)));
    return hp_forward(L);
}

// The table library reads lengths through __len and elements through __index / __newindex, all of which a
// script controls. A __len may answer differently when the library asks again after we priced the call (1, then
// 2^62), so tables with one are refused outright. Each element access through an __index or __newindex chain may
// take up to Lua's MAXTAGLOOP (2,000) lookups in C without running a Lua instruction, so it is priced as that.
#define HP_META_CHAIN 2000.0
static double hp_table_factor(lua_State *L, int idx, const char *fn) {
    if (lua_type(L, idx) != LUA_TTABLE) {
        return 1.0;
    }
    if (luaL_getmetafield(L, idx, "__len") != LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushfstring(L, "%s: refused, a table whose length comes from __len", fn);
        hp_abort(L, HP_LUA_ABORT_BUDGET, lua_tostring(L, -1));
    }
    double factor = 1.0;
    if (luaL_getmetafield(L, idx, "__index") != LUA_TNIL) {
        lua_pop(L, 1);
        factor = HP_META_CHAIN;
    }
    if (luaL_getmetafield(L, idx, "__newindex") != LUA_TNIL) {
        lua_pop(L, 1);
        factor = HP_META_CHAIN;
    }
    return factor;
}

// table.move(a1, f, e, t [, a2]): `table.move({}, 1, 2^40, 1)` loops in C without allocating.
static int hp_sb_move(lua_State *L) {
    lua_Integer f = luaL_checkinteger(L, 2);
    lua_Integer e = luaL_checkinteger(L, 3);
    luaL_checkinteger(L, 4);
    double factor = hp_table_factor(L, 1, "table.move");
    if (!lua_isnoneornil(L, 5)) {
        double other = hp_table_factor(L, 5, "table.move");
        factor = other > factor ? other : factor;
    }
    hp_charge(L, hp_span(f, e) * HP_UNITS_PER_ELEMENT * factor, "table.move");
    return hp_forward(L);
}

// table.unpack(t [, i [, j]]).
static int hp_sb_unpack(lua_State *L) {
    double factor = hp_table_factor(L, 1, "table.unpack");
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer j = lua_isnoneornil(L, 3) ? luaL_len(L, 1) : luaL_checkinteger(L, 3);
    hp_charge(L, hp_span(i, j) * 2.0 * factor, "table.unpack");
    return hp_forward(L);
}

// table.concat(t [, sep [, i [, j]]]): elements, plus the bytes of the result (counted before building it).
static int hp_sb_concat(lua_State *L) {
    size_t lsep = 0;
    luaL_optlstring(L, 2, "", &lsep);
    double factor = hp_table_factor(L, 1, "table.concat");
    lua_Integer i = luaL_optinteger(L, 3, 1);
    lua_Integer j = lua_isnoneornil(L, 4) ? luaL_len(L, 1) : luaL_checkinteger(L, 4);
    double n = hp_span(i, j);
    hp_charge(L, n * HP_UNITS_PER_ELEMENT * factor, "table.concat");
    double bytes = n > 1 ? (n - 1) * (double)lsep : 0;
    if (lua_type(L, 1) == LUA_TTABLE) {
        // Raw reads see what the concatenation will copy unless metamethods supply the elements; those
        // run Lua code, which the count hook sees, and their strings still meet the memory cap.
        // Counted by position, never past j: `k <= j` alone never ends when j is math.maxinteger.
        for (lua_Integer k = i; n > 0; k++) {
            if (lua_rawgeti(L, 1, k) == LUA_TSTRING) {
                bytes += (double)lua_rawlen(L, -1);
            }
            lua_pop(L, 1);
            if (k == j) {
                break;
            }
        }
    }
    hp_check_result_size(L, bytes, "table.concat");
    hp_charge(L, hp_bytes((size_t)bytes), "table.concat");
    return hp_forward(L);
}

// table.insert(t, pos, v) and table.remove(t, pos) shift every element after pos, and `#t` comes from
// __len, which a script controls: a table that claims 2^40 elements would be shifted in C for hours.
static int hp_sb_shift(lua_State *L) {
    int nargs = lua_gettop(L);
    int is_insert = lua_toboolean(L, lua_upvalueindex(3));
    double factor = hp_table_factor(L, 1, lua_tostring(L, lua_upvalueindex(2)));
    lua_Integer size = luaL_len(L, 1);
    double n = 0;
    if (is_insert && nargs == 3) {
        n = hp_span(luaL_checkinteger(L, 2), size + 1);
    } else if (!is_insert && nargs >= 2) {
        n = hp_span(luaL_checkinteger(L, 2), size);
    }
    hp_charge(L, n * HP_UNITS_PER_ELEMENT * factor, lua_tostring(L, lua_upvalueindex(2)));
    return hp_forward(L);
}

// table.sort(t [, comp]): n log n comparisons and swaps (a Lua comparator is counted by the hook too).
static int hp_sb_sort(lua_State *L) {
    double factor = hp_table_factor(L, 1, "table.sort");
    lua_Integer n = luaL_len(L, 1);
    double dn = n > 1 ? (double)n : 1.0;
    hp_charge(L, dn * (log2(dn) + 1.0) * HP_UNITS_PER_ELEMENT * factor, "table.sort");
    return hp_forward(L);
}

// Replaces `lib[name]` with `fn`, keeping the original as upvalue 1 and `name` as upvalue 2 (for messages);
// `extra` (0 or 1 values on the stack top) becomes upvalue 3. The library table is at index -1 - extra;
// `lib` is NULL for base functions.
static void hp_wrap(lua_State *L, const char *lib, const char *name, lua_CFunction fn, int extra) {
    int libidx = lua_absindex(L, -1 - extra);
    lua_getfield(L, libidx, name);
    if (lib == NULL) {
        lua_pushstring(L, name);
    } else {
        lua_pushfstring(L, "%s.%s", lib, name);
    }
    if (extra) {
        lua_pushvalue(L, -3);
        lua_remove(L, -4);
    }
    lua_pushcclosure(L, fn, 2 + extra);
    lua_setfield(L, libidx, name);
}

// MARK: the hp helper library
//
// Only `hp.log` is C, because it calls the host. The rest of `hp` (range, merge, worst_nat, …) is Lua, in
// HolePunchStrategy's Resources/hp.lua, run in each state before the strategy.

static int hp_log(lua_State *L) {
    static const char *const levels[] = {"trace", "debug", "info", "notice", "warning", "error", NULL};
    hp_lua *h = hp_from(L);
    int level = luaL_checkoption(L, 1, NULL, levels);
    size_t len = 0;
    const char *msg = luaL_tolstring(L, 2, &len);
    if (h->log_fn == NULL || h->log_count >= HP_MAX_LOGS_PER_CALL) {
        return 0;
    }
    h->log_count++;
    h->log_fn(h->log_user, level, msg, len > HP_MAX_LOG_LEN ? HP_MAX_LOG_LEN : len);
    return 0;
}

static const luaL_Reg hp_funcs[] = {
    {"log", hp_log},
    {NULL, NULL},
};

// MARK: state set-up

static int hp_open_sandbox(lua_State *L) {
    static const luaL_Reg libs[] = {
        {LUA_GNAME, luaopen_base},
        {LUA_STRLIBNAME, luaopen_string},
        {LUA_TABLIBNAME, luaopen_table},
        {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},
        {NULL, NULL},
    };
    for (const luaL_Reg *lib = libs; lib->func; lib++) {
        luaL_requiref(L, lib->name, lib->func, 1);
        lua_pop(L, 1);
    }
    lua_pushglobaltable(L);
    // Host access and uncounted execution paths are removed rather than wrapped.
    static const char *const removed[] = {"dofile", "loadfile", "print", "collectgarbage", "warn", NULL};
    for (const char *const *name = removed; *name; name++) {
        lua_pushnil(L);
        lua_setfield(L, -2, *name);
    }
    lua_pushcfunction(L, hp_sb_load);
    lua_setfield(L, -2, "load");
    lua_pushcfunction(L, hp_sb_pcall);
    lua_setfield(L, -2, "pcall");
    lua_pushcfunction(L, hp_sb_xpcall);
    lua_setfield(L, -2, "xpcall");
    lua_pushcfunction(L, hp_sb_setmetatable);
    lua_setfield(L, -2, "setmetatable");

    // Every C function left reachable either does O(1) work or is wrapped to charge its work up front.
    static const char *const base_linear[] = {"tonumber", "select", NULL};
    for (const char *const *name = base_linear; *name; name++) {
        hp_wrap(L, NULL, *name, hp_sb_linear, 0);
    }

    // Lua's pattern matcher backtracks inside C with no bound we could charge in advance ("a*a*a*a*b" on a
    // long subject is polynomial of high degree), so the pattern functions are not offered: find treats its
    // pattern as plain text; match, gmatch and gsub are gone.
    lua_getfield(L, -1, LUA_STRLIBNAME);
    static const char *const string_removed[] = {"dump", "match", "gmatch", "gsub", NULL};
    for (const char *const *name = string_removed; *name; name++) {
        lua_pushnil(L);
        lua_setfield(L, -2, *name);
    }
    hp_wrap(L, "string", "find", hp_sb_find, 0);
    hp_wrap(L, "string", "rep", hp_sb_rep, 0);
    hp_wrap(L, "string", "byte", hp_sb_slice, 0);
    static const char *const string_linear[] = {"format", "char", "sub", "upper", "lower", "reverse",
                                                "pack", "unpack", "packsize", NULL};
    for (const char *const *name = string_linear; *name; name++) {
        hp_wrap(L, "string", *name, hp_sb_linear, 0);
    }
    lua_pop(L, 1);

    lua_getfield(L, -1, LUA_TABLIBNAME);
    hp_wrap(L, "table", "move", hp_sb_move, 0);
    hp_wrap(L, "table", "unpack", hp_sb_unpack, 0);
    hp_wrap(L, "table", "concat", hp_sb_concat, 0);
    hp_wrap(L, "table", "sort", hp_sb_sort, 0);
    hp_wrap(L, "table", "pack", hp_sb_linear, 0);
    lua_pushboolean(L, 1);
    hp_wrap(L, "table", "insert", hp_sb_shift, 1);
    lua_pushboolean(L, 0);
    hp_wrap(L, "table", "remove", hp_sb_shift, 1);
    lua_pop(L, 1);

    lua_getfield(L, -1, LUA_UTF8LIBNAME);
    hp_wrap(L, "utf8", "codepoint", hp_sb_slice, 0);
    static const char *const utf8_linear[] = {"char", "len", "offset", "codes", NULL};
    for (const char *const *name = utf8_linear; *name; name++) {
        hp_wrap(L, "utf8", *name, hp_sb_linear, 0);
    }
    lua_pop(L, 1);

    lua_getfield(L, -1, LUA_MATHLIBNAME);
    lua_pushcfunction(L, hp_sb_random);
    lua_setfield(L, -2, "random");
    lua_pushnil(L);
    lua_setfield(L, -2, "randomseed");
    lua_pop(L, 1);

    luaL_newlib(L, hp_funcs);
    lua_setfield(L, -2, "hp");
    lua_pop(L, 1);
    return 0;
}

hp_lua *hp_lua_new(size_t mem_limit, hp_lua_log_fn log_fn, void *log_user) {
    hp_lua *h = (hp_lua *)calloc(1, sizeof *h);
    if (h == NULL) {
        return NULL;
    }
    h->limit = mem_limit;
    h->headroom = 1;
    h->log_fn = log_fn;
    h->log_user = log_user;
    h->L = lua_newstate(hp_alloc, h);
    if (h->L == NULL) {
        free(h);
        return NULL;
    }
    lua_pushcfunction(h->L, hp_open_sandbox);
    if (lua_pcall(h->L, 0, 0, 0) != LUA_OK) {
        lua_close(h->L);
        free(h);
        return NULL;
    }
    atomic_fetch_add(&hp_live_states, 1);
    return h;
}

void hp_lua_free(hp_lua *h) {
    if (h == NULL) {
        return;
    }
    h->headroom = 1;
    lua_close(h->L);
    free(h);
    atomic_fetch_sub(&hp_live_states, 1);
}

long hp_lua_live_states(void) { return atomic_load(&hp_live_states); }
lua_State *hp_lua_state(hp_lua *h) { return h->L; }
size_t hp_lua_mem_used(const hp_lua *h) { return __atomic_load_n(&h->used, __ATOMIC_RELAXED); }
int hp_lua_last_line(const hp_lua *h) { return atomic_load_explicit(&h->last_line, memory_order_relaxed); }
void hp_lua_set_seed(hp_lua *h, uint64_t seed) { h->seed = seed; }
int hp_lua_abort_reason(const hp_lua *h) { return h->abort_reason; }

static void hp_begin(hp_lua *h, int64_t budget, int64_t time_limit_ns) {
    h->abort_reason = HP_LUA_ABORT_NONE;
    h->budget = budget > 0 ? budget : 1;
    h->spent = 0;
    h->granularity = h->budget < 1000 ? (int)h->budget : 1000;
    h->deadline_ns = hp_now_ns() + (time_limit_ns > 0 ? time_limit_ns : 0);
    h->rng = h->seed;
    h->log_count = 0;
    h->load_count = 0;
    h->load_bytes = 0;
    atomic_store_explicit(&h->last_line, 0, memory_order_relaxed);
    h->headroom = 0;
    h->in_call = 1;
    atomic_store_explicit(&h->interrupted, 0, memory_order_relaxed);
    lua_sethook(h->L, hp_hook, LUA_MASKCOUNT, h->granularity);
}

static void hp_end(hp_lua *h, int status) {
    lua_sethook(h->L, NULL, 0, 0);
    h->headroom = 1;
    h->in_call = 0;
    if (status != LUA_OK) {
        // Drop whatever a failed call piled up, so the next call starts with its full memory allowance.
        lua_gc(h->L, LUA_GCCOLLECT, 0);
    }
}

int hp_lua_call(hp_lua *h, int nargs, int64_t budget, int64_t time_limit_ns) {
    lua_State *L = h->L;
    int func = lua_gettop(L) - nargs;
    lua_pushcfunction(L, hp_msgh);
    lua_insert(L, func);
    hp_begin(h, budget, time_limit_ns);
    // Until the hook first fires (a loaded machine may abandon the call before it has), the call is known to be in
    // the function it entered: name that function's first line, when it is the strategy's and not the prelude's.
    lua_Debug entered;
    lua_pushvalue(L, func + 1);
    if (lua_getinfo(L, ">S", &entered) && entered.linedefined > 0 && strcmp(entered.source, HP_LUA_PRELUDE_CHUNK) != 0) {
        atomic_store_explicit(&h->last_line, entered.linedefined, memory_order_relaxed);
    }
    int st = lua_pcall(L, nargs, 1, func);
    hp_end(h, st);
    lua_remove(L, func);
    return st;
}

unsigned long long hp_lua_watch(hp_lua *h) {
    return atomic_fetch_add(&h->call_seq, 1) + 1;
}

void hp_lua_unwatch(hp_lua *h) {
    atomic_fetch_add(&h->call_seq, 1);
}

// Called from another thread once a watched call's deadline has passed. lua_sethook may be called
// asynchronously (Lua's own documentation of it: at worst one extra hook call): a hook after every
// instruction makes the next instruction boundary raise the time error. Ignored if the call it was
// armed for has ended.
void hp_lua_interrupt(hp_lua *h, unsigned long long seq) {
    if (atomic_load(&h->call_seq) != seq) {
        return;
    }
    atomic_store(&h->interrupted, 1);
    lua_sethook(h->L, hp_hook, LUA_MASKCOUNT, 1);
}

int hp_lua_load_run(hp_lua *h, const char *src, size_t len, const char *chunkname, int nargs,
                    int64_t budget, int64_t time_limit_ns) {
    h->abort_reason = HP_LUA_ABORT_NONE;
    h->headroom = 0; // lua_load is protected: a huge chunk fails with LUA_ERRMEM instead of growing
    int st = luaL_loadbufferx(h->L, src, len, chunkname, "t");
    h->headroom = 1;
    if (st != LUA_OK) {
        return st;
    }
    lua_insert(h->L, -1 - nargs); // the chunk goes below the arguments already pushed
    return hp_lua_call(h, nargs, budget, time_limit_ns);
}
