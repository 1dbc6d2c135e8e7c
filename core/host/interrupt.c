/*
 * Ctrl-C while Lua code runs. The signal handler may not touch the Lua state beyond lua_sethook (which
 * LuaJIT allows from a signal handler, as its own interpreter does), so it asks twice:
 *  - the engine: pmp_request_interrupt() makes the next op fail with "interrupted", which the Lua
 *    wrapper raises as an error. This stops loops that call engine ops, even inside compiled traces.
 *  - the interpreter: a hook on every call, return and instruction raises "interrupted!".
 * Limitation: LuaJIT does not run hooks inside JIT-compiled traces, so a tight loop of pure Lua that
 * calls neither the engine nor an uncompiled function keeps running. A second Ctrl-C before the first
 * took effect therefore kills the process, as in the luajit interpreter.
 */
#include "host.h"

#include <signal.h>

#include <lauxlib.h>

#include "pmp.h"

static lua_State *running_state;
static volatile sig_atomic_t interrupt_pending;
static struct sigaction action_before_arming;

static void raise_interrupted(lua_State *L, lua_Debug *event) {
  (void)event;
  lua_sethook(L, NULL, 0, 0);
  interrupt_pending = 0;
  luaL_error(L, "interrupted!");
}

static void on_sigint(int signal_number) {
  if (interrupt_pending) {
    signal(signal_number, SIG_DFL);
    raise(signal_number);
    return;
  }
  interrupt_pending = 1;
  pmp_request_interrupt();
  lua_sethook(running_state, raise_interrupted, LUA_MASKCALL | LUA_MASKRET | LUA_MASKCOUNT, 1);
}

void interrupt_arm(lua_State *L) {
  /* A Ctrl-C pressed before this statement must not fail its first op. */
  pmp_clear_interrupt();
  interrupt_pending = 0;
  running_state = L;
  struct sigaction action = {0};
  action.sa_handler = on_sigint;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, &action_before_arming);
}

void interrupt_disarm(lua_State *L) {
  /* Restore first: once the handler is gone it cannot set the hook again after we clear it. */
  sigaction(SIGINT, &action_before_arming, NULL);
  lua_sethook(L, NULL, 0, 0);
  interrupt_pending = 0;
}
