/*
 * pmp: LuaJIT with the pmp engine linked in and the `pmp` library preloaded.
 * The command line follows the luajit interpreter's, so scripts and tools written for it (busted's
 * standalone runner, for one) find `arg` and `...` where they expect them.
 */
#include "host.h"

#include <sched.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lauxlib.h>
#include <luajit.h>

#include "pmp.h"

typedef struct command_line {
  int argc;
  char **argv;
  int script_index;       /* argv index of the script, argc when there is none */
  bool script_from_stdin; /* the script is "-" */
  bool interactive;       /* -i: the prompt after the script */
  bool has_statements;    /* at least one -e */
  bool show_version;
  bool show_help;
} command_line;

static void print_usage(FILE *out) {
  fputs("usage: pmp [options] [script [args...]]\n"
        "Runs a Lua script with the pmp library preloaded as the global `pmp`; without a script,\n"
        "starts the interactive prompt (or runs stdin when it is not a terminal).\n"
        "  -e code        run the Lua code (may repeat; pmp then exits unless -i)\n"
        "  -l name        require module name into the global name\n"
        "  -i             start the interactive prompt after the script\n"
        "  -v, --version  print the version and exit\n"
        "  -h, --help     print this help and exit\n"
        "  --             stop handling options\n"
        "  -              read the script from stdin\n"
        "Environment:\n"
        "  PMP_PATH       project root holding lua/ and models/ (default: the directory of pmp)\n"
        "  PMP_TRACEBACK  1: follow an uncaught error's one-line message with the Lua stack\n",
        out);
}

/* An option that takes a value accepts it attached (-eCODE) or as the next argument. */
static bool has_value(const command_line *cmd, int i) {
  return cmd->argv[i][2] != '\0' || i + 1 < cmd->argc;
}

/* Finds the script and the flags; returns -1 (after printing why) on a malformed command line. */
static int parse_command_line(command_line *cmd) {
  int i = 1;
  for (; i < cmd->argc; i++) {
    const char *option = cmd->argv[i];
    if (option[0] != '-') break;
    if (strcmp(option, "-") == 0) {
      cmd->script_from_stdin = true;
      break;
    }
    if (strcmp(option, "--") == 0) {
      i++;
      break;
    }
    if (strcmp(option, "--version") == 0 || strcmp(option, "-v") == 0) cmd->show_version = true;
    else if (strcmp(option, "--help") == 0 || strcmp(option, "-h") == 0) cmd->show_help = true;
    else if (strcmp(option, "-i") == 0) cmd->interactive = true;
    else if ((option[1] == 'e' || option[1] == 'l') && has_value(cmd, i)) {
      cmd->has_statements = cmd->has_statements || option[1] == 'e';
      if (option[2] == '\0') i++;
    } else {
      fprintf(stderr, "pmp: unrecognized option or missing value: '%s'\n", option);
      print_usage(stderr);
      return -1;
    }
  }
  cmd->script_index = i;
  return 0;
}

/* arg[0] is the script, arg[1..] its arguments, arg[-1..] the interpreter and its options (as luajit). */
static void set_arg_table(lua_State *L, const command_line *cmd) {
  lua_createtable(L, cmd->argc - cmd->script_index, cmd->script_index);
  for (int i = 0; i < cmd->argc; i++) {
    lua_pushstring(L, cmd->argv[i]);
    lua_rawseti(L, -2, i - cmd->script_index);
  }
  lua_setglobal(L, "arg");
}

static int run_loaded_chunk(lua_State *L, int nargs) {
  if (runtime_call(L, nargs, 0) != 0) {
    runtime_report_error(L);
    return 1;
  }
  return 0;
}

static int run_code(lua_State *L, const char *code) {
  if (luaL_loadbuffer(L, code, strlen(code), "=(command line)") != 0) {
    runtime_report_error(L);
    return 1;
  }
  return run_loaded_chunk(L, 0);
}

static int require_into_global(lua_State *L, const char *name) {
  lua_getglobal(L, "require");
  lua_pushstring(L, name);
  if (runtime_call(L, 1, 1) != 0) {
    runtime_report_error(L);
    return 1;
  }
  lua_setglobal(L, name);
  return 0;
}

/* Runs the -e and -l options in the order given. */
static int run_options(lua_State *L, const command_line *cmd) {
  for (int i = 1; i < cmd->script_index; i++) {
    const char *option = cmd->argv[i];
    if (strcmp(option, "--") == 0) break;
    if (option[0] != '-' || (option[1] != 'e' && option[1] != 'l')) continue;
    const char *value = option[2] ? option + 2 : cmd->argv[++i];
    int status = option[1] == 'e' ? run_code(L, value) : require_into_global(L, value);
    if (status != 0) return status;
  }
  return 0;
}

/* A NULL path reads the script from stdin. The script's arguments are also its `...`. */
static int run_script(lua_State *L, const command_line *cmd, const char *path) {
  if (luaL_loadfile(L, path) != 0) {
    runtime_report_error(L);
    return 1;
  }
  int first_argument = cmd->script_index + 1;
  int nargs = cmd->argc > first_argument ? cmd->argc - first_argument : 0;
  luaL_checkstack(L, nargs, "too many script arguments");
  for (int i = 0; i < nargs; i++) lua_pushstring(L, cmd->argv[first_argument + i]);
  return run_loaded_chunk(L, nargs);
}

static int run(lua_State *L, const command_line *cmd) {
  set_arg_table(L, cmd);
  int status = run_options(L, cmd);
  if (status != 0) return status;
  bool has_script = cmd->script_index < cmd->argc;
  if (has_script) {
    status = run_script(L, cmd, cmd->script_from_stdin ? NULL : cmd->argv[cmd->script_index]);
    if (status != 0) return status;
  }
  if (cmd->interactive) return repl_run(L);
  if (has_script || cmd->has_statements) return 0;
  if (isatty(STDIN_FILENO)) return repl_run(L);
  return run_script(L, cmd, NULL);
}

/*
 * OpenMP worker threads spin after each parallel region before they sleep (GOMP_SPINCOUNT pause loops,
 * about 20 ns each on current x86). Waking a sleeping worker costs each of a step's GEMMs 10-15% on a
 * small model, so when every thread has a core of its own they spin for about 2 ms (100000). When the
 * cores are shared (several MPI ranks, or other processes running when we start) spinning starves the
 * thread doing the work: with one busy process beside it on 2 cores, a small-model training loop ran 3x
 * slower at 100000 than at 1000 (14x slower at libgomp's own default once), so then they spin briefly
 * (1000). libgomp reads the setting only when it loads, before main: we set it and re-execute ourselves
 * once. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left alone.
 */
static long env_number(const char *name, long fallback) {
  const char *text = getenv(name);
  long value = text ? strtol(text, NULL, 10) : 0;
  return value > 0 ? value : fallback;
}

/* Tasks running or waiting for a core right now besides us (the kernel's count of runnable tasks). */
static long others_running(void) {
  FILE *f = fopen("/proc/loadavg", "r");
  long running = 1;
  if (f) {
    if (fscanf(f, "%*f %*f %*f %ld", &running) != 1) running = 1;
    fclose(f);
  }
  return running > 1 ? running - 1 : 0;
}

static bool cores_are_shared(void) {
  cpu_set_t set;
  long cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
  if (cpus < 1) cpus = 1;
  long ranks = env_number("OMPI_COMM_WORLD_LOCAL_SIZE", env_number("SLURM_NTASKS_PER_NODE", 1));
  /* without OMP_NUM_THREADS each rank takes its share of the cores (pmp.dist) */
  long threads = env_number("OMP_NUM_THREADS", cpus / ranks > 0 ? cpus / ranks : 1);
  return ranks * threads + others_running() > cpus;
}

static void choose_openmp_spin(char **argv) {
  if (getenv("GOMP_SPINCOUNT") || getenv("OMP_WAIT_POLICY")) return;
  setenv("GOMP_SPINCOUNT", cores_are_shared() ? "1000" : "100000", 1);
  execv("/proc/self/exe", argv);
  /* exec failed: carry on with libgomp's default policy */
}

int main(int argc, char **argv) {
  choose_openmp_spin(argv);
  /* Training logs are read through pipes and files while the run goes on: flush them per line. */
  setvbuf(stdout, NULL, _IOLBF, 0);
  command_line cmd = {.argc = argc, .argv = argv};
  if (parse_command_line(&cmd) != 0) return 1;
  if (cmd.show_help) {
    print_usage(stdout);
    return 0;
  }
  if (cmd.show_version) {
    printf("pmp %s (%s)\n", pmp_version(), LUAJIT_VERSION);
    return 0;
  }
  lua_State *L = runtime_open();
  if (!L) return 1;
  int status = run(L, &cmd);
  lua_close(L);
  /* A failed rank leaves MPI without finalizing: the launcher then ends the whole job instead of the
   * other ranks waiting for it. */
  if (status == 0) pmp_dist_finalize();
  return status;
}
