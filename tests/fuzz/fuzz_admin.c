/* fuzz_admin.c - libFuzzer target: the admin console's line parser, commands and renderers,
 * with arbitrary bytes in every field a client fills.
 *
 * Input: byte 0 is the peer's level (mod 4: none, user, operator, admin); then a command line up
 * to the first newline, run as the console runs it; the rest fills the session slots of a fake
 * shared-memory segment (client address, user, database, application_name, node, statement,
 * each as raw bytes that may be unterminated, or as copy_ident stores them), a node's last
 * error and a leader event's reason. Then `show clients`, `show nodes` and `show leader history`
 * run in both forms. Every answer must be valid UTF-8 with no control character but newline,
 * end with an empty line, and each JSON answer must parse, with every column in every row.
 * The master's actions (reload, shutdown, pause, kill, set leader) are stubs that only count.
 */
#include "admin_console.h"
#include "config.h"
#include "log.h"
#include "master.h"
#include "shm.h"
#include "utf8.h"

#include <event2/buffer.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_SLOTS   6
#define FUZZ_WORKERS 2

static master fuzz_master;
static config fuzz_cfg;
static int fuzz_actions;            /* master operations the commands asked for */
static shm_route_table fuzz_routes; /* the table as the configuration gives it */

/* ---- stubs for the master's operations ---- */

int master_reload(master *m, char *msg, size_t msglen)
{
    (void)m;
    fuzz_actions++;
    snprintf(msg, msglen, "configuration reloaded");
    return 0;
}

void master_shutdown(master *m, master_stop how)
{
    (void)m;
    (void)how;
    fuzz_actions++;
}

void master_set_maintenance(master *m, bool on, int timeout_ms)
{
    atomic_store(&m->shm->maintenance, on ? 1 : 0);
    (void)timeout_ms;
    fuzz_actions++;
}

int master_kill_session(master *m, uint64_t id)
{
    (void)m;
    fuzz_actions++;
    return id % 2 ? 0 : -1;
}

int master_set_leader(master *m, int node, bool force)
{
    (void)m;
    (void)node;
    (void)force;
    fuzz_actions++;
    return 0;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_current_level = LOG_LVL_ERROR;
    if (config_load_string(&fuzz_cfg, "fuzz.ini",
                           "[pgrelay]\nlisten_port = 6432\nworkers = 2\n"
                           "[control]\nendpoint = http://127.0.0.1:1\ntoken = secret-token\n"
                           "[node.pg1]\nhost = 127.0.0.1\nport = 5432\nrole = primary\n"
                           "[node.pg2]\nhost = 127.0.0.1\nport = 5433\nrole = replica\n") != 0)
        abort();
    shm_segment *shm = calloc(1, sizeof(shm_segment) + FUZZ_SLOTS * sizeof(shm_session));
    master_child *children = calloc(FUZZ_WORKERS + 1, sizeof(*children));
    if (!shm || !children)
        abort();
    shm->max_sessions = FUZZ_SLOTS;
    shm->n_workers = FUZZ_WORKERS;
    for (int i = 0; i <= FUZZ_WORKERS; i++)
        children[i].pid = 1000 + i;
    fuzz_master.cfg = &fuzz_cfg;
    fuzz_master.shm = shm;
    fuzz_master.children = children;
    fuzz_master.n_workers = FUZZ_WORKERS;
    fuzz_master.n_children = FUZZ_WORKERS + 1;
    fuzz_master.started_us = shm_now_us();
    shm_routes_from_config(&fuzz_routes, &fuzz_cfg, 1); /* resolves: once, not per input */
    return 0;
}

/* ---- reading the input ---- */

typedef struct fuzz_input {
    const uint8_t *p;
    size_t left;
} fuzz_input;

/* Fill a field of cap bytes from the input: a length byte, then that many bytes (at most cap).
 * Bit 7 of the length byte: store it as copy_ident does; else raw, unterminated when full. */
static void fill_field(fuzz_input *in, char *field, size_t cap)
{
    memset(field, 0, cap);
    if (in->left == 0)
        return;
    uint8_t lb = *in->p++;
    in->left--;
    size_t n = lb & 0x7f;
    if (n > in->left)
        n = in->left;
    if (lb & 0x80) {
        char tmp[128 + 1];
        memcpy(tmp, in->p, n);
        tmp[n] = '\0';
        utf8_copy_printable(field, cap, tmp);
        /* what the copy stored is printable UTF-8, cut within the field */
        for (size_t i = 0; field[i]; i++)
            if ((unsigned char)field[i] < 0x20 || field[i] == 0x7f)
                abort();
    } else if (n >= cap) {
        memcpy(field, in->p, cap); /* no terminator at all */
    } else {
        memcpy(field, in->p, n);
    }
    in->p += n;
    in->left -= n;
}

/* ---- checking the answers ---- */

/* Valid UTF-8, no control character but newline, ends with an empty line. */
static void check_answer(const char *text, size_t n)
{
    const uint8_t *p = (const uint8_t *)text;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_decode(p + i, n - i, &cp);
        if (len == 0 || (cp != '\n' && utf8_is_control(cp)))
            abort();
        i += len;
    }
    /* the empty line that ends an answer (an answer without text, as quit's, is just that) */
    if (n > 0 && (text[n - 1] != '\n' || (n > 1 && text[n - 2] != '\n')))
        abort();
}

/* Run a line of len bytes at a level, check the answer, and return it (malloc'd,
 * NUL-terminated). */
static char *run(const char *line, size_t len, admin_level level, size_t *len_out)
{
    admin_session sess = {.level = level};
    struct evbuffer *out = evbuffer_new();
    char *copy = malloc(len + 1);
    if (!out || !copy)
        abort();
    memcpy(copy, line, len + 1);
    admin_run_line(&fuzz_master, &sess, copy, len, out);
    size_t n = evbuffer_get_length(out);
    char *text = malloc(n + 1);
    if (!text)
        abort();
    evbuffer_remove(out, text, n);
    text[n] = '\0';
    check_answer(text, n);
    evbuffer_free(out);
    free(copy);
    *len_out = n;
    return text;
}

/* A JSON answer parses as an array whose rows all have the columns listed. */
static void check_json_rows(const char *line, const char *const *columns)
{
    size_t n;
    char *text = run(line, strlen(line), ADMIN_LEVEL_ADMIN, &n);
    json_error_t err;
    json_t *rows = json_loadb(text, n, 0, &err);
    if (!rows || !json_is_array(rows))
        abort();
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        for (const char *const *c = columns; *c; c++)
            if (!json_object_get(row, *c))
                abort();
    }
    json_decref(rows);
    free(text);
}

static const char *const client_columns[] = {
    "id",   "worker", "client", "user",        "database",     "application_name",
    "port", "node",   "state",  "connected_s", "statement_ms", "statement",
    NULL};
static const char *const node_columns[] = {"name", "last_error", NULL};
static const char *const history_columns[] = {"time", "from", "to", "reason", NULL};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    admin_level level = (admin_level)((int)(data[0] & 3) - 1);
    const uint8_t *line_start = data + 1;
    const uint8_t *nl = memchr(line_start, '\n', size - 1);
    size_t line_len = nl ? (size_t)(nl - line_start) : size - 1;
    if (line_len > ADMIN_LINE_MAX)
        return 0;
    char *line = malloc(line_len + 1);
    if (!line)
        return 0;
    memcpy(line, line_start, line_len);
    line[line_len] = '\0';
    fuzz_input in = {.p = line_start + line_len + (nl ? 1 : 0),
                     .left = size - 1 - line_len - (nl ? 1 : 0)};

    /* The segment as the workers and the agent might have left it. */
    shm_segment *shm = fuzz_master.shm;
    memset(shm->sessions, 0, FUZZ_SLOTS * sizeof(shm_session));
    shm_route_table tab = fuzz_routes;
    for (uint32_t i = 0; i < tab.n_nodes; i++)
        fill_field(&in, tab.nodes[i].last_error, sizeof(tab.nodes[i].last_error));
    shm_routes_publish(shm, &tab);
    atomic_store(&shm->history_count, 1);
    fill_field(&in, shm->history[0].reason, sizeof(shm->history[0].reason));
    for (uint32_t i = 0; i < FUZZ_SLOTS && in.left > 0; i++) {
        shm_session *s = &shm->sessions[i];
        uint8_t flags = *in.p++;
        in.left--;
        atomic_store(&s->state, (uint32_t)(1 + flags % 4)); /* startup .. in transaction */
        s->id = i + 1;
        s->worker = (int32_t)(flags >> 4) % FUZZ_WORKERS;
        s->connected_at_us = shm_now_us() - (int64_t)flags * 1000000;
        s->stmt_start_us = flags & 8 ? shm_now_us() : 0;
        fill_field(&in, s->client_addr, sizeof(s->client_addr));
        fill_field(&in, s->user, sizeof(s->user));
        fill_field(&in, s->database, sizeof(s->database));
        fill_field(&in, s->application_name, sizeof(s->application_name));
        fill_field(&in, s->node_name, sizeof(s->node_name));
        fill_field(&in, s->stmt, sizeof(s->stmt));
    }

    size_t n;
    static const char show_user[] = "show clients";
    static const char show_all[] = "show clients; show nodes; show leader history; show info";
    free(run(line, line_len, level, &n)); /* NUL bytes in it included */
    free(run(show_user, strlen(show_user), ADMIN_LEVEL_USER, &n));
    free(run(show_all, strlen(show_all), ADMIN_LEVEL_ADMIN, &n));
    check_json_rows("show clients json", client_columns);
    check_json_rows("show nodes json", node_columns);
    check_json_rows("show leader history json", history_columns);
    atomic_store(&shm->maintenance, 0);
    free(line);
    return 0;
}
