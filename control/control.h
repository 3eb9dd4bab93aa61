/* control.h - pgrelay-control's process-wide context: the event base, the settings, the clocks. */
#ifndef PGRELAY_CONTROL_H
#define PGRELAY_CONTROL_H

#include "cconfig.h"

#include <stdbool.h>
#include <stdint.h>

struct event_base;

/* Everything the modules share; owned by main.c. */
typedef struct control_ctx {
    struct event_base *base; /* the one event loop */
    cconfig *cfg;            /* settings in force; replaced as a whole by a reload */
    bool active;             /* durable state is loaded and this replica acts on it */
    bool stopping;           /* SIGTERM/SIGINT seen: finishing up */
    char identity[256];      /* this replica's name in the lease: host_pid_random */
} control_ctx;

extern control_ctx control;

/* Wall-clock milliseconds since the epoch (timestamps shown to users, liveness). */
int64_t control_now_ms(void);

/* Monotonic milliseconds (lease validity, rates). */
int64_t control_mono_ms(void);

/* Lower-case hex SHA-256 of a token (65 bytes with the NUL). */
#define CONTROL_SHA256_HEX_LEN 65
void control_sha256_hex(const char *text, char out[CONTROL_SHA256_HEX_LEN]);

/* Constant-time comparison of two equally long strings (token digests). */
bool control_digest_equal(const char *a, const char *b);

#endif
