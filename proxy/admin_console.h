/* admin_console.h - what the admin console's socket, commands and renderers share. */
#ifndef PGRELAY_ADMIN_CONSOLE_H
#define PGRELAY_ADMIN_CONSOLE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct evbuffer;
struct master;

#define ADMIN_LINE_MAX 4096 /* longest command line accepted */

/* What a peer may do, from its uid (admin_users, operator_users, stats_users). */
typedef enum admin_level {
    ADMIN_LEVEL_NONE = -1, /* not allowed on the socket */
    ADMIN_LEVEL_USER = 0,  /* show commands; statement text hidden (stats_users) */
    ADMIN_LEVEL_OPERATOR,  /* + set leader, pause, resume, kill; statement text shown */
    ADMIN_LEVEL_ADMIN,     /* + reload, shutdown */
} admin_level;

/* One peer's console state, kept by the connection and changed by the commands it runs. */
typedef struct admin_session {
    admin_level level;  /* what the peer may run */
    bool interactive;   /* `prompt` was given: stay open, print a prompt */
    bool closing;       /* close once the output is written (`quit`, or a refused peer) */
    bool waiting;       /* `pause wait` answers later: call admin_wait_poll until it is done */
    int64_t wait_started_us; /* when `pause wait` began (shm_mono_us) */
    int64_t wait_until_us;   /* when `pause wait` gives up, 0 = never */
} admin_session;

/* "user", "operator", "admin", or "none". */
const char *admin_level_name(admin_level level);

/* Run one line of ';'-separated commands (len bytes, NUL-terminated after them) for sess,
 * appending every answer (each ends with an empty line) to out. line is modified. A refused
 * peer (ADMIN_LEVEL_NONE) gets one error and sess->closing; a line that is not UTF-8 text or
 * holds a control character (a NUL too) gets one error and runs nothing. */
void admin_run_line(struct master *m, admin_session *sess, char *line, size_t len,
                    struct evbuffer *out);

/* For a session left waiting by `pause wait`: once every worker follows the pause and no
 * session is running a statement or inside a transaction (or the wait timed out, or a resume
 * ended the pause), append the answer and its empty line to out, clear sess->waiting and
 * return true; otherwise false. */
bool admin_wait_poll(struct master *m, admin_session *sess, struct evbuffer *out);

/* A command's JSON result as text: an array of objects as a table, an object as "key  value"
 * lines followed by its arrays as tables. No control character of any string reaches out. */
void admin_render(struct evbuffer *out, json_t *result);

/* Text from a fixed field that a client filled (cap bytes, NUL-terminated or not) as a JSON
 * string that is valid UTF-8 whatever the bytes; with max_chars > 3, cut to that many
 * characters ending in "...". Never NULL. */
json_t *admin_json_text(const char *field, size_t cap, size_t max_chars);

#endif
