/* Stop requests for training loops. A batch scheduler ends a job with SIGTERM and a user with Ctrl-C;
 * killing the process there loses everything since the last checkpoint. While a loop watches, these
 * signals only record that a stop was asked; the loop polls pmp_stop_signal() after each iteration,
 * saves and exits. A SIGINT after a stop was asked still ends the process at once (someone who presses
 * Ctrl-C twice wants out now), as the REPL's handler does. */
#include "internal.h"

#include <signal.h>

static volatile sig_atomic_t received;
static int watching;
static int watched[2];
static struct sigaction before[2];

static void on_stop_signal(int signal_number) {
  if (received && signal_number == SIGINT) {
    signal(SIGINT, SIG_DFL);
    raise(SIGINT);
    return;
  }
  if (!received) received = signal_number;
}

int pmp_stop_signals_watch(int sigterm, int sigint) {
  if (watching) pmp_stop_signals_release();
  received = 0;
  struct sigaction action = {0};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  watched[0] = sigterm ? SIGTERM : 0;
  watched[1] = sigint ? SIGINT : 0;
  for (int k = 0; k < 2; k++)
    if (watched[k] && sigaction(watched[k], &action, &before[k]) != 0)
      return pmp_fail_code("pmp_stop_signals_watch: cannot handle signal %d", watched[k]);
  watching = 1;
  return 0;
}

void pmp_stop_signals_release(void) {
  if (!watching) return;
  for (int k = 0; k < 2; k++)
    if (watched[k]) sigaction(watched[k], &before[k], NULL);
  watching = 0;
}

int pmp_stop_signal(void) { return received; }
