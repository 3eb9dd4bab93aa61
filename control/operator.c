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

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const op_kind_names[] = {"maintenance", "reload", "switchover", "config",
                                            "unfence"};

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
    free(op->targets);
    free(op->text);
    free(op);
}

void op_finish(operator_op *op, int code, json_t *body)
{
    log_info("deployment %s: %s finished (%d)", op->dep->name, op_kind_names[op->kind], code);
    op->dep->op = NULL;
    http_reply_json(op->req, code, body);
    op_free(op);
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

void op_fire(state_deployment *dep, const char *node_id, const char *type, json_t *args)
{
    state_proxy **live = NULL;
    int n;
    if (node_id) {
        state_proxy *p = state_find_proxy(dep, node_id);
        live = p ? malloc(sizeof(*live)) : NULL;
        n = live ? 1 : 0;
        if (live)
            live[0] = p;
    } else {
        n = state_live_proxies(dep, &live);
    }
    if (n < 0)
        log_error("deployment %s: cannot queue %s: out of memory", dep->name, type);
    if (n > 0) {
        if (store_command_create(dep->name, type, args, live, n) < 0)
            log_error("deployment %s: cannot queue %s: %s", dep->name, type, store_error());
        for (int i = 0; i < n; i++)
            agents_wake(live[i]);
    }
    free(live);
    json_decref(args);
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

void op_send(operator_op *op, op_step step, const char *type, json_t *args,
                    state_proxy *const *targets, int n)
{
    op->step = step;
    free(op->targets);
    op->targets = calloc(n > 0 ? (size_t)n : 1, sizeof(*op->targets));
    op->n_targets = 0;
    if (!op->targets) {
        json_decref(args);
        op_finish_error(op, 500, "out of memory");
        return;
    }
    for (int i = 0; i < n; i++)
        snprintf(op->targets[op->n_targets++].node_id, STATE_NODE_ID_MAX, "%s",
                 targets[i]->node_id);
    if (n == 0) {
        json_decref(args);
        op->command_id = 0;
        op_step_done(op);
        return;
    }
    op->command_id = store_command_create(op->dep->name, type, args, targets, n);
    json_decref(args);
    if (op->command_id < 0) {
        char msg[OPERATOR_DETAIL_MAX];
        snprintf(msg, sizeof(msg), "store unreachable: %s", store_error());
        op_finish_error(op, 503, msg);
        return;
    }
    log_info("deployment %s: %s: command %" PRId64 " (%s) to %d prox%s", op->dep->name,
             op_kind_names[op->kind], op->command_id, type, n, n == 1 ? "y" : "ies");
    if (op_arm_deadline(op) != 0)
        return;
    for (int i = 0; i < n; i++)
        agents_wake(targets[i]);
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

    op_pending_detail(op, pending, sizeof(pending));
    snprintf(msg, sizeof(msg), "not done within %" PRId64 "s", op->timeout_s);
    log_warning("deployment %s: %s: %s", op->dep->name, op_kind_names[op->kind], msg);
    switch (op->step) {
    case STEP_MAINTENANCE:
    case STEP_RELOAD:
        snprintf(msg, sizeof(msg), "not every proxy answered within %" PRId64 "s",
                 op->timeout_s);
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

void operator_on_ack(state_deployment *dep, int64_t command_id, const char *node_id, bool ok,
                     const char *detail)
{
    operator_op *op = dep->op;
    if (!op || op->command_id != command_id)
        return;
    op_target *t = NULL;
    for (int i = 0; i < op->n_targets; i++)
        if (strcmp(op->targets[i].node_id, node_id) == 0)
            t = &op->targets[i];
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
    return dep->op && dep->op->kind == OP_SWITCHOVER;
}

void operator_cancel_all(const char *reason)
{
    config_watch_stop();
    for (state_deployment *d = state_deployments(); d; d = d->next) {
        operator_op *op = d->op;
        if (!op)
            continue;
        d->op = NULL;
        http_reply_json(op->req, 503, json_pack("{s:b, s:s}", "ok", 0, "error", reason));
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
    log_info("deployment %s: maintenance %s requested", call->dep->name, on ? "on" : "off");
    /* durable first: a control plane that dies now leaves the next one to renew or end it */
    int64_t until_ms = on && resume_after_s > 0 ? control_now_ms() + resume_after_s * 1000 : 0;
    if (maintenance_want(op->dep, on, until_ms) != 0) {
        char msg[OPERATOR_DETAIL_MAX];
        snprintf(msg, sizeof(msg), "store unreachable: cannot record the maintenance: %s",
                 store_error());
        op_finish_error(op, 503, msg);
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

void operator_reload(http_call *call)
{
    operator_op *op = op_begin(call, OP_RELOAD);
    if (!op)
        return;
    op_send_live(op, STEP_RELOAD, "reload", json_object());
}
