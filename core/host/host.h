/*
 * host.h — the pmp executable: LuaJIT embedded with the engine, a script runner and an interactive prompt.
 *
 *   main.c         command line (luajit-compatible options and `arg` table)
 *   runtime.c      the Lua state: project root, module path, preloaded `pmp`, protected calls
 *   interrupt.c    Ctrl-C while Lua code runs
 *   repl.c         the prompt loop, driving lua/pmp/repl.lua
 *   line_editor.c  GNU readline: prompt, Ctrl-C at the prompt, history file
 *   completion.c   tab completion answered by lua/pmp/repl.lua
 */
#ifndef PMP_HOST_H
#define PMP_HOST_H

#include <lua.h>

/* ---- runtime.c ---- */
/* A Lua state with the standard libraries, the project's module path and the global `pmp`.
 * On failure prints why on stderr and returns NULL. */
lua_State *runtime_open(void);
/* lua_pcall with Ctrl-C armed for the duration; the error becomes its message as text (followed by the
 * stack with PMP_TRACEBACK=1). The function and its nargs arguments are on the stack; on failure the
 * error message (or nil) replaces them. */
int runtime_call(lua_State *L, int nargs, int nresults);
/* After a failed runtime_call: prints "pmp: <message>" on stderr and pops it. A nil error object
 * prints nothing: `error()` with no value is how busted asks for a failing exit status. */
void runtime_report_error(lua_State *L);

/* ---- interrupt.c ---- */
/* While armed, Ctrl-C makes the next engine op fail and raises "interrupted!" in the running Lua code;
 * a second Ctrl-C before that happens kills the process. Arm and disarm in pairs, never nested. */
void interrupt_arm(lua_State *L);
void interrupt_disarm(lua_State *L);

/* ---- repl.c ---- */
/* Runs the prompt until end of input; returns the process exit status. */
int repl_run(lua_State *L);
/* Pushes function `name` of the Lua module pmp.repl; on failure pushes the error and returns nonzero. */
int repl_push_function(lua_State *L, const char *name);

/* ---- line_editor.c ---- */
typedef enum line_status { LINE_READ, LINE_INTERRUPTED, LINE_END } line_status;
void line_editor_open(void);
/* LINE_READ stores a malloc'ed line (without newline) in *line. LINE_INTERRUPTED: Ctrl-C discarded the
 * input. LINE_END: end of input (Ctrl-D) or a terminal error, already reported. */
line_status line_editor_read(const char *prompt, char **line);
/* Adds a complete statement, possibly several lines, to the history and to the history file. */
void line_editor_remember(const char *statement);

/* ---- completion.c ---- */
/* Makes Tab complete Lua names in L's globals through pmp.repl.complete. */
void completion_install(lua_State *L);

#endif
