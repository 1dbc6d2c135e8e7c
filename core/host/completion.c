/*
 * Tab completion: readline hands us the word before the cursor; pmp.repl.complete (Lua) returns the
 * full replacement candidates, e.g. "pmp.zeros" for "pmp.ze" or "x:sum" for "x:su".
 */
#include "host.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <readline/readline.h>

/* readline's completion hooks take no context pointer. */
static lua_State *completion_state;

/* The candidates of the current completion, handed to readline one by one (it frees them). */
static char **candidates;
static size_t candidate_count, candidates_handed_out;

/* '.' and ':' are not word breaks: the whole expression `pmp.nn.Li` or `x:su` reaches Lua. */
static const char lua_word_breaks[] = " \t\n\"'`@$><=;|&{}()[],+-*/%^~#";

static void forget_candidates(void) {
  for (size_t i = candidates_handed_out; i < candidate_count; i++) free(candidates[i]);
  free(candidates);
  candidates = NULL;
  candidate_count = candidates_handed_out = 0;
}

static void report_completion_error(lua_State *L) {
  fprintf(stderr, "\npmp: tab completion failed: %s\n", lua_tostring(L, -1));
  lua_pop(L, 1);
  rl_on_new_line(); /* redraw the prompt and the line below the message */
}

/* Calls pmp.repl.complete and copies the strings of the list it returns into `candidates`. */
static void collect_candidates(lua_State *L, const char *text) {
  int top = lua_gettop(L);
  if (repl_push_function(L, "complete") != 0) {
    report_completion_error(L);
    return;
  }
  lua_pushstring(L, text);
  lua_pushstring(L, rl_line_buffer);
  lua_pushinteger(L, rl_point);
  if (runtime_call(L, 3, 1) != 0) {
    report_completion_error(L);
    return;
  }
  size_t listed = lua_istable(L, -1) ? lua_objlen(L, -1) : 0;
  candidates = calloc(listed ? listed : 1, sizeof *candidates);
  for (size_t i = 1; candidates && i <= listed; i++) {
    lua_rawgeti(L, -1, (int)i);
    const char *candidate = lua_tostring(L, -1);
    if (candidate && (candidates[candidate_count] = strdup(candidate))) candidate_count++;
    lua_pop(L, 1);
  }
  lua_settop(L, top);
}

static char *hand_out_candidate(const char *text, int state) {
  (void)text;
  (void)state;
  return candidates_handed_out < candidate_count ? candidates[candidates_handed_out++] : NULL;
}

static char **complete_word(const char *text, int start, int end) {
  (void)start;
  (void)end;
  rl_attempted_completion_over = 1; /* no file-name completion when Lua finds nothing */
  /* readline resets this before each completion; none lets the user go on with '.', ':' or '('. */
  rl_completion_append_character = '\0';
  forget_candidates();
  collect_candidates(completion_state, text);
  char **matches = candidate_count ? rl_completion_matches(text, hand_out_candidate) : NULL;
  forget_candidates();
  return matches;
}

void completion_install(lua_State *L) {
  completion_state = L;
  rl_attempted_completion_function = complete_word;
  rl_completer_word_break_characters = lua_word_breaks;
  rl_basic_word_break_characters = lua_word_breaks;
}
