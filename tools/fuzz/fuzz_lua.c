/*
 * libFuzzer harness for pmp's parsers of outside bytes, driven through the Lua library in the embedded
 * LuaJIT runtime, as users reach them. PMP_FUZZ_TARGET names a function of tools/fuzz/targets.lua that
 * takes the input as a Lua string.
 *
 * What counts as a bug: any sanitizer report (the engine is built with ASan + UBSan), and a Lua error
 * that is not a message written for the user: "attempt to index a nil value" and its kin mean a parser
 * followed bad input somewhere it did not check (targets.is_internal_error decides, the regression spec
 * spec/fuzz_regressions_spec.lua too). Those abort, so libFuzzer keeps the input.
 *
 * Coverage: libFuzzer sees the C code's edges; the Lua parsers' lines reach it through a line hook that
 * bumps an extra-counters array (the JIT is off so that every line runs in the interpreter and hooks).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>

#include "../../core/host/host.h"

#define LINE_COUNTERS (1 << 16)
__attribute__((section("__libfuzzer_extra_counters"))) static uint8_t lua_line_counters[LINE_COUNTERS];

static lua_State *state;
static int target_ref = LUA_NOREF, is_internal_ref = LUA_NOREF;

static void count_line(lua_State *L, lua_Debug *event) {
  if (!lua_getinfo(L, "S", event)) return;
  uintptr_t key = (uintptr_t)event->source * 2654435761u + (uintptr_t)event->currentline * 40503u;
  lua_line_counters[(key ^ (key >> 17)) & (LINE_COUNTERS - 1)]++;
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  const char *target = getenv("PMP_FUZZ_TARGET");
  if (!target || !*target) {
    fprintf(stderr, "fuzz_lua: set PMP_FUZZ_TARGET to a function of tools/fuzz/targets.lua\n");
    exit(2);
  }
  state = runtime_open();
  if (!state) exit(2);
  lua_getglobal(state, "require");
  lua_pushliteral(state, "tools.fuzz.targets");
  if (runtime_call(state, 1, 1) != 0) {
    runtime_report_error(state);
    exit(2);
  }
  lua_getfield(state, -1, target);
  if (!lua_isfunction(state, -1)) {
    fprintf(stderr, "fuzz_lua: tools/fuzz/targets.lua has no target '%s'\n", target);
    exit(2);
  }
  target_ref = luaL_ref(state, LUA_REGISTRYINDEX);
  lua_getfield(state, -1, "is_internal_error");
  is_internal_ref = luaL_ref(state, LUA_REGISTRYINDEX);
  lua_pop(state, 1);
  luaL_dostring(state, "jit.off()");
  lua_sethook(state, count_line, LUA_MASKLINE, 0);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  lua_rawgeti(state, LUA_REGISTRYINDEX, target_ref);
  lua_pushlstring(state, (const char *)data, size);
  if (lua_pcall(state, 1, 0, 0) != 0) {
    lua_rawgeti(state, LUA_REGISTRYINDEX, is_internal_ref);
    lua_pushvalue(state, -2);
    lua_call(state, 1, 1);
    if (lua_toboolean(state, -1)) {
      fprintf(stderr, "fuzz_lua: internal Lua error instead of a message for the user: %s\n", lua_tostring(state, -2));
      abort();
    }
    lua_pop(state, 2);
  }
  /* everything this input made is garbage now: collect it, so that finalizers run on every input */
  lua_gc(state, LUA_GCCOLLECT, 0);
  return 0;
}
