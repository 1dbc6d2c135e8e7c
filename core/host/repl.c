/*
 * The prompt loop. C reads lines (readline on a terminal, plain stdin otherwise); lua/pmp/repl.lua
 * decides whether the statement is complete, runs it and prints its values or its error.
 */
#include "host.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <luajit.h>

#include "pmp.h"

static const char prompt[] = "pmp> ";
static const char continuation_prompt[] = "...> ";

int repl_push_function(lua_State *L, const char *name) {
  lua_getglobal(L, "require");
  lua_pushliteral(L, "pmp.repl");
  int status = runtime_call(L, 1, 1);
  if (status != 0) return status;
  lua_getfield(L, -1, name);
  lua_remove(L, -2);
  if (lua_isfunction(L, -1)) return 0;
  lua_pop(L, 1);
  lua_pushfstring(L, "pmp.repl.%s is not a function", name);
  return -1;
}

/* Calls pmp.repl.<name>(argument) (no argument when NULL) and leaves its first result on the stack.
 * On failure reports the error, leaves nil and returns nonzero. */
static int call_repl(lua_State *L, const char *name, const char *argument) {
  if (repl_push_function(L, name) == 0) {
    if (argument) lua_pushstring(L, argument);
    if (runtime_call(L, argument ? 1 : 0, 1) == 0) return 0;
  }
  runtime_report_error(L);
  lua_pushnil(L);
  return -1;
}

static line_status read_plain_line(char **line) {
  size_t capacity = 0;
  *line = NULL;
  ssize_t length = getline(line, &capacity, stdin);
  if (length < 0) {
    free(*line);
    *line = NULL;
    return LINE_END;
  }
  if (length > 0 && (*line)[length - 1] == '\n') (*line)[length - 1] = '\0';
  return LINE_READ;
}

/* Feeds one line; once the statement is complete, records it in the history and runs it.
 * Returns whether the statement needs more lines. */
static bool handle_line(lua_State *L, const char *line, bool on_terminal) {
  if (call_repl(L, "feed", line) != 0) {
    lua_pop(L, 1);
    call_repl(L, "discard", NULL);
    lua_pop(L, 1);
    return false;
  }
  const char *statement = lua_tostring(L, -1);
  if (!statement) {
    lua_pop(L, 1);
    return true;
  }
  if (on_terminal) line_editor_remember(statement);
  lua_pop(L, 1);
  call_repl(L, "execute", NULL);
  lua_pop(L, 1);
  return false;
}

int repl_run(lua_State *L) {
  bool on_terminal = isatty(STDIN_FILENO);
  if (on_terminal) {
    line_editor_open();
    completion_install(L);
    printf("pmp %s (%s). help() for help, Ctrl-D to exit.\n", pmp_version(), LUAJIT_VERSION);
  }
  if (call_repl(L, "start", NULL) != 0) return 1;
  lua_pop(L, 1);

  bool continuing = false;
  for (;;) {
    fflush(stdout);
    char *line;
    line_status status = on_terminal ? line_editor_read(continuing ? continuation_prompt : prompt, &line)
                                     : read_plain_line(&line);
    if (status == LINE_END) return 0;
    if (status == LINE_INTERRUPTED) {
      call_repl(L, "discard", NULL);
      lua_pop(L, 1);
      continuing = false;
      continue;
    }
    continuing = handle_line(L, line, on_terminal);
    free(line);
  }
}
