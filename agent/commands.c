/* commands.c - what the agent does for each control-plane command before acknowledging it
 * (the switchover's fence, catch-up and promote are in fence.c and promote.c).
 *
 * Runs in the poller thread. Effects on the proxy go through the master (maintenance, reload)
 * or the agent's event loop (leader and epoch), and each command waits, bounded, until shared
 * memory shows the effect, so that an acknowledgement means it happened.
 */
#include "channel.h"
#include "control.h"
#include "fence.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EFFECT_WAIT_MS 5000 /* how long a command waits to see its effect */
#define STEP_MS        10

/* The configuration prepared by config_prepare, waiting for commit or abort. */
static struct {
    uint64_t version;
    char *text;
} prepared;

static void nap(void)
{
    struct timespec ts = {0, STEP_MS * 1000000L};
    nanosleep(&ts, NULL);
}

static int64_t arg_int(json_t *args, const char *key, int64_t def)
{
    json_t *v = json_object_get(args, key);
    return json_is_integer(v) ? json_integer_value(v) : def;
}

static const char *arg_str(json_t *args, const char *key)
{
    json_t *v = json_object_get(args, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int cmd_maintenance(json_t *args, char *detail, size_t len)
{
    json_t *on_j = json_object_get(args, "on");
    if (!json_is_boolean(on_j)) {
        snprintf(detail, len, "args.on must be true or false");
        return -1;
    }
    bool on = json_is_true(on_j);
    int64_t timeout_ms = arg_int(args, "resume_after_s", 0) * 1000;
    int64_t until_ms = arg_int(args, "until_ms", 0);
    if (on && until_ms > 0) {
        /* A pause with an end (the dead-man time): it ends at whichever comes first of the
         * delay and the wall-clock time, so a late delivery does not pause past the end. */
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int64_t left = until_ms - ((int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000);
        if (left <= 0) {
            snprintf(detail, len, "not pausing: the pause's end time has passed");
            return -1;
        }
        if (timeout_ms <= 0 || left < timeout_ms)
            timeout_ms = left;
    }
    uint64_t arg = (on ? 1u : 0u) | ((uint64_t)(timeout_ms > 0 ? timeout_ms : 0) << 1);
    if (channel_send(control.master_fd, CHANNEL_MAINTENANCE, arg) != 0) {
        snprintf(detail, len, "cannot reach the pgrelay master");
        return -1;
    }
    for (int waited = 0; waited < EFFECT_WAIT_MS; waited += STEP_MS) {
        if ((atomic_load(&control.shm->maintenance) != 0) == on) {
            if (on && timeout_ms > 0) {
                snprintf(detail, len, "maintenance on, resuming by itself in %lld ms",
                         (long long)timeout_ms);
                if (json_is_true(json_object_get(args, "renewal")))
                    log_debug("control plane: pause renewed, ends by itself in %lld ms unless "
                              "resumed", (long long)timeout_ms);
                else
                    log_info("control plane: pause ends by itself in %lld ms unless resumed",
                             (long long)timeout_ms);
            } else {
                snprintf(detail, len, "maintenance %s", on ? "on" : "off");
            }
            return 0;
        }
        nap();
    }
    snprintf(detail, len, "maintenance did not turn %s in time", on ? "on" : "off");
    return -1;
}

static int cmd_set_leader(json_t *args, char *detail, size_t len)
{
    const char *leader = arg_str(args, "leader");
    int64_t epoch = arg_int(args, "epoch", -1);
    if (!leader || !control_epoch_valid(json_object_get(args, "epoch"))) {
        snprintf(detail, len,
                 "args need leader (string) and epoch (a whole number from 0 to 2^53)");
        return -1;
    }
    control_send_leader(leader, (uint64_t)epoch);
    shm_route_table *t = malloc(sizeof(*t));
    if (!t) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    int rc = -1;
    for (int waited = 0; waited < EFFECT_WAIT_MS; waited += STEP_MS) {
        shm_routes_read(control.shm, t);
        if (t->epoch >= (uint64_t)epoch && t->leader >= 0 &&
            strcmp(t->nodes[t->leader].name, leader) == 0) {
            snprintf(detail, len, "routing to %s, epoch %llu", leader,
                     (unsigned long long)t->epoch);
            rc = 0;
            goto done;
        }
        nap();
    }
    /* Say why: the agent refuses a leader it sees in recovery or does not know. */
    snprintf(detail, len, "not routing to %s: unknown here or in recovery as this proxy sees it "
             "(epoch %llu, leader %s)", leader, (unsigned long long)t->epoch,
             t->leader >= 0 ? t->nodes[t->leader].name : "none");
done:
    free(t);
    return rc;
}

/* Whether write_file could replace path: create its temporary file and remove it again. */
static int write_file_check(const char *path, char *detail, size_t len)
{
    char tmp[1100];
    snprintf(tmp, sizeof(tmp), "%s.pgrelay-new", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0) {
        snprintf(detail, len, "cannot write %s: %s (the directory must be writable by the user "
                 "pgrelay runs as)", tmp, strerror(errno));
        return -1;
    }
    close(fd);
    unlink(tmp);
    return 0;
}

static int cmd_config_prepare(json_t *args, char *detail, size_t len)
{
    const char *text = arg_str(args, "text");
    int64_t version = arg_int(args, "version", -1);
    config *next = malloc(sizeof(*next)), *cur = malloc(sizeof(*cur));
    int rc = -1;
    char name[64];
    if (!text || version <= 0 || !next || !cur) {
        snprintf(detail, len, "%s", next && cur ? "args need text and version" : "out of memory");
        goto done;
    }
    snprintf(name, sizeof(name), "config-v%lld", (long long)version);
    if (config_load_string(next, name, text) > 0) {
        size_t off = (size_t)snprintf(detail, len, "invalid:");
        for (int i = 0; i < next->n_errors && i < 3 && off < len; i++)
            off += (size_t)snprintf(detail + off, len - off, " %s;", next->errors[i]);
        goto done;
    }
    /* Keys that need a restart must stay as they run now. */
    shm_settings_read(control.shm, cur);
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        char was[1100], now[1100];
        if (k->reloadable ||
            (strcmp(k->section, "pgrelay") != 0 && strcmp(k->section, "control") != 0))
            continue;
        config_format_value(cur, k, cur, was, sizeof(was));
        config_format_value(next, k, next, now, sizeof(now));
        if (strcmp(was, now) != 0 && strcmp(k->name, "workers") != 0) {
            if (config_key_is_secret(k)) /* never its value */
                snprintf(detail, len, "[%s] %s would change, which needs a restart",
                         k->section, k->name);
            else
                snprintf(detail, len, "%s would change from %s to %s, which needs a restart",
                         k->name, was, now);
            goto done;
        }
    }
    int capacity = shm_client_capacity(control.shm);
    if (next->max_client_conn > capacity) {
        snprintf(detail, len, "max_client_conn would change from %d to %d, more than the %d "
                 "session slots made at start, which needs a restart", cur->max_client_conn,
                 next->max_client_conn, capacity);
        goto done;
    }
    /* The commit writes beside the running file: find out now whether it can. */
    if (write_file_check(cur->path, detail, len) != 0)
        goto done;
    free(prepared.text);
    prepared.text = strdup(text);
    prepared.version = (uint64_t)version;
    snprintf(detail, len, "version %lld is valid here", (long long)version);
    rc = prepared.text ? 0 : -1;
done:
    free(next);
    free(cur);
    return rc;
}

/* Replace the file's contents atomically (write aside, fsync, rename). The new file keeps the
 * old one's group and its permissions without any for others (it holds secrets): 0640 when
 * the old file allowed more. */
static int write_file(const char *path, const char *text, char *detail, size_t len)
{
    char tmp[1100];
    struct stat st;
    snprintf(tmp, sizeof(tmp), "%s.pgrelay-new", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0) {
        snprintf(detail, len, "cannot write %s: %s", tmp, strerror(errno));
        return -1;
    }
    if (stat(path, &st) == 0) {
        if (fchown(fd, (uid_t)-1, st.st_gid) != 0)
            log_debug("cannot keep group %u on %s: %s", (unsigned)st.st_gid, tmp, strerror(errno));
        if (fchmod(fd, st.st_mode & 0660) != 0)
            log_debug("cannot set the mode of %s: %s", tmp, strerror(errno));
    }
    size_t n = strlen(text), off = 0;
    while (off < n) {
        ssize_t w = write(fd, text + off, n - off);
        if (w < 0) {
            snprintf(detail, len, "cannot write %s: %s", tmp, strerror(errno));
            close(fd);
            unlink(tmp);
            return -1;
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0 || rename(tmp, path) != 0) {
        snprintf(detail, len, "cannot replace %s: %s", path, strerror(errno));
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Ask the master to reload and wait until it did. */
static int reload_and_wait(char *detail, size_t len)
{
    uint64_t before = atomic_load(&control.shm->reloads);
    if (channel_send(control.master_fd, CHANNEL_RELOAD, 0) != 0) {
        snprintf(detail, len, "cannot reach the pgrelay master");
        return -1;
    }
    for (int waited = 0; waited < EFFECT_WAIT_MS; waited += STEP_MS) {
        if (atomic_load(&control.shm->reloads) != before)
            return 0;
        nap();
    }
    snprintf(detail, len, "the master did not reload in time (is the file valid?)");
    return -1;
}

static int cmd_config_commit(json_t *args, char *detail, size_t len)
{
    int64_t version = arg_int(args, "version", -1);
    if (!prepared.text || prepared.version != (uint64_t)version) {
        snprintf(detail, len, "version %lld was not prepared here", (long long)version);
        return -1;
    }
    config *cur = malloc(sizeof(*cur));
    if (!cur) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    shm_settings_read(control.shm, cur);
    int rc = write_file(cur->path, prepared.text, detail, len);
    if (rc == 0)
        rc = reload_and_wait(detail, len);
    if (rc == 0) {
        atomic_store(&control.shm->config_version, (uint64_t)version);
        snprintf(detail, len, "version %lld applied to %s", (long long)version, cur->path);
        free(prepared.text);
        prepared.text = NULL;
    }
    free(cur);
    return rc;
}

static int cmd_config_abort(json_t *args, char *detail, size_t len)
{
    int64_t version = arg_int(args, "version", -1);
    if (prepared.text && prepared.version == (uint64_t)version) {
        free(prepared.text);
        prepared.text = NULL;
    }
    snprintf(detail, len, "version %lld dropped", (long long)version);
    return 0;
}

static int cmd_reload(json_t *args, char *detail, size_t len)
{
    (void)args;
    if (reload_and_wait(detail, len) != 0)
        return -1;
    snprintf(detail, len, "reloaded");
    return 0;
}

typedef struct command_entry {
    const char *type;
    int (*run)(json_t *args, char *detail, size_t len);
} command_entry;

static const command_entry commands[] = {
    {"maintenance", cmd_maintenance},       {"set_leader", cmd_set_leader},
    {"fence", fence_command},               {"unfence", fence_unfence_command},
    {"catch_up", promote_catch_up_command}, {"promote", promote_command},
    {"config_prepare", cmd_config_prepare}, {"config_commit", cmd_config_commit},
    {"config_abort", cmd_config_abort},     {"reload", cmd_reload},
};

int control_run_command(const char *type, json_t *args, char *detail, size_t len)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (strcmp(commands[i].type, type) == 0)
            return commands[i].run(args, detail, len);
    snprintf(detail, len, "unknown command type \"%s\"", type);
    return -1;
}
