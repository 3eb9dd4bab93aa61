/* config_apply.c - the configuration apply, all or none: prepare on every live proxy, then
 * commit on exactly the proxies that prepared, or roll back on all of them; the deployment's
 * desired version, which a proxy that missed a commit converges to.
 *
 * An apply is a durable operation (pgrelay.operations, kind "config"): its version, the set of
 * proxies it was prepared on and its prepare command are recorded before anything is sent.
 * The decision is one store write (the version committed and the operation at its commit
 * step, or the version deleted and the operation rolled back). The operator's answer lists
 * every proxy's outcome: "done" when every proxy of the set committed, "committed" when the
 * version is the deployment's but some have not acknowledged it yet ("pending": they converge
 * to it). A committed operation is watched (config_watch) until each pending proxy reports
 * the version, and its record is "done" when the last one does. A replica that crashes, stops or
 * loses the lease mid-apply leaves the record to the next lease holder, which commits when every
 * proxy of the set had prepared and rolls back otherwise (config_recover). A proxy that was away
 * learns the desired version from its metrics or poll answer and fetches it (GET
 * /api/v1/agent/config).
 */
#include "agents.h"
#include "control.h"
#include "log.h"
#include "operator_internal.h"
#include "store.h"
#include "store_queue.h"
#include "store_worker.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONFIG_TEXT_MAX      (1024 * 1024) /* longest pgrelay.ini text accepted */
#define CONFIG_COMMIT_MIN_MS 5000 /* the commit step gets at least this long, whatever is left */
#define CONFIG_WATCH_MS      1000 /* how often a committed version's pending proxies are seen to */
/* an outcome: its head, pending and settled parts */
#define CONFIG_OUTCOME_MAX (4 * OPERATOR_DETAIL_MAX)
/* The fault-injection tests' hook (as switchover.c's): an apply whose prepare step is done
 * holds there, before the commit decision, for PGRELAY_CONTROL_TEST_HOLD_MS (default: until
 * its deadline, then it rolls back). Never set it in production. */
#define CONFIG_TEST_HOLD_ENV    "PGRELAY_CONTROL_TEST_HOLD"
#define CONFIG_TEST_HOLD_MS_ENV "PGRELAY_CONTROL_TEST_HOLD_MS"

/* The node ids of targets as a JSON array's text (malloc'd), or NULL. */
static char *config_targets_json(state_proxy *const *targets, int n)
{
    json_t *list = json_array();
    for (int i = 0; list && i < n; i++)
        json_array_append_new(list, json_string(targets[i]->node_id));
    char *text = list ? json_dumps(list, JSON_COMPACT) : NULL;
    json_decref(list);
    return text;
}

/* The proxies named by a JSON array of node ids that this replica knows (malloc'd, *n of
 * them; NULL with *n 0 when none or out of memory). */
static state_proxy **config_find_targets(state_deployment *dep, json_t *ids, int *n)
{
    size_t i;
    json_t *id;
    state_proxy **list = malloc((json_array_size(ids) + 1) * sizeof(*list));
    *n = 0;
    if (!list)
        return NULL;
    json_array_foreach(ids, i, id)
    {
        state_proxy *p = json_is_string(id) ? state_find_proxy(dep, json_string_value(id)) : NULL;
        if (p)
            list[(*n)++] = p;
    }
    return list;
}

/* The current step's targets as a JSON array of node ids (new reference). */
static json_t *config_op_target_ids(const operator_op *op)
{
    json_t *ids = json_array();
    for (int i = 0; ids && i < op->n_targets; i++)
        json_array_append_new(ids, json_string(op->targets[i].node_id));
    return ids;
}

/* Queue a command (args stolen) nobody waits for to the proxies of ids, and wake them. */
static void config_fire(state_deployment *dep, json_t *ids, const char *type, json_t *args)
{
    int n = 0;
    state_proxy **targets = config_find_targets(dep, ids, &n);
    store_queue_command(dep, type, args, targets, n, NULL, NULL);
    free(targets);
}

static json_t *config_version_args(int64_t version, int64_t op_id)
{
    return json_pack("{s:I, s:I}", "version", (json_int_t)version, "operation", (json_int_t)op_id);
}

/* The configuration version whose file p's agent found edited by hand (its last metrics
 * report's config_diverged), or 0. */
static int64_t config_diverged(const state_proxy *p)
{
    json_t *v = json_object_get(p->last_metrics, "config_diverged");
    return json_is_integer(v) ? json_integer_value(v) : 0;
}

/* ---- committed, not yet everywhere ----
 *
 * A version committed while some proxies of its set had not acknowledged it is watched: each
 * pending proxy leaves the list when it reports the version (or a newer one: metrics,
 * register, the commit's ack) or is no longer declared, and the operation record says so;
 * it is "done" when the list is empty. The proxies need no re-sent commit: their commit
 * stays queued for them, and every metrics and poll answer names the desired version, which
 * they fetch and apply (agent/control.c). Only the lease holder watches; a new holder loads
 * the "committed" records again (config_recover). */

typedef struct config_watch {
    struct config_watch *next;
    char *deployment;
    int64_t op_id;
    int64_t version;
    int64_t since_ms; /* monotonic: the commit (or this replica's take-over) */
    bool recovered;   /* taken over from another replica: since_ms is not the commit */
    bool dirty;       /* the record does not say what the lists say yet */
    bool writing;     /* its record's update is with the store worker */
    uint64_t id;      /* this watch (a job finds it again by it) */
    json_t *pending;  /* node ids not on the version yet */
    json_t *edited;   /* {node id: true} of the pending ones with a local edit */
    char head[OPERATOR_DETAIL_MAX];    /* "version 3 committed on 1 of 2 proxies" */
    char settled[OPERATOR_DETAIL_MAX]; /* "proxy-b on it after 3.1 s; proxy-c no longer ..." */
} config_watch;

static config_watch *config_watches;
static struct event *config_watch_timer;
static uint64_t config_watch_ids; /* the last config_watch.id given */

static void config_watch_free(config_watch *w)
{
    json_decref(w->pending);
    json_decref(w->edited);
    free(w->deployment);
    free(w);
}

void config_watch_stop(void)
{
    while (config_watches) {
        config_watch *w = config_watches;
        config_watches = w->next;
        config_watch_free(w);
    }
    if (config_watch_timer)
        event_free(config_watch_timer);
    config_watch_timer = NULL;
}

/* "a, b, c" of a JSON array of strings into out (cut with "..." when it is too long). */
static void config_join_ids(const json_t *ids, char *out, size_t len)
{
    size_t i, used = 0;
    json_t *id;
    out[0] = '\0';
    json_array_foreach(ids, i, id)
    {
        int n = snprintf(out + used, len - used, "%s%s", i ? ", " : "", json_string_value(id));
        if (n < 0 || (size_t)n >= len - used) {
            snprintf(out + (len > 4 ? len - 4 : 0), len > 4 ? 4 : len, "...");
            return;
        }
        used += (size_t)n;
    }
}

/* The record's outcome for w as it stands, into out. */
static void config_watch_outcome(const config_watch *w, char *out, size_t len)
{
    char pending[OPERATOR_DETAIL_MAX];
    config_join_ids(w->pending, pending, sizeof(pending));
    state_deployment *dep = state_find_deployment(w->deployment);
    size_t i, used = strlen(pending);
    json_t *id;
    json_array_foreach(w->pending, i, id)
    {
        state_proxy *p = dep ? state_find_proxy(dep, json_string_value(id)) : NULL;
        int64_t edited = p ? config_diverged(p) : 0;
        if (edited > 0 && used < sizeof(pending))
            used += (size_t)snprintf(pending + used, sizeof(pending) - used,
                                     "; %s has a local edit of version %" PRId64
                                     " and waits for an operator",
                                     json_string_value(id), edited);
    }
    if (json_array_size(w->pending) == 0)
        snprintf(out, len, "%s; version %" PRId64 " on every proxy of its set now (%s)", w->head,
                 w->version, w->settled);
    else
        snprintf(out, len,
                 "%s; pending: %s (not on version %" PRId64 " yet: they converge to it when "
                 "they answer again)%s%s",
                 w->head, pending, w->version, w->settled[0] ? "; since then: " : "", w->settled);
}

/* The record's update, written by the store worker: a slow store holds this write, not the
 * event loop. Back on the loop, the watch (found again by its operation: it may be gone) is
 * clean, and finished when the record says "done". */
typedef struct config_watch_job {
    store_job job;
    uint64_t watch; /* the config_watch.id it writes for */
    int64_t op_id;
    bool done; /* the record goes to "done" */
    char outcome[CONFIG_OUTCOME_MAX];
} config_watch_job;

static int config_watch_record_run(store_job *job)
{
    config_watch_job *j = (config_watch_job *)job;
    return store_config_end(j->op_id, j->done ? "done" : "committed", j->outcome);
}

static void config_watch_record_done(store_job *job)
{
    config_watch_job *j = (config_watch_job *)job;
    for (config_watch **pw = &config_watches; *pw; pw = &(*pw)->next) {
        config_watch *w = *pw;
        if (w->id != j->watch) /* gone (lease lost) or loaded again: not this job's */
            continue;
        w->writing = false;
        if (j->job.rc != 0) {
            log_error("deployment %s: operation %" PRId64 ": cannot record its progress: %s "
                      "(tried again in %d ms)",
                      w->deployment, w->op_id, j->job.error, CONFIG_WATCH_MS);
            break;
        }
        w->dirty = false;
        if (j->done) {
            log_info("deployment %s: operation %" PRId64 ": %s", w->deployment, w->op_id,
                     j->outcome);
            *pw = w->next;
            config_watch_free(w);
        }
        break;
    }
    free(j);
}

/* Queue the record's update to outcome; w waits for it (writing). */
static void config_watch_record(config_watch *w, const char *outcome)
{
    config_watch_job *j = calloc(1, sizeof(*j));
    if (!j)
        return; /* dirty: tried again at the next tick */
    j->watch = w->id;
    j->op_id = w->op_id;
    j->done = json_array_size(w->pending) == 0;
    snprintf(j->outcome, sizeof(j->outcome), "%s", outcome);
    j->job.run = config_watch_record_run;
    j->job.done = config_watch_record_done;
    w->writing = true;
    store_worker_submit(&j->job);
}

/* Look at w's pending proxies and queue its record's update when they changed. True when w is
 * finished with (its deployment is gone). */
static bool config_watch_check(config_watch *w)
{
    char outcome[CONFIG_OUTCOME_MAX], note[OPERATOR_DETAIL_MAX];
    state_deployment *dep = state_find_deployment(w->deployment);
    if (!dep)
        return !w->writing; /* deleted, with its operations */
    if (w->writing)
        return false; /* looked at again once its record is written */
    for (size_t i = 0; i < json_array_size(w->pending);) {
        const char *id = json_string_value(json_array_get(w->pending, i));
        state_proxy *p = id ? state_find_proxy(dep, id) : NULL;
        if (p && p->declared && p->config_version < w->version) {
            bool edited = config_diverged(p) > 0;
            if (edited != json_is_true(json_object_get(w->edited, id))) { /* say so */
                json_object_set_new(w->edited, id, json_boolean(edited));
                w->dirty = true;
            }
            i++;
            continue;
        }
        if (!p || !p->declared)
            snprintf(note, sizeof(note), "%s no longer declared", id ? id : "?");
        else if (w->recovered)
            snprintf(note, sizeof(note), "%s on version %" PRId64, id, p->config_version);
        else
            snprintf(note, sizeof(note), "%s on version %" PRId64 " %.1f s after the commit", id,
                     p->config_version, (double)(control_mono_ms() - w->since_ms) / 1000.0);
        size_t used = strlen(w->settled);
        if (used + 2 + strlen(note) < sizeof(w->settled))
            snprintf(w->settled + used, sizeof(w->settled) - used, "%s%s", used ? "; " : "", note);
        log_info("deployment %s: operation %" PRId64 ": %s", w->deployment, w->op_id, note);
        json_array_remove(w->pending, i);
        w->dirty = true;
    }
    if (!w->dirty)
        return false;
    config_watch_outcome(w, outcome, sizeof(outcome));
    config_watch_record(w, outcome);
    return false;
}

static void config_watch_arm(void);

static void config_watch_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    if (!control.active) { /* the next holder loads the records again */
        config_watch_stop();
        return;
    }
    for (config_watch **pw = &config_watches; *pw;) {
        config_watch *w = *pw;
        if (config_watch_check(w)) {
            *pw = w->next;
            config_watch_free(w);
        } else {
            pw = &w->next;
        }
    }
    config_watch_arm();
}

static void config_watch_arm(void)
{
    struct timeval tv = {.tv_sec = CONFIG_WATCH_MS / 1000,
                         .tv_usec = (CONFIG_WATCH_MS % 1000) * 1000};
    if (!config_watches)
        return;
    if (!config_watch_timer)
        config_watch_timer = evtimer_new(control.base, config_watch_tick, NULL);
    if (!config_watch_timer || evtimer_add(config_watch_timer, &tv) != 0)
        log_error("cannot start the timer that watches committed configuration versions: the "
                  "operation records stay \"committed\" until the next lease holder");
}

/* Watch op_id's version until every proxy of pending (stolen) is on it. */
static void config_watch_add(const char *deployment, int64_t op_id, int64_t version,
                             json_t *pending, const char *head, bool recovered)
{
    config_watch *w = calloc(1, sizeof(*w));
    if (!w || !(w->deployment = strdup(deployment))) {
        log_error("deployment %s: operation %" PRId64 ": out of memory watching it: its record "
                  "stays \"committed\" until the next lease holder",
                  deployment, op_id);
        free(w);
        json_decref(pending);
        return;
    }
    w->id = ++config_watch_ids;
    w->op_id = op_id;
    w->version = version;
    w->since_ms = control_mono_ms();
    w->recovered = recovered;
    w->pending = pending;
    w->edited = json_object();
    snprintf(w->head, sizeof(w->head), "%s", head);
    w->next = config_watches;
    config_watches = w;
    if (!config_watch_timer || !evtimer_pending(config_watch_timer, NULL))
        config_watch_arm();
}

/* ---- the apply's writes, on the store worker ----
 *
 * The decision (commit or rollback) and the end of the commit step are written by the store
 * worker: a slow store holds this apply, not the event loop. While a write is on its way the
 * op takes no acknowledgement (command_id 0) and has no timer; back on the loop it is found
 * again by its serial: one that ended meanwhile (lease lost, shutdown) leaves its record to
 * the next lease holder. */

typedef enum config_write_kind {
    CONFIG_WRITE_COMMIT,    /* the decision: committed; then config_commit to the set */
    CONFIG_WRITE_ROLL_BACK, /* the decision: rolled back; then config_abort, the answer */
    CONFIG_WRITE_END,       /* the commit step ended: "done" or "committed"; the answer */
} config_write_kind;

typedef struct config_write_job {
    store_job job;
    config_write_kind kind;
    uint64_t op; /* operator_op.serial */
    char deployment[CCONFIG_NAME_MAX];
    int64_t version;
    int64_t op_id;
    bool all;                      /* END: every proxy of the set committed */
    int code;                      /* ROLL_BACK: the answer's status */
    char text[CONFIG_OUTCOME_MAX]; /* the step's detail, or the outcome */
    json_t *answer;                /* ROLL_BACK, END: the operator's answer */
    json_t *ids;                   /* ROLL_BACK: the set; END: the pending proxies */
} config_write_job;

static void config_write_done(store_job *job);

static int config_write_run(store_job *job)
{
    config_write_job *j = (config_write_job *)job;
    switch (j->kind) {
    case CONFIG_WRITE_COMMIT:
        return store_config_commit(j->deployment, j->version, j->op_id, j->text);
    case CONFIG_WRITE_ROLL_BACK:
        return store_config_roll_back(j->deployment, j->version, j->op_id, j->text);
    case CONFIG_WRITE_END:
        return store_config_end(j->op_id, j->all ? "done" : "committed", j->text);
    }
    return -1;
}

/* Queue the write (answer and ids stolen); the op waits for it. */
static void config_write(operator_op *op, config_write_kind kind, const char *text, json_t *answer,
                         json_t *ids)
{
    config_write_job *j = calloc(1, sizeof(*j));
    if (op->timer)
        evtimer_del(op->timer);
    op->command_id = 0; /* no acknowledgement moves the op while its write is on its way */
    if (!j) {
        json_decref(answer);
        json_decref(ids);
        op_finish_error(op, 500, "out of memory");
        return;
    }
    j->kind = kind;
    j->op = op->serial;
    snprintf(j->deployment, sizeof(j->deployment), "%s", op->dep->name);
    j->version = op->version;
    j->op_id = op->op_id;
    j->all = kind == CONFIG_WRITE_END && json_array_size(ids) == 0;
    snprintf(j->text, sizeof(j->text), "%s", text);
    j->answer = answer;
    j->ids = ids;
    j->job.run = config_write_run;
    j->job.done = config_write_done;
    store_worker_submit(&j->job);
}

/* ---- the apply ---- */

/* Roll back (a refusal, silence, a store failure): the version is deleted, config_abort goes
 * to every proxy the prepare went to, and the operator is answered code. */
static void config_roll_back(operator_op *op, int code, const char *why)
{
    char pending[OPERATOR_DETAIL_MAX];
    if (code == 504)
        op_pending_detail(op, pending, sizeof(pending));
    else
        snprintf(pending, sizeof(pending), "no answer yet (rolled back)");
    json_t *answer =
        json_pack("{s:b, s:s, s:s, s:I, s:I, s:b, s:o}", "ok", 0, "state", "rolled_back", "error",
                  why, "version", (json_int_t)op->version, "operation", (json_int_t)op->op_id,
                  "committed", 0, "proxies", op_answers(op, pending));
    op->config_code = code;
    config_write(op, CONFIG_WRITE_ROLL_BACK, why, answer, config_op_target_ids(op));
}

/* The rollback was written (or not: the next lease holder rolls it back): config_abort to the
 * set, and the answer. */
static void config_rolled_back(operator_op *op, config_write_job *j)
{
    if (j->job.rc != 0)
        log_error("deployment %s: cannot record the rollback of configuration version %" PRId64
                  ": %s (the next lease holder rolls it back)",
                  op->dep->name, op->version, j->job.error);
    config_fire(op->dep, j->ids, "config_abort", config_version_args(op->version, op->op_id));
    log_warning("deployment %s: configuration version %" PRId64 " rolled back on every proxy: %s",
                op->dep->name, op->version, j->text);
    op_finish(op, j->code, j->answer);
    j->answer = NULL;
}

/* Every proxy of the set prepared: record the decision, then commit on exactly that set. */
static void config_commit(operator_op *op)
{
    config_write(op, CONFIG_WRITE_COMMIT, "every proxy prepared", NULL, NULL);
}

/* The decision was written (or could not be: then it rolls back). */
static void config_committed(operator_op *op, config_write_job *j)
{
    if (j->job.rc != 0) {
        char why[OPERATOR_DETAIL_MAX + sizeof(j->job.error)];
        snprintf(why, sizeof(why), "store unreachable: cannot record the commit: %s", j->job.error);
        config_roll_back(op, 503, why);
        return;
    }
    json_t *ids = config_op_target_ids(op);
    int n = 0;
    state_proxy **targets = config_find_targets(op->dep, ids, &n);
    json_decref(ids);
    op->dep->config_version = op->version;
    log_info("deployment %s: configuration version %" PRId64 " committed; committing it on %d "
             "prox%s",
             op->dep->name, op->version, n, n == 1 ? "y" : "ies");
    int64_t least = control_mono_ms() + CONFIG_COMMIT_MIN_MS;
    if (op->deadline_ms < least)
        op->deadline_ms = least;
    op_send(op, STEP_COMMIT, "config_commit", config_version_args(op->version, op->op_id), targets,
            n);
    free(targets);
}

/* The commit step ended (every proxy answered, or the deadline passed): record and answer.
 * Every proxy of the set acknowledged: "done". Some did not (silent, or could not write
 * their file): "committed", with them pending; they converge to the version, watched. */
static void config_finish(operator_op *op)
{
    char pending[OPERATOR_DETAIL_MAX], head[OPERATOR_DETAIL_MAX], outcome[CONFIG_OUTCOME_MAX];
    char away[OPERATOR_DETAIL_MAX];
    snprintf(pending, sizeof(pending),
             "not committed yet (no answer within %" PRId64 "s): it converges to version %" PRId64
             " when it answers again",
             op->timeout_s, op->version);
    snprintf(away, sizeof(away),
             "not live when the version was prepared: it converges to version %" PRId64
             " when it answers again",
             op->version);
    json_t *waiting = json_array(), *answers = op_answers(op, pending);
    int n_away = 0;
    for (int i = 0; waiting && i < op->n_targets; i++)
        if (op->targets[i].answer != OP_OK)
            json_array_append_new(waiting, json_string(op->targets[i].node_id));
    /* the declared proxies the set left out (not live at the prepare): the version is theirs
     * too, and they converge to it when they answer again */
    for (state_proxy *p = op->dep->proxies; waiting && answers && p; p = p->next) {
        if (!p->declared || op_target_find(op, p->node_id))
            continue;
        json_array_append_new(waiting, json_string(p->node_id));
        json_array_append_new(
            answers, json_pack("{s:s, s:b, s:s}", "node_id", p->node_id, "ok", 0, "detail", away));
        n_away++;
    }
    if (!waiting || !answers) {
        json_decref(waiting);
        json_decref(answers);
        op_finish_error(op, 500, "out of memory");
        return;
    }
    int total = op->n_targets + n_away;
    int done = total - (int)json_array_size(waiting);
    bool all = json_array_size(waiting) == 0;
    snprintf(head, sizeof(head), "version %" PRId64 " committed on %d of %d prox%s", op->version,
             done, total, total == 1 ? "y" : "ies");
    if (all) {
        snprintf(outcome, sizeof(outcome), "%s: on every proxy of its set", head);
    } else {
        char ids[OPERATOR_DETAIL_MAX];
        config_join_ids(waiting, ids, sizeof(ids));
        snprintf(outcome, sizeof(outcome),
                 "%s; pending: %s (not on version %" PRId64 " yet: they converge to it when "
                 "they answer again)",
                 head, ids, op->version);
    }
    snprintf(op->config_head, sizeof(op->config_head), "%s", head);
    json_t *answer = json_pack("{s:b, s:s, s:I, s:I, s:b, s:s, s:O, s:o}", "ok", all, "state",
                               all ? "done" : "committed", "version", (json_int_t)op->version,
                               "operation", (json_int_t)op->op_id, "committed", 1, "outcome",
                               outcome, "pending", waiting, "proxies", answers);
    config_write(op, CONFIG_WRITE_END, outcome, answer, waiting);
}

/* The end of the commit step was written: a version not everywhere is watched; the answer. */
static void config_ended(operator_op *op, config_write_job *j)
{
    bool all = json_array_size(j->ids) == 0;
    if (j->job.rc != 0)
        log_error("deployment %s: configuration version %" PRId64 ": cannot record its end: %s",
                  op->dep->name, op->version, j->job.error);
    if (all) {
        log_info("deployment %s: %s", op->dep->name, j->text);
    } else {
        log_warning("deployment %s: %s", op->dep->name, j->text);
        config_watch_add(op->dep->name, op->op_id, op->version, j->ids, op->config_head, false);
        j->ids = NULL;
    }
    op_finish(op, 200, j->answer);
    j->answer = NULL;
}

static void config_write_done(store_job *job)
{
    config_write_job *j = (config_write_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    operator_op *op = dep ? dep->op : NULL;
    if (!op || op->serial != j->op) {
        log_warning("deployment %s: configuration operation %" PRId64 " ended here before its "
                    "%s was written: its record is the next lease holder's",
                    j->deployment, j->op_id,
                    j->kind == CONFIG_WRITE_COMMIT      ? "commit"
                    : j->kind == CONFIG_WRITE_ROLL_BACK ? "rollback"
                                                        : "end");
    } else if (j->kind == CONFIG_WRITE_COMMIT) {
        config_committed(op, j);
    } else if (j->kind == CONFIG_WRITE_ROLL_BACK) {
        j->code = op->config_code;
        config_rolled_back(op, j);
    } else {
        config_ended(op, j);
    }
    json_decref(j->answer);
    json_decref(j->ids);
    free(j);
}

/* The test hook: hold after the prepare step. True when holding. */
static bool config_test_hold(operator_op *op)
{
    const char *hold = getenv(CONFIG_TEST_HOLD_ENV);
    const char *ms = getenv(CONFIG_TEST_HOLD_MS_ENV);
    if (!hold || strcmp(hold, "prepare") != 0)
        return false;
    log_warning("deployment %s: config apply holds after its prepare step (%s is set: a test "
                "hook)",
                op->dep->name, CONFIG_TEST_HOLD_ENV);
    op->step = STEP_CONFIG_HOLD;
    op->command_id = 0;
    int64_t deadline = op->deadline_ms;
    if (ms && atoll(ms) > 0 && control_mono_ms() + atoll(ms) < deadline)
        op->deadline_ms = control_mono_ms() + atoll(ms);
    op_arm_deadline(op);
    op->deadline_ms = deadline;
    return true;
}

void config_apply_step_done(operator_op *op)
{
    switch (op->step) {
    case STEP_PREPARE:
        if (config_test_hold(op))
            return;
        config_commit(op);
        return;
    case STEP_COMMIT:
        config_finish(op);
        return;
    default:
        op_finish_error(op, 500, "config apply in an unknown step");
        return;
    }
}

void config_apply_timeout(operator_op *op)
{
    char msg[OPERATOR_DETAIL_MAX];
    switch (op->step) {
    case STEP_PREPARE:
        snprintf(msg, sizeof(msg), "not every proxy prepared within %" PRId64 "s", op->timeout_s);
        config_roll_back(op, 504, msg);
        return;
    case STEP_CONFIG_HOLD:
        if (op_left_ms(op) > 0) {
            config_commit(op);
            return;
        }
        snprintf(msg, sizeof(msg), "not done within %" PRId64 "s", op->timeout_s);
        config_roll_back(op, 504, msg);
        return;
    case STEP_COMMIT:
        config_finish(op);
        return;
    default:
        op_finish_error(op, 500, "config apply in an unknown step");
        return;
    }
}

void config_apply_refused(operator_op *op, const char *node_id, const char *detail)
{
    char why[OPERATOR_DETAIL_MAX];
    if (op->timer)
        evtimer_del(op->timer);
    snprintf(why, sizeof(why), "proxy %s refused the configuration: %s", node_id, detail);
    config_roll_back(op, 409, why);
}

/* A live declared proxy reports a local edit of its file: the same text again makes a new
 * version, whose commit replaces the edit (the operator's way to overwrite it). */
static bool config_any_diverged(state_deployment *dep)
{
    int64_t now = control_now_ms();
    for (state_proxy *p = dep->proxies; p; p = p->next)
        if (p->declared && state_proxy_live(p, now) && config_diverged(p) > 0)
            return true;
    return false;
}

/* The same text as the deployment's current version: nothing to apply, no new version. The
 * answer says which live proxies are on it (the others converge to it). */
static void config_unchanged(operator_op *op, int64_t version)
{
    json_t *list = json_array();
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    for (int i = 0; i < n; i++) {
        bool on = live[i]->config_version == version;
        json_array_append_new(
            list, json_pack("{s:s, s:b, s:o}", "node_id", live[i]->node_id, "ok", on, "detail",
                            on ? json_sprintf("on version %" PRId64, version)
                               : json_sprintf("on version %" PRId64 ": converging to %" PRId64,
                                              live[i]->config_version, version)));
    }
    free(live);
    log_info("deployment %s: config apply of the text of version %" PRId64 ": unchanged",
             op->dep->name, version);
    op_finish(op, 200,
              json_pack("{s:b, s:I, s:b, s:s, s:o}", "ok", 1, "version", (json_int_t)version,
                        "unchanged", 1, "outcome",
                        "the text is the deployment's current version: nothing applied", "proxies",
                        list));
}

/* The start of an apply, run by the store worker: the current version is read and, unless the
 * text is that version's (and no live proxy reports a local edit), the new version and its
 * operation are recorded. A slow store holds this apply (its deployment's op), not the event
 * loop. Back on the loop the op is found again by its serial: it may have ended meanwhile
 * (lease lost, shutdown), and then a recorded operation is the next holder's to roll back. */
typedef struct config_begin_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    uint64_t op;         /* operator_op.serial */
    char *text;          /* the text applied (copy) */
    char *targets_json;  /* the live proxies when the apply began */
    int64_t min_version; /* above every declared proxy's version */
    int64_t timeout_s;
    bool any_diverged; /* a live proxy reports a local edit: no "unchanged" */
    bool read;         /* out: the current version was read */
    int64_t current;   /* out: the deployment's current version */
    bool unchanged;    /* out: the text is the current version's */
    int64_t version;   /* out: the new version */
    int64_t op_id;     /* out: its operation */
} config_begin_job;

static void config_record_prepare(operator_op *op);

static int config_begin_run(store_job *job)
{
    config_begin_job *j = (config_begin_job *)job;
    char *current_text = NULL;
    if (store_config_current(j->deployment, &j->current, &current_text) != 0)
        return -1;
    j->read = true;
    j->unchanged = current_text && strcmp(current_text, j->text) == 0 && !j->any_diverged;
    free(current_text);
    if (j->unchanged)
        return 0;
    /* durable first: the version, its operation and the proxies it goes to */
    return store_config_begin(j->deployment, j->text, j->min_version, j->targets_json, j->timeout_s,
                              &j->version, &j->op_id);
}

static void config_begin_free(config_begin_job *j)
{
    free(j->text);
    free(j->targets_json);
    free(j);
}

static void config_begin_done(store_job *job)
{
    config_begin_job *j = (config_begin_job *)job;
    char msg[OPERATOR_DETAIL_MAX + sizeof(j->job.error)];
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    operator_op *op = dep ? dep->op : NULL;
    if (!op || op->serial != j->op) {
        if (j->op_id > 0)
            log_warning("deployment %s: configuration version %" PRId64 " was recorded after its "
                        "apply ended here: operation %" PRId64 " is left to the next lease "
                        "holder, which rolls it back",
                        j->deployment, j->version, j->op_id);
        config_begin_free(j);
        return;
    }
    if (j->read)
        dep->config_version = j->current;
    if (j->job.rc != 0) {
        snprintf(msg, sizeof(msg), "store unreachable: %s%s",
                 j->read ? "cannot record the apply: " : "", j->job.error);
        config_begin_free(j);
        op_finish_error(op, 503, msg);
        return;
    }
    if (j->unchanged) {
        int64_t current = j->current;
        config_begin_free(j);
        config_unchanged(op, current);
        return;
    }
    op->version = j->version;
    op->op_id = j->op_id;
    json_t *ids = json_loads(j->targets_json, 0, NULL);
    int n = 0;
    state_proxy **targets = config_find_targets(dep, ids, &n);
    json_decref(ids);
    config_begin_free(j);
    log_info("deployment %s: configuration version %" PRId64 " proposed (operation %" PRId64
             ") to %d prox%s",
             dep->name, op->version, op->op_id, n, n == 1 ? "y" : "ies");
    json_t *args = json_pack("{s:I, s:s, s:I}", "version", (json_int_t)op->version, "text",
                             op->text, "operation", (json_int_t)op->op_id);
    op_send(op, STEP_PREPARE, "config_prepare", args, targets, n);
    free(targets);
}

void config_apply_prepare_sent(operator_op *op)
{
    config_record_prepare(op); /* still waiting for the prepares */
}

/* The prepare command's id in the operation's record (written by the store worker): what the
 * next lease holder reads to tell whether every proxy had prepared. Not written (a crash
 * first, or a store failure), the next holder rolls the apply back. */
typedef struct config_prepared_job {
    store_job job;
    int64_t op_id;
    int64_t command_id;
    char deployment[CCONFIG_NAME_MAX];
} config_prepared_job;

static int config_prepared_run(store_job *job)
{
    config_prepared_job *j = (config_prepared_job *)job;
    return store_config_prepared(j->op_id, j->command_id);
}

static void config_prepared_done(store_job *job)
{
    config_prepared_job *j = (config_prepared_job *)job;
    if (j->job.rc != 0)
        log_error("deployment %s: cannot record the prepare command of operation %" PRId64
                  ": %s (a replica that takes over rolls the apply back)",
                  j->deployment, j->op_id, j->job.error);
    free(j);
}

static void config_record_prepare(operator_op *op)
{
    config_prepared_job *j = calloc(1, sizeof(*j));
    op->prepare_id = op->command_id;
    if (!j) {
        log_error("deployment %s: out of memory recording the prepare command of operation "
                  "%" PRId64,
                  op->dep->name, op->op_id);
        return;
    }
    j->op_id = op->op_id;
    j->command_id = op->command_id;
    snprintf(j->deployment, sizeof(j->deployment), "%s", op->dep->name);
    j->job.run = config_prepared_run;
    j->job.done = config_prepared_done;
    store_worker_submit(&j->job);
}

void operator_config_apply(http_call *call)
{
    const char *text = NULL;
    state_proxy **live = NULL;

    if (!http_field_string(call, call->body, NULL, "text", true, CONFIG_TEXT_MAX, &text))
        return;
    operator_op *op = op_begin(call, OP_CONFIG);
    if (!op)
        return;
    config_begin_job *job = calloc(1, sizeof(*job));
    int n = state_live_proxies(op->dep, &live);
    op->text = strdup(text);
    if (!job || !op->text || !(job->text = strdup(text)) || n < 0 ||
        !(job->targets_json = config_targets_json(live, n))) {
        free(live);
        if (job)
            config_begin_free(job);
        op_finish_error(op, 500, "out of memory");
        return;
    }
    free(live);
    for (state_proxy *p = op->dep->proxies; p; p = p->next)
        if (p->declared && p->config_version > job->min_version)
            job->min_version = p->config_version;
    snprintf(job->deployment, sizeof(job->deployment), "%s", op->dep->name);
    job->op = op->serial;
    job->timeout_s = op->timeout_s;
    job->any_diverged = config_any_diverged(op->dep);
    job->job.run = config_begin_run;
    job->job.done = config_begin_done;
    store_worker_submit(&job->job);
}

/* ---- the desired version ---- */

/* The desired version's text, read by the store worker: a slow store holds this agent's
 * request, not the event loop. */
typedef struct config_desired_job {
    store_job job;
    struct evhttp_request *req; /* answered by config_desired_done */
    char deployment[CCONFIG_NAME_MAX];
    int64_t version;
    char *text; /* malloc'd (worker), NULL before the first commit */
} config_desired_job;

static int config_desired_run(store_job *job)
{
    config_desired_job *j = (config_desired_job *)job;
    return store_config_current(j->deployment, &j->version, &j->text);
}

static void config_desired_done(store_job *job)
{
    config_desired_job *j = (config_desired_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    if (!dep) {
        http_reply_error(j->req, 503, "not serving: %s",
                         control.active ? "the deployment is no longer known" : "state dropped");
    } else if (j->job.rc != 0) {
        http_reply_error(j->req, 503, "store unreachable: %s", j->job.error);
    } else {
        dep->config_version = j->version;
        http_reply_json(j->req, 200,
                        json_pack("{s:I, s:o}", "version", (json_int_t)j->version, "text",
                                  j->text ? json_string(j->text) : json_null()));
    }
    free(j->text);
    free(j);
}

void operator_config_desired(http_call *call)
{
    const char *node_id = evhttp_find_header(&call->query, "node_id");
    if (!node_id || !http_node_id_valid(node_id)) {
        http_reply_error(call->req, 400,
                         "query parameter node_id must be 1 to %d printable "
                         "characters without blanks",
                         STATE_NODE_ID_MAX - 1);
        return;
    }
    state_proxy *p = state_find_proxy(call->dep, node_id);
    if (!p || !p->declared) {
        http_reply_error(call->req, 403, "proxy %s is not declared in deployment %s", node_id,
                         call->dep->name);
        return;
    }
    config_desired_job *job = calloc(1, sizeof(*job));
    if (!job) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    job->req = call->req;
    snprintf(job->deployment, sizeof(job->deployment), "%s", call->dep->name);
    job->job.run = config_desired_run;
    job->job.done = config_desired_done;
    store_worker_submit(&job->job);
}

/* ---- recovery by the next lease holder ---- */

/* The writes that finish or roll back one apply left running, for the store worker, in this
 * order: the decision (commit, unless the record was at the commit step already; or the
 * rollback), the commands to the set (config_commit, or config_abort), the end. */
typedef struct config_recover_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    int64_t id, version;
    bool commit;  /* else roll back */
    bool record;  /* commit: write the decision (the record was not at the commit step) */
    bool send;    /* queue the command to the set */
    json_t *ids;  /* the set */
    json_t *args; /* the command's */
    char outcome[OPERATOR_DETAIL_MAX];
    json_t *send_to; /* the proxies of the set this replica knows (the command's) */
    int64_t command_id;
    bool decided;    /* stored committed, even if what follows failed */
    char failed[32]; /* what could not be written */
} config_recover_job;

static int config_recover_run(store_job *job)
{
    config_recover_job *j = (config_recover_job *)job;
    size_t n = json_array_size(j->send_to);
    const char **ids = malloc((n > 0 ? n : 1) * sizeof(*ids));
    if (!ids) {
        snprintf(j->failed, sizeof(j->failed), "(out of memory) recover");
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        ids[i] = json_string_value(json_array_get(j->send_to, i));
    int rc = -1;
    if (j->commit && j->record &&
        store_config_commit(j->deployment, j->version, j->id,
                            "every proxy had prepared (recovered)") != 0) {
        snprintf(j->failed, sizeof(j->failed), "commit version");
        goto done;
    }
    if (!j->commit && store_config_roll_back(j->deployment, j->version, j->id, j->outcome) != 0) {
        snprintf(j->failed, sizeof(j->failed), "roll back version");
        goto done;
    }
    j->decided = j->commit; /* stored committed: the version is the deployment's */
    if (j->send && n > 0 &&
        (j->command_id =
             store_command_create_ids(j->deployment, j->commit ? "config_commit" : "config_abort",
                                      j->args, ids, (int)n)) < 0) {
        snprintf(j->failed, sizeof(j->failed), "queue the command for");
        goto done;
    }
    if (j->commit && store_config_end(j->id, "committed", j->outcome) != 0) {
        snprintf(j->failed, sizeof(j->failed), "record the end of");
        goto done;
    }
    rc = 0;
done:
    free(ids);
    return rc;
}

static void config_recover_done(store_job *job)
{
    config_recover_job *j = (config_recover_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    if (job->rc != 0)
        log_error("deployment %s: operation %" PRId64 ": cannot %s %" PRId64 ": %s", j->deployment,
                  j->id, j->failed, j->version, job->error);
    else
        log_warning("deployment %s: operation %" PRId64 " %s", j->deployment, j->id, j->outcome);
    for (size_t i = 0; dep && j->command_id > 0 && i < json_array_size(j->send_to); i++) {
        state_proxy *p = state_find_proxy(dep, json_string_value(json_array_get(j->send_to, i)));
        if (p)
            agents_wake(p);
    }
    /* stored committed, even when what follows failed: the version is the deployment's, and
     * the proxies of the set converge to it (watched) */
    if (dep && j->decided) {
        /* committed until every proxy of the set reports the version (config_watch) */
        if (dep->config_version < j->version)
            dep->config_version = j->version;
        config_watch_add(dep->name, j->id, j->version, j->ids, j->outcome, true);
        j->ids = NULL;
    }
    json_decref(j->ids);
    json_decref(j->send_to);
    json_decref(j->args);
    free(j);
}

/* Finish or roll back one apply left running by a replica that crashed, stopped or lost the
 * lease: committed when its record is at the commit step (the decision was taken) or when
 * every proxy of its set had prepared (row's answers_ok / answers_total, read by recovery.c);
 * rolled back otherwise. */
static void config_recover_one(json_t *row)
{
    int64_t id = json_integer_value(json_object_get(row, "id"));
    int64_t version = json_integer_value(json_object_get(row, "version"));
    const char *step = json_string_value(json_object_get(row, "step"));
    json_t *ids = json_object_get(row, "targets");
    const char *name = json_string_value(json_object_get(row, "deployment"));
    int ok = (int)json_integer_value(json_object_get(row, "answers_ok"));
    int total = (int)json_integer_value(json_object_get(row, "answers_total"));

    if (!name || !state_find_deployment(name))
        return;
    config_recover_job *j = calloc(1, sizeof(*j));
    if (!j || !(j->ids = json_is_array(ids) ? json_deep_copy(ids) : json_array())) {
        free(j);
        log_error("deployment %s: operation %" PRId64 ": out of memory recovering it", name, id);
        return;
    }
    snprintf(j->deployment, sizeof(j->deployment), "%s", name);
    j->id = id;
    j->version = version;
    bool at_commit = step && strcmp(step, "commit") == 0;
    j->commit = at_commit || json_array_size(ids) == 0 || /* prepared on nobody: nothing to undo */
                (json_object_get(row, "answers_total") && ok == total &&
                 total == (int)json_array_size(ids));
    j->record = j->commit && !at_commit;
    j->send = !at_commit; /* at the commit step the commit was queued by the one that stopped */
    j->args = config_version_args(version, id);
    j->send_to = json_array(); /* as config_fire: the proxies of the set still known */
    state_deployment *dep = state_find_deployment(name);
    for (size_t i = 0; j->send_to && i < json_array_size(j->ids); i++) {
        const char *node_id = json_string_value(json_array_get(j->ids, i));
        if (node_id && state_find_proxy(dep, node_id))
            json_array_append_new(j->send_to, json_string(node_id));
    }
    if (j->commit)
        snprintf(j->outcome, sizeof(j->outcome),
                 "finished by %s (the replica that ran it stopped at its %s step): version "
                 "%" PRId64 " committed, its commit queued to the proxies that prepared it",
                 control.identity, step ? step : "?", version);
    else
        snprintf(j->outcome, sizeof(j->outcome),
                 "rolled back by %s (the replica that ran it stopped at its %s step, %d of %zu "
                 "proxies prepared): config_abort queued",
                 control.identity, step ? step : "?", ok, json_array_size(ids));
    j->job.run = config_recover_run;
    j->job.done = config_recover_done;
    store_worker_submit(&j->job);
}

/* The applies another replica left "committed": watched again from here. */
static void config_recover_committed(json_t *list)
{
    size_t i;
    json_t *row;
    json_array_foreach(list, i, row)
    {
        const char *dep = json_string_value(json_object_get(row, "deployment"));
        int64_t id = json_integer_value(json_object_get(row, "id"));
        char head[OPERATOR_DETAIL_MAX];
        snprintf(head, sizeof(head), "version %" PRId64 " committed",
                 (int64_t)json_integer_value(json_object_get(row, "version")));
        if (dep)
            config_watch_add(dep, id, json_integer_value(json_object_get(row, "version")),
                             json_deep_copy(json_object_get(row, "targets")), head, true);
    }
}

void config_recover(json_t *running, json_t *committed, json_t *versions)
{
    size_t i;
    json_t *row;
    config_watch_stop(); /* what the store says, not what this replica had before */
    if (committed)
        config_recover_committed(committed);
    else
        log_error("cannot read the committed configuration operations (their records stay "
                  "\"committed\")");
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        json_t *v = json_object_get(versions, d->name);
        if (json_is_integer(v))
            d->config_version = json_integer_value(v);
        else
            log_error("deployment %s: cannot read its configuration version", d->name);
    }
    json_array_foreach(running, i, row)
    {
        const char *kind = json_string_value(json_object_get(row, "kind"));
        if (kind && strcmp(kind, "config") == 0)
            config_recover_one(row);
    }
}

int config_recover_read(json_t *running)
{
    size_t i;
    json_t *row;
    json_array_foreach(running, i, row)
    {
        const char *kind = json_string_value(json_object_get(row, "kind"));
        const char *step = json_string_value(json_object_get(row, "step"));
        int64_t command_id = json_integer_value(json_object_get(row, "command_id"));
        int ok = 0, total = 0;
        if (!kind || strcmp(kind, "config") != 0 || (step && strcmp(step, "commit") == 0) ||
            command_id <= 0)
            continue;
        if (store_command_answers(command_id, &ok, &total) != 0)
            return -1; /* not known whether it prepared everywhere: read again */
        json_object_set_new(row, "answers_ok", json_integer(ok));
        json_object_set_new(row, "answers_total", json_integer(total));
    }
    return 0;
}
