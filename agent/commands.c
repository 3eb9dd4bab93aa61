/* commands.c - what the agent does for each control-plane command before acknowledging it
 * (the switchover's fence, catch-up and promote are in fence.c and promote.c).
 *
 * Runs in the poller thread. Effects on the proxy go through the master (maintenance, reload)
 * or the agent's event loop (leader and epoch), and each command waits, bounded, until shared
 * memory shows the effect, so that an acknowledgement means it happened.
 */
#include "channel.h"
#include "config_local.h"
#include "control.h"
#include "fence.h"
#include "log.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EFFECT_WAIT_MS 5000 /* how long a command waits to see its effect */
#define STEP_MS        10

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

/* ---- configuration apply ----
 *
 * config_prepare checks a text and keeps it durably in PATH.prepared.VERSION (PATH: the
 * running pgrelay.ini), so that a restart between prepare and commit can still commit it;
 * config_commit replaces PATH with that file's text and reloads; config_abort drops it. The
 * version applied is kept in PATH.version with a digest of its text (config_local.c), so that
 * a restarted proxy reports it and a hand edit is noticed. A proxy
 * whose version is not the deployment's desired one fetches that and applies it the same way
 * (control_config_converge). One lock serialises them: the poller and the reporter may both
 * apply. */

static pthread_mutex_t config_lock = PTHREAD_MUTEX_INITIALIZER;

#define CONFIG_PREPARED_SUFFIX ".prepared."
#define CONFIG_VERSION_SUFFIX  ".version"
#define CONFIG_PATH_MAX        1100

/* Whether write_file could replace path: the file is not read-only (no write permission for
 * anyone: the operator froze it, which even root's rename must respect), and its directory
 * takes the temporary file (created and removed again). The file itself need not be writable
 * by pgrelay's user: it is replaced, not written. */
static int write_file_check(const char *path, char *detail, size_t len)
{
    char tmp[CONFIG_PATH_MAX];
    struct stat st;
    if (stat(path, &st) == 0 && (st.st_mode & (S_IWUSR | S_IWGRP | S_IWOTH)) == 0) {
        snprintf(detail, len, "%s is read-only (mode %04o): the commit would not replace it",
                 path, (unsigned)(st.st_mode & 07777));
        return -1;
    }
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

/* fsync the directory of path, so that a rename in it survives a crash. */
static void sync_dir(const char *path)
{
    char dir[CONFIG_PATH_MAX];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof(dir), ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fsync(fd) != 0)
        log_debug("cannot fsync directory %s: %s", dir, strerror(errno));
    close(fd);
}

/* Replace the file's contents atomically (write aside, fsync, rename, fsync the directory).
 * The new file keeps the old one's group and its permissions without any for others (it
 * holds secrets): 0640 when the old file allowed more. */
static int write_file(const char *path, const char *text, char *detail, size_t len)
{
    char tmp[CONFIG_PATH_MAX];
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
    sync_dir(path);
    return 0;
}

/* A whole file's text (malloc'd), or NULL with errno set. */
static char *read_file(const char *path)
{
    char *text = NULL;
    FILE *f = fopen(path, "re");
    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (text = malloc((size_t)n + 1)) != NULL) {
            size_t got = fread(text, 1, (size_t)n, f);
            text[got] = '\0';
            if (got != (size_t)n) {
                free(text);
                text = NULL;
                errno = EIO;
            }
        }
    }
    fclose(f);
    return text;
}

static void prepared_path(char *out, size_t len, const char *path, int64_t version)
{
    snprintf(out, len, "%s" CONFIG_PREPARED_SUFFIX "%lld", path, (long long)version);
}

/* Remove the prepared files beside path, but the one of version keep (0: all). */
static void prepared_cleanup(const char *path, int64_t keep)
{
    char dir[CONFIG_PATH_MAX], prefix[CONFIG_PATH_MAX], file[CONFIG_PATH_MAX * 2];
    snprintf(dir, sizeof(dir), "%s", path);
    char *slash = strrchr(dir, '/');
    const char *base = path;
    if (slash) {
        *slash = '\0';
        base = path + (slash - dir) + 1;
        if (!dir[0])
            snprintf(dir, sizeof(dir), "/");
    } else {
        snprintf(dir, sizeof(dir), ".");
    }
    snprintf(prefix, sizeof(prefix), "%s" CONFIG_PREPARED_SUFFIX, base);
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    size_t plen = strlen(prefix);
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, plen) != 0)
            continue;
        char *end;
        long long v = strtoll(e->d_name + plen, &end, 10);
        if (*end || end == e->d_name + plen || v == keep)
            continue;
        snprintf(file, sizeof(file), "%s/%s", dir, e->d_name);
        if (unlink(file) == 0)
            log_debug("removed %s", file);
    }
    closedir(d);
}

/* Is text a configuration this proxy can take as version, with its file replaceable? */
static int config_check(const char *text, int64_t version, char *detail, size_t len)
{
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
    rc = write_file_check(cur->path, detail, len);
done:
    free(next);
    free(cur);
    return rc;
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

/* Write text as version into the running file, reload, and remember the version with its
 * digest (config_local.c). */
static int config_install(const char *text, int64_t version, char *detail, size_t len)
{
    char vpath[CONFIG_PATH_MAX], vtext[128], ignored[256];
    config *cur = malloc(sizeof(*cur));
    if (!cur) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    shm_settings_read(control.shm, cur);
    config_local_begin();
    int rc = write_file(cur->path, text, detail, len);
    if (rc == 0)
        rc = reload_and_wait(detail, len);
    if (config_local_end(cur->path, rc == 0 ? version : 0, text, vtext, sizeof(vtext)) == 0) {
        snprintf(vpath, sizeof(vpath), "%s" CONFIG_VERSION_SUFFIX, cur->path);
        if (write_file(vpath, vtext, ignored, sizeof(ignored)) != 0)
            log_warning("control plane: configuration version %lld applied, but %s (after a "
                        "restart this proxy will not claim it)",
                        (long long)version, ignored);
    }
    if (rc == 0) {
        atomic_store(&control.shm->config_version, (uint64_t)version);
        prepared_cleanup(cur->path, 0);
        snprintf(detail, len, "version %lld applied to %s", (long long)version, cur->path);
    }
    free(cur);
    return rc;
}

static int cmd_config_prepare(json_t *args, char *detail, size_t len)
{
    const char *text = arg_str(args, "text");
    int64_t version = arg_int(args, "version", -1);
    char path[CONFIG_PATH_MAX];
    config *cur = malloc(sizeof(*cur));
    int rc = -1;
    if (!cur) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    pthread_mutex_lock(&config_lock);
    if (config_check(text, version, detail, len) != 0)
        goto done;
    /* durable: a restart between prepare and commit still commits this text */
    shm_settings_read(control.shm, cur);
    prepared_path(path, sizeof(path), cur->path, version);
    if (write_file(path, text, detail, len) != 0)
        goto done;
    prepared_cleanup(cur->path, version);
    int64_t edited = config_local_diverged();
    if (edited > 0)
        snprintf(detail, len, "version %lld is valid here, kept in %s; its commit replaces a "
                 "local edit of %s (it no longer matched version %lld)",
                 (long long)version, path, cur->path, (long long)edited);
    else
        snprintf(detail, len, "version %lld is valid here, kept in %s", (long long)version,
                 path);
    rc = 0;
done:
    pthread_mutex_unlock(&config_lock);
    free(cur);
    return rc;
}

static int cmd_config_commit(json_t *args, char *detail, size_t len)
{
    int64_t version = arg_int(args, "version", -1);
    char path[CONFIG_PATH_MAX];
    char *text = NULL;
    int rc = -1;
    config *cur = malloc(sizeof(*cur));
    if (!cur) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    pthread_mutex_lock(&config_lock);
    if (version > 0 && atomic_load(&control.shm->config_version) == (uint64_t)version) {
        snprintf(detail, len, "version %lld is applied here already", (long long)version);
        rc = 0;
        goto done;
    }
    shm_settings_read(control.shm, cur);
    prepared_path(path, sizeof(path), cur->path, version);
    text = version > 0 ? read_file(path) : NULL;
    if (!text) {
        snprintf(detail, len, "version %lld was not prepared here (%s: %s)", (long long)version,
                 path, strerror(errno));
        goto done;
    }
    rc = config_install(text, version, detail, len);
done:
    pthread_mutex_unlock(&config_lock);
    free(text);
    free(cur);
    return rc;
}

static int cmd_config_abort(json_t *args, char *detail, size_t len)
{
    int64_t version = arg_int(args, "version", -1);
    char path[CONFIG_PATH_MAX];
    config *cur = malloc(sizeof(*cur));
    if (!cur) {
        snprintf(detail, len, "out of memory");
        return -1;
    }
    pthread_mutex_lock(&config_lock);
    shm_settings_read(control.shm, cur);
    prepared_path(path, sizeof(path), cur->path, version);
    if (unlink(path) == 0)
        sync_dir(path);
    pthread_mutex_unlock(&config_lock);
    free(cur);
    snprintf(detail, len, "version %lld dropped", (long long)version);
    return 0;
}

int control_config_converge(int64_t version, const char *text, char *detail, size_t len)
{
    int rc = 0;
    pthread_mutex_lock(&config_lock);
    if (atomic_load(&control.shm->config_version) == (uint64_t)version)
        snprintf(detail, len, "version %lld is applied here already", (long long)version);
    else if ((rc = config_check(text, version, detail, len)) == 0)
        rc = config_install(text, version, detail, len);
    pthread_mutex_unlock(&config_lock);
    return rc;
}

void control_config_init(const char *path)
{
    int64_t kept = (int64_t)atomic_load(&control.shm->config_version);
    int64_t v = config_local_init(path, kept);
    if (kept == 0 && v > 0) /* else the master kept it: this is a restarted agent */
        atomic_store(&control.shm->config_version, (uint64_t)v);
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
