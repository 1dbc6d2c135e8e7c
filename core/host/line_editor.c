/*
 * Line editing at the prompt with GNU readline, through its callback interface: we wait for input
 * ourselves with pselect, which lets Ctrl-C discard the line being typed (readline() would keep it)
 * and keeps signals out of readline's internals. SIGINT and SIGWINCH stay blocked except inside
 * pselect, so a signal can never slip in between checking its flag and waiting.
 */
#include "host.h"

#include <errno.h>
#include <locale.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>

#include <readline/history.h>
#include <readline/readline.h>

/* Lines in the history file, and entries kept in memory. */
enum { HISTORY_LIMIT = 10000 };

static char *history_path; /* NULL without $HOME: history is then kept for this session only */
static bool history_save_failed;

static char *received_line;
static bool line_received;
static volatile sig_atomic_t interrupt_at_prompt;
static volatile sig_atomic_t terminal_resized;

static void note_signal(int signal_number) {
  if (signal_number == SIGINT) interrupt_at_prompt = 1;
  else terminal_resized = 1;
}

static void on_line(char *line) {
  /* Removing the handler here stops readline from printing the next prompt before the statement ran. */
  rl_callback_handler_remove();
  received_line = line;
  line_received = true;
}

/* Multi-line statements stay one history entry: each entry is written after a "#<time>" line and
 * readline joins the lines up to the next one when it reads the file back. */
static void load_history(void) {
  history_write_timestamps = 1;
  history_comment_char = '#';
  history_multiline_entries = 1;
  stifle_history(HISTORY_LIMIT);
  const char *home = getenv("HOME");
  if (!home || !*home) return;
  size_t size = strlen(home) + sizeof "/.pmp_history";
  history_path = malloc(size);
  if (!history_path) return;
  snprintf(history_path, size, "%s/.pmp_history", home);
  int error = read_history(history_path);
  if (error == ENOENT) error = write_history(history_path); /* append_history needs the file to exist */
  else if (error == 0) error = history_truncate_file(history_path, HISTORY_LIMIT);
  if (error != 0) {
    fprintf(stderr, "pmp: history file %s: %s\n", history_path, strerror(error));
    history_save_failed = true;
  }
}

void line_editor_open(void) {
  setlocale(LC_CTYPE, ""); /* multibyte characters in the line */
  rl_readline_name = "pmp"; /* for $if pmp in ~/.inputrc */
  rl_instream = stdin;
  rl_outstream = stdout;
  rl_catch_signals = 0;
  rl_catch_sigwinch = 0;
  load_history();
}

void line_editor_remember(const char *statement) {
  if (statement[strspn(statement, " \t\n")] == '\0') return;
  HIST_ENTRY *previous = history_get(history_base + history_length - 1);
  if (previous && strcmp(previous->line, statement) == 0) return;
  add_history(statement);
  if (!history_path || history_save_failed) return;
  int error = append_history(1, history_path);
  if (error != 0) {
    fprintf(stderr, "pmp: cannot save history to %s: %s\n", history_path, strerror(error));
    history_save_failed = true;
  }
}

static void discard_typed_line(void) {
  rl_echo_signal_char(SIGINT);
  rl_free_line_state();
  rl_callback_sigcleanup();
  rl_callback_handler_remove();
  fputc('\n', rl_outstream);
  fflush(rl_outstream);
}

static line_status wait_for_line(const sigset_t *unblocked_mask) {
  int input_fd = fileno(rl_instream);
  while (!line_received) {
    fd_set readable;
    FD_ZERO(&readable);
    FD_SET(input_fd, &readable);
    if (pselect(input_fd + 1, &readable, NULL, NULL, NULL, unblocked_mask) < 0) {
      if (errno != EINTR) {
        int error = errno;
        rl_callback_handler_remove();
        fprintf(stderr, "\npmp: waiting for terminal input: %s\n", strerror(error));
        return LINE_END;
      }
      if (terminal_resized) {
        terminal_resized = 0;
        rl_resize_terminal();
      }
      if (interrupt_at_prompt) {
        discard_typed_line();
        return LINE_INTERRUPTED;
      }
      continue;
    }
    rl_callback_read_char();
  }
  if (!received_line) {
    fputc('\n', rl_outstream); /* Ctrl-D left the cursor after the prompt */
    return LINE_END;
  }
  return LINE_READ;
}

line_status line_editor_read(const char *prompt, char **line) {
  sigset_t prompt_signals, original_mask, unblocked_mask;
  sigemptyset(&prompt_signals);
  sigaddset(&prompt_signals, SIGINT);
  sigaddset(&prompt_signals, SIGWINCH);
  sigprocmask(SIG_BLOCK, &prompt_signals, &original_mask);
  unblocked_mask = original_mask;
  sigdelset(&unblocked_mask, SIGINT);
  sigdelset(&unblocked_mask, SIGWINCH);
  struct sigaction noting = {0}, sigint_before, sigwinch_before;
  noting.sa_handler = note_signal;
  sigemptyset(&noting.sa_mask);
  sigaction(SIGINT, &noting, &sigint_before);
  sigaction(SIGWINCH, &noting, &sigwinch_before);

  interrupt_at_prompt = 0;
  line_received = false;
  received_line = NULL;
  rl_reset_screen_size(); /* the window may have changed while a statement ran */
  rl_callback_handler_install(prompt, on_line);
  line_status status = wait_for_line(&unblocked_mask);
  *line = received_line;

  /* Unblock before restoring the handlers, so a signal that arrived meanwhile lands in note_signal. */
  sigprocmask(SIG_SETMASK, &original_mask, NULL);
  sigaction(SIGINT, &sigint_before, NULL);
  sigaction(SIGWINCH, &sigwinch_before, NULL);
  return status;
}
