/* operator.c - operator orchestrations: maintenance and reload, and the machinery they share
 * with the switchover (switchover.c) and the configuration apply (config_apply.c); the
 * read-only endpoints are in views.c.
 *
 * An orchestration ("op") belongs to one deployment (one at a time; another is 409) and runs
 * as a sequence of steps. Each step queues one command for a set of proxies (durable in the
 * store, delivered by the long poll), then waits for their acknowledgements or for timeout_s.
 * The operator's HTTP request is held open until the op ends and is answered then.
 */
#include "operator_internal.h"
#include "agents.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "maintenance.h"
#include "members.h"
#include "store.h"
#include "store_queue.h"
#include "store_worker.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const op_kind_names[] = {"maintenance", "reload", "switchover", "config",
                                            "unfence"};

const char *op_step_name(op_step step)
{
    switch (step) {
    case STEP_PAUSE:
        return "pause";
    case STEP_FENCE:
        return "fence";
    case STEP_CATCH_UP:
        return "catch_up";
    case STEP_PROMOTE:
        return "promote";
    case STEP_SET_LEADER:
        return "switch";
    case STEP_RESUME:
        return "resume";
    case STEP_UNFENCE:
        return "unfence";
    default:
        return "other";
    }
}

/* ---- answers ---- */

json_t *op_answers(const operator_op *op, const char *pending_detail)
{
    json_t *list = json_array();
    for (int i = 0; i < op->n_targets; i++) {
        const op_target *t = &op->targets[i];
        json_array_append_new(
            list, json_pack("{s:s, s:b, s:s}", "node_id", t->node_id, "ok", t->answer == OP_OK,
                            "detail", t->answer == OP_PENDING ? pending_detail : t->detail));
    }
    return list;
}

bool op_all_ok(const operator_op *op)
{
    for (int i = 0; i < op->n_targets; i++)
        if (op->targets[i].answer != OP_OK)
            return false;
    return true;
}

static bool op_all_answered(const operator_op *op)
{
    for (int i = 0; i < op->n_targets; i++)
        if (op->targets[i].answer == OP_PENDING)
            return false;
    return true;
}

static void op_free(operator_op *op)
{
    if (op->timer)
        event_free(op->timer);
    json_decref(op->leader_answers);
    json_decref(op->record);
    json_decref(op->finish_body);
    free(op->targets);
    free(op->by_id);
    free(op->text);
    free(op);
}

/* The store writes queued before the answer are done: answer now. */
static void op_finish_then(const char *deployment, int64_t id, const char *error, void *arg)
{
    operator_op *op = op_find(deployment, (uint64_t)(uintptr_t)arg);
    (void)id;
    (void)error;
    if (!op) /* cancelled meanwhile (lease lost, shutdown): answered then */
        return;
    log_info("deployment %s: %s finished (%d)", op->dep->name, op_kind_names[op->kind],
             op->finish_code);
    op->dep->op = NULL;
    http_reply_json(op->req, op->finish_code, op->finish_body);
    op->finish_body = NULL;
    op_free(op);
}

/* The op stays the deployment's (another one is refused, no acknowledgement moves it) until
 * what it queued for the store is written: an operator who reads the operations or starts the
 * next one sees them done. */
void op_finish(operator_op *op, int code, json_t *body)
{
    if (op->finishing) { /* a second ending (cannot happen; would leak otherwise) */
        json_decref(body);
        return;
    }
    op->finishing = true;
    op->finish_code = code;
    op->finish_body = body;
    op->command_id = 0;
    if (op->timer)
        evtimer_del(op->timer);
    store_queue_barrier(op->dep->name, op_finish_then, (void *)(uintptr_t)op->serial);
}

void op_finish_error(operator_op *op, int code, const char *msg)
{
    op_finish(op, code, json_pack("{s:b, s:s}", "ok", 0, "error", msg));
}

void op_pending_detail(const operator_op *op, char *buf, size_t len)
{
    snprintf(buf, len, "no answer within %" PRId64 "s", op->timeout_s);
}

/* ---- steps ---- */

json_t *op_maintenance_args(bool on, int64_t resume_after_s)
{
    return json_pack("{s:b, s:I}", "on", on, "resume_after_s", (json_int_t)resume_after_s);
}

int64_t op_left_ms(const operator_op *op)
{
    int64_t left = op->deadline_ms - control_mono_ms();
    return left > 0 ? left : 0;
}

static void op_timeout(evutil_socket_t fd, short what, void *arg);
static void op_step_done(operator_op *op);

operator_op *op_find(const char *deployment, uint64_t serial)
{
    state_deployment *dep = control.active ? state_find_deployment(deployment) : NULL;
    return dep && dep->op && dep->op->serial == serial ? dep->op : NULL;
}

void op_store_wait(operator_op *op)
{
    op->in_store++;
}

bool op_store_back(operator_op *op)
{
    op->in_store--;
    if (op->in_store > 0 || !op->timed_out || op->finishing)
        return true;
    op->timed_out = false;
    op_timeout(-1, 0, op); /* the deadline passed meanwhile: as if now */
    return false;
}

int op_arm_deadline(operator_op *op)
{
    int64_t left = op_left_ms(op);
    struct timeval tv = {.tv_sec = (time_t)(left / 1000), .tv_usec = (left % 1000) * 1000};
    if (!op->timer)
        op->timer = evtimer_new(control.base, op_timeout, op);
    if (!op->timer || evtimer_add(op->timer, &tv) != 0) {
        op_finish_error(op, 500, "cannot start the timer");
        return -1;
    }
    return 0;
}

/* A step's store work: what `before` asks, then the command; the op waits for it. */
typedef struct op_send_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    uint64_t serial;
    op_before before;
    /* the operation (created, or the op's) and its step's record */
    char kind[16];
    char step_name[16];
    char node[STATE_NODE_NAME_MAX];
    char old_leader[STATE_NODE_NAME_MAX];
    char runner[STATE_NODE_ID_MAX];
    bool promote, force, fenced, promote_sent;
    int64_t timeout_s;
    int64_t op_id;
    /* the leader: refused when leader_rc > 0 (the store holds stored_leader at stored_epoch) */
    int leader_rc;
    int64_t stored_epoch;
    char stored_leader[STATE_NODE_NAME_MAX];
    /* the command (none when n == 0) */
    char type[32];
    json_t *args;
    const char **ids;
    char (*id_text)[STATE_NODE_ID_MAX];
    int n;
    int64_t command_id;
    enum { SEND_OK, SEND_CREATE, SEND_LEADER, SEND_RECORD, SEND_COMMAND } failed;
} op_send_job;

static int op_send_run(store_job *job)
{
    op_send_job *j = (op_send_job *)job;
    if (j->before.create) {
        j->op_id = store_operation_create(j->deployment, j->kind, j->node, j->old_leader,
                                          j->promote, j->force, j->timeout_s);
        if (j->op_id < 0) {
            j->failed = SEND_CREATE;
            return -1;
        }
    }
    if (j->before.save_leader) {
        j->leader_rc = store_leadership_save(j->deployment, j->node, j->before.epoch,
                                             &j->stored_epoch, j->stored_leader);
        if (j->leader_rc != 0) {
            j->failed = SEND_LEADER;
            return -1;
        }
    }
    if (j->before.record) {
        if (store_operation_step(j->op_id, j->step_name, j->runner, j->fenced, j->promote_sent) !=
            0) {
            j->failed = SEND_RECORD;
            return -1;
        }
        /* the command carries the operation's id (a late one is withdrawn with it) */
        json_object_set_new(j->args, "operation", json_integer((json_int_t)j->op_id));
    }
    if (j->n > 0) {
        j->command_id = store_command_create_ids(j->deployment, j->type, j->args, j->ids, j->n);
        if (j->command_id < 0) {
            j->failed = SEND_COMMAND;
            return -1;
        }
    }
    return 0;
}

static void op_send_free(op_send_job *j)
{
    json_decref(j->args);
    free(j->ids);
    free(j->id_text);
    free(j);
}

static void op_send_done(store_job *job)
{
    op_send_job *j = (op_send_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    operator_op *op = op_find(j->deployment, j->serial);
    char msg[OPERATOR_DETAIL_MAX + sizeof(job->error)];

    /* what the store now holds is taken whatever became of the op */
    if (dep && j->before.save_leader && j->failed != SEND_CREATE) {
        if (j->leader_rc == 0)
            leader_saved(dep, j->node, j->before.epoch);
        else if (j->leader_rc > 0)
            log_error("deployment %s: the store refused leader %s at epoch %" PRId64
                      ": it holds leader %s at epoch %" PRId64 " (one epoch names one leader)",
                      dep->name, j->node, j->before.epoch,
                      j->stored_leader[0] ? j->stored_leader : "(none)", j->stored_epoch);
    }
    for (int i = 0; dep && j->command_id > 0 && i < j->n; i++) {
        state_proxy *p = state_find_proxy(dep, j->ids[i]);
        if (p)
            agents_wake(p);
    }
    if (!op) {
        if (j->command_id > 0 || j->op_id > 0)
            log_warning("deployment %s: %s (command %" PRId64 ", operation %" PRId64
                        ") was written after its orchestration ended here",
                        j->deployment, j->type, j->command_id, j->op_id);
        op_send_free(j);
        return;
    }
    if (j->before.create && j->op_id > 0) {
        op->op_id = j->op_id;
        log_info("deployment %s: %s is operation %" PRId64, op->dep->name, op_kind_names[op->kind],
                 op->op_id);
    }
    if (j->failed == SEND_CREATE || j->failed == SEND_LEADER || j->failed == SEND_RECORD) {
        bool create = j->failed == SEND_CREATE, leader = j->failed == SEND_LEADER;
        snprintf(msg, sizeof(msg), "%s",
                 j->leader_rc > 0 ? "the store holds a newer leader decision" : job->error);
        op_send_free(j);
        if (op_store_back(op))
            switchover_not_recorded(op, create, leader, msg);
        return;
    }
    if (j->failed == SEND_COMMAND) {
        snprintf(msg, sizeof(msg), "store unreachable: %s", job->error);
        op_send_free(j);
        if (op_store_back(op))
            op_finish_error(op, 503, msg);
        return;
    }
    int n = j->n;
    op->command_id = j->command_id;
    if (n > 0)
        log_info("deployment %s: %s: command %" PRId64 " (%s) to %d prox%s", op->dep->name,
                 op_kind_names[op->kind], op->command_id, j->type, n, n == 1 ? "y" : "ies");
    op_send_free(j);
    if (!op_store_back(op))
        return;
    if (n == 0) {
        op_step_done(op);
        return;
    }
    if (op->kind == OP_CONFIG && op->step == STEP_PREPARE)
        config_apply_prepare_sent(op);
}

static int op_target_cmp(const void *a, const void *b, void *arg)
{
    const op_target *t = arg;
    return strcmp(t[*(const int *)a].node_id, t[*(const int *)b].node_id);
}

void op_send_before(operator_op *op, op_step step, const char *type, json_t *args,
                    state_proxy *const *targets, int n, const op_before *before)
{
    op->step = step;
    op->command_id = 0; /* no late acknowledgement of the last step counts for this one */
    free(op->targets);
    free(op->by_id);
    op->targets = calloc(n > 0 ? (size_t)n : 1, sizeof(*op->targets));
    op->by_id = calloc(n > 0 ? (size_t)n : 1, sizeof(*op->by_id));
    op->n_targets = 0;
    op_send_job *j = calloc(1, sizeof(*j));
    if (j) {
        j->ids = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->ids));
        j->id_text = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->id_text));
    }
    if (!op->targets || !op->by_id || !j || !j->ids || !j->id_text) {
        json_decref(args);
        if (j)
            op_send_free(j);
        op_finish_error(op, 500, "out of memory");
        return;
    }
    for (int i = 0; i < n; i++) {
        snprintf(op->targets[i].node_id, STATE_NODE_ID_MAX, "%s", targets[i]->node_id);
        snprintf(j->id_text[i], STATE_NODE_ID_MAX, "%s", targets[i]->node_id);
        j->ids[i] = j->id_text[i];
        op->by_id[i] = i;
    }
    op->n_targets = n;
    qsort_r(op->by_id, (size_t)n, sizeof(*op->by_id), op_target_cmp, op->targets);
    if (n == 0 && !before) {
        json_decref(args);
        op_send_free(j);
        op_step_done(op);
        return;
    }
    snprintf(j->deployment, sizeof(j->deployment), "%s", op->dep->name);
    j->serial = op->serial;
    if (before) {
        j->before = *before;
        snprintf(j->kind, sizeof(j->kind), "%s", op_kind_names[op->kind]);
        snprintf(j->step_name, sizeof(j->step_name), "%s", op_step_name(step));
        snprintf(j->node, sizeof(j->node), "%s", op->node);
        snprintf(j->old_leader, sizeof(j->old_leader), "%s", op->old_leader);
        snprintf(j->runner, sizeof(j->runner), "%s", op->runner);
        j->promote = op->promote;
        j->force = op->force;
        j->fenced = op->fenced;
        j->promote_sent = op->promote_sent;
        j->timeout_s = op->timeout_s;
        j->op_id = op->op_id;
    }
    snprintf(j->type, sizeof(j->type), "%s", type);
    j->args = args;
    j->n = n;
    j->job.run = op_send_run;
    j->job.done = op_send_done;
    if (op_arm_deadline(op) != 0) { /* the deadline also bounds the wait for the store */
        op_send_free(j);
        return;
    }
    op_store_wait(op);
    store_worker_submit(&j->job);
}

void op_send(operator_op *op, op_step step, const char *type, json_t *args,
             state_proxy *const *targets, int n)
{
    op_send_before(op, step, type, args, targets, n, NULL);
}

void op_send_live(operator_op *op, op_step step, const char *type, json_t *args)
{
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    if (n < 0) { /* refused rather than sent to fewer than every live proxy */
        json_decref(args);
        op_finish_error(op, 500, "out of memory listing the live proxies");
        return;
    }
    op_send(op, step, type, args, live, n);
    free(live);
}

/* Every target of the current step answered. */
static void op_step_done(operator_op *op)
{
    if (op->timer)
        evtimer_del(op->timer);
    switch (op->step) {
    case STEP_MAINTENANCE:
    case STEP_RELOAD:
        op_finish(op, 200,
                  json_pack("{s:b, s:o}", "ok", op_all_ok(op), "proxies", op_answers(op, "")));
        return;
    case STEP_PREPARE:
    case STEP_CONFIG_HOLD:
    case STEP_COMMIT:
        config_apply_step_done(op);
        return;
    default:
        switchover_step_done(op);
        return;
    }
}

static void op_timeout(evutil_socket_t fd, short what, void *arg)
{
    operator_op *op = arg;
    char pending[OPERATOR_DETAIL_MAX];
    char msg[OPERATOR_DETAIL_MAX];
    (void)fd;
    (void)what;
    if (op->finishing)
        return;
    if (op->in_store > 0) { /* decided once what the store is doing for it is back */
        op->timed_out = true;
        return;
    }

    op_pending_detail(op, pending, sizeof(pending));
    snprintf(msg, sizeof(msg), "not done within %" PRId64 "s", op->timeout_s);
    log_warning("deployment %s: %s: %s", op->dep->name, op_kind_names[op->kind], msg);
    switch (op->step) {
    case STEP_MAINTENANCE:
    case STEP_RELOAD:
        snprintf(msg, sizeof(msg), "not every proxy answered within %" PRId64 "s", op->timeout_s);
        op_finish(op, 504,
                  json_pack("{s:b, s:s, s:o}", "ok", 0, "error", msg, "proxies",
                            op_answers(op, pending)));
        return;
    case STEP_PREPARE:
    case STEP_CONFIG_HOLD:
    case STEP_COMMIT:
        config_apply_timeout(op);
        return;
    default:
        switchover_timeout(op, msg, pending);
        return;
    }
}

op_target *op_target_find(operator_op *op, const char *node_id)
{
    int lo = 0, hi = op->n_targets - 1;
    while (lo <= hi) { /* by_id: the targets in node_id order */
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(node_id, op->targets[op->by_id[mid]].node_id);
        if (c == 0)
            return &op->targets[op->by_id[mid]];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

void operator_on_ack(state_deployment *dep, int64_t command_id, const char *node_id, bool ok,
                     const char *detail)
{
    operator_op *op = dep->op;
    if (!op || op->finishing || op->command_id <= 0 || op->command_id != command_id)
        return;
    op_target *t = op_target_find(op, node_id);
    if (!t || t->answer != OP_PENDING)
        return;
    t->answer = ok ? OP_OK : OP_REFUSED;
    snprintf(t->detail, sizeof(t->detail), "%s", detail);

    if (!ok && op->step == STEP_PREPARE) {
        config_apply_refused(op, node_id, detail);
        return;
    }
    if (!ok && op->kind != OP_CONFIG && op->kind != OP_MAINTENANCE && op->kind != OP_RELOAD &&
        op->step != STEP_PAUSE && op->step != STEP_SET_LEADER && op->step != STEP_RESUME) {
        if (op->timer)
            evtimer_del(op->timer);
        switchover_refused(op, node_id, detail);
        return;
    }
    if (op_all_answered(op))
        op_step_done(op);
}

bool operator_leadership_frozen(state_deployment *dep)
{
    return (dep->op && dep->op->kind == OP_SWITCHOVER) || operation_recovering();
}

void operator_cancel_all(const char *reason)
{
    config_watch_stop();
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        operator_op *op = d->op;
        if (!op)
            continue;
        d->op = NULL;
        if (op->finishing) { /* decided: its answer, though its writes may not have landed */
            http_reply_json(op->req, op->finish_code, op->finish_body);
            op->finish_body = NULL;
        } else {
            http_reply_json(op->req, 503, json_pack("{s:b, s:s}", "ok", 0, "error", reason));
        }
        op_free(op);
    }
}

/* ---- starting an orchestration ---- */

operator_op *op_begin(http_call *call, op_kind kind)
{
    int64_t timeout_s = OPERATOR_DEFAULT_TIMEOUT_S;
    if (call->dep->op) {
        http_reply_error(call->req, 409, "a %s is in progress on deployment %s",
                         op_kind_names[call->dep->op->kind], call->dep->name);
        return NULL;
    }
    if (operation_recovering()) { /* it could act before a left-over one is undone */
        http_reply_error(call->req, 503,
                         "recovering the operations another replica left running; try again");
        return NULL;
    }
    if (call->dep->deleting > 0) { /* it would address a proxy that is leaving */
        http_reply_error(call->req, 409, "a proxy of deployment %s is being deleted; try again",
                         call->dep->name);
        return NULL;
    }
    if (!http_field_int(call, call->body, NULL, "timeout_s", false, 1, OPERATOR_MAX_TIMEOUT_S,
                        &timeout_s))
        return NULL;
    operator_op *op = calloc(1, sizeof(*op));
    if (!op) {
        http_reply_error(call->req, 500, "out of memory");
        return NULL;
    }
    static uint64_t serials;
    op->serial = ++serials;
    op->dep = call->dep;
    op->req = call->req;
    op->kind = kind;
    op->timeout_s = timeout_s;
    op->deadline_ms = control_mono_ms() + timeout_s * 1000;
    call->dep->op = op;
    return op;
}

/* The operator's maintenance is in the store (or not: 503): send it. */
static void operator_maintenance_saved(const char *deployment, int64_t id, const char *error,
                                       void *arg)
{
    operator_op *op = op_find(deployment, (uint64_t)(uintptr_t)arg);
    if (!op) /* ended meanwhile (lease lost, shutdown): the next holder loads the store */
        return;
    if (id < 0) {
        char msg[OPERATOR_DETAIL_MAX];
        snprintf(msg, sizeof(msg), "store unreachable: cannot record the maintenance: %s", error);
        if (op_store_back(op))
            op_finish_error(op, 503, msg);
        return;
    }
    /* The store holds it now: so does this replica, and the proxies are told, even when the
     * deadline passed meanwhile (op_send's deadline then answers 504 with them pending) */
    op->in_store--;
    op->timed_out = false;
    int64_t until_ms =
        op->on && op->resume_after_s > 0 ? op->started_ms + op->resume_after_s * 1000 : 0;
    if (maintenance_wanted(op->dep, op->on, until_ms) != 0) {
        op_finish_error(op, 500, "out of memory");
        return;
    }
    state_proxy **targets = NULL; /* maintenance_exempt proxies are left out */
    int n = members_maintenance_targets(op->dep, &targets);
    if (n < 0) {
        op_finish_error(op, 500, "out of memory listing the live proxies");
        return;
    }
    /* a pause with an end (pause_lease, renewed by maintenance.c), or off */
    op_send(op, STEP_MAINTENANCE, "maintenance", maintenance_args(op->dep), targets, n);
    free(targets);
}

void operator_maintenance(http_call *call)
{
    bool on = false;
    int64_t resume_after_s = 0;
    if (!http_field_bool(call, call->body, NULL, "on", true, &on) ||
        !http_field_int(call, call->body, NULL, "resume_after_s", false, 0, INT32_MAX,
                        &resume_after_s))
        return;
    operator_op *op = op_begin(call, OP_MAINTENANCE);
    if (!op)
        return;
    op->on = on;
    op->resume_after_s = resume_after_s;
    op->started_ms = control_now_ms();
    log_info("deployment %s: maintenance %s requested", call->dep->name, on ? "on" : "off");
    /* durable first: a control plane that dies now leaves the next one to renew or end it */
    int64_t until_ms = on && resume_after_s > 0 ? op->started_ms + resume_after_s * 1000 : 0;
    if (op_arm_deadline(op) != 0)
        return;
    op_store_wait(op);
    store_queue_maintenance(op->dep->name, on, until_ms, operator_maintenance_saved,
                            (void *)(uintptr_t)op->serial);
}

void operator_reload(http_call *call)
{
    operator_op *op = op_begin(call, OP_RELOAD);
    if (!op)
        return;
    op_send_live(op, STEP_RELOAD, "reload", json_object());
}
