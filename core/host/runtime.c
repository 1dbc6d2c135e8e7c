/* The Lua state every pmp mode runs in: the project's modules on package.path and `pmp` preloaded. */
#include "host.h"

#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lualib.h>

/* The project root holds lua/, models/ and the pmp executable itself. PMP_PATH overrides it so that a
 * checkout can be run with another build's executable, or the Lua side tested against a copy. */
static int find_project_root(char root[PATH_MAX]) {
  const char *override = getenv("PMP_PATH");
  if (override && *override) {
    if (!realpath(override, root)) {
      fprintf(stderr, "pmp: PMP_PATH=%s: %s\n", override, strerror(errno));
      return -1;
    }
    return 0;
  }
  ssize_t length = readlink("/proc/self/exe", root, PATH_MAX - 1);
  if (length < 0) {
    fprintf(stderr, "pmp: cannot locate the project root from /proc/self/exe: %s (set PMP_PATH)\n",
            strerror(errno));
    return -1;
  }
  root[length] = '\0';
  char *last_slash = strrchr(root, '/');
  if (last_slash == root) last_slash[1] = '\0';
  else if (last_slash) *last_slash = '\0';
  return 0;
}

/* Project modules come first; the default path stays after them so that system-wide Lua modules
 * (busted, penlight) still load. package.cpath is left alone for the same reason. */
static void prepend_project_path(lua_State *L, const char *root) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, "path");
  const char *default_path = lua_tostring(L, -1);
  lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;%s/models/?.lua;%s/?.lua;%s", root, root, root, root,
                  default_path ? default_path : "");
  lua_setfield(L, -3, "path");
  lua_pop(L, 1);

  /* Lua code finds data files relative to the root through require('pmp.root'). */
  lua_getfield(L, -1, "loaded");
  lua_pushstring(L, root);
  lua_setfield(L, -2, "pmp.root");
  lua_pop(L, 2);
}

static int preload_pmp(lua_State *L, const char *root) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "pmp");
  if (runtime_call(L, 1, 1) != 0) {
    const char *cause = lua_tostring(L, -1);
    fprintf(stderr, "pmp: cannot load the pmp library from %s/lua: %s\n", root, cause ? cause : "error()");
    lua_pop(L, 1);
    return -1;
  }
  lua_setglobal(L, "pmp");
  return 0;
}

lua_State *runtime_open(void) {
  char root[PATH_MAX];
  if (find_project_root(root) != 0) return NULL;
  lua_State *L = luaL_newstate();
  if (!L) {
    fprintf(stderr, "pmp: cannot create the Lua state: out of memory\n");
    return NULL;
  }
  luaL_openlibs(L);
  prepend_project_path(L, root);
  if (preload_pmp(L, root) != 0) {
    lua_close(L);
    return NULL;
  }
  return L;
}

/* An uncaught error prints as one line, the message: what users of recipes and tools need, so scripts
 * need no pcall wrappers of their own to hide stacks. PMP_TRACEBACK=1 adds the stack, for debugging. */
static bool traceback_wanted(void) {
  const char *setting = getenv("PMP_TRACEBACK");
  return setting && *setting && strcmp(setting, "0") != 0;
}

/* Message handler: turns the error object into text and, with PMP_TRACEBACK, appends the stack at the
 * point of the error, which is gone once lua_pcall returns. */
static int attach_traceback(lua_State *L) {
  if (lua_isnoneornil(L, 1)) return 1;
  const char *message = lua_tostring(L, 1);
  if (!message) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_isstring(L, -1)) message = lua_tostring(L, -1);
    else message = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  if (traceback_wanted()) luaL_traceback(L, L, message, 1);
  else lua_pushstring(L, message);
  return 1;
}

int runtime_call(lua_State *L, int nargs, int nresults) {
  int handler_index = lua_gettop(L) - nargs;
  lua_pushcfunction(L, attach_traceback);
  lua_insert(L, handler_index);
  interrupt_arm(L);
  int status = lua_pcall(L, nargs, nresults, handler_index);
  interrupt_disarm(L);
  lua_remove(L, handler_index);
  return status;
}

void runtime_report_error(lua_State *L) {
  if (!lua_isnil(L, -1)) {
    const char *message = lua_tostring(L, -1);
    fprintf(stderr, "pmp: %s\n", message ? message : "(error object is not a string)");
    fflush(stderr);
  }
  lua_pop(L, 1);
}
