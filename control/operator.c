/* operator.c - operator orchestrations: maintenance, reload, switchover, and the two-phase
 * configuration apply (the read-only endpoints are in views.c).
 *
 * An orchestration ("op") belongs to one deployment (one at a time; another is 409) and runs
 * as a sequence of steps. Each step queues one command for a set of proxies (durable in the
 * store, delivered by the long poll), then waits for their acknowledgements or for timeout_s.
 * The operator's HTTP request is held open until the op ends and is answered then.
 */
#include "operator.h"
#include "agents.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "members.h"
#include "store.h"

#include <event2/event.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OPERATOR_TEXT_MAX   (1024 * 1024) /* longest pgrelay.ini text accepted */
#define OPERATOR_DETAIL_MAX 512
#define OPERATOR_NODE_MAX   (STATE_NODE_NAME_MAX - 1)

/* What an orchestration does. */
typedef enum op_kind {
    OP_MAINTENANCE, /* maintenance on or off on every live proxy */
    OP_RELOAD,      /* reload on every live proxy */
    OP_SWITCHOVER,  /* [maintenance on, promote,] set_leader, [maintenance off] */
    OP_CONFIG,      /* config_prepare everywhere, then config_commit (or config_abort) */
} op_kind;

static const char *const op_kind_names[] = {"maintenance", "reload", "switchover", "config"};

/* Environment variable of the fault-injection tests: an orchestration whose step it names
 * (pause, promote, switch, resume) is done holds there, acting on nothing more, until its
 * deadline, so that a test can kill the control plane after that step. Never set it in
 * production. */
#define OPERATOR_TEST_HOLD_ENV "PGRELAY_CONTROL_TEST_HOLD"

/* Where an orchestration is. */
typedef enum op_step {
    STEP_MAINTENANCE, /* OP_MAINTENANCE: waiting for the maintenance acks */
    STEP_RELOAD,      /* OP_RELOAD: waiting for the reload acks */
    STEP_PAUSE,       /* switchover with promote: maintenance on everywhere */
    STEP_PROMOTE,     /* switchover with promote: one proxy promotes the node */
    STEP_SET_LEADER,  /* switchover: set_leader everywhere */
    STEP_RESUME,      /* switchover with promote: maintenance off everywhere */
    STEP_PREPARE,     /* config: config_prepare everywhere */
    STEP_COMMIT,      /* config: config_commit everywhere */
} op_step;

/* A step's name in the log and for OPERATOR_TEST_HOLD_ENV (NULL: not a switchover step). */
static const char *op_step_name(op_step step)
{
    switch (step) {
    case STEP_PAUSE:
        return "pause";
    case STEP_PROMOTE:
        return "promote";
    case STEP_SET_LEADER:
        return "switch";
    case STEP_RESUME:
        return "resume";
    default:
        return NULL;
    }
}

/* One proxy's answer in the current step. */
typedef enum op_answer {
    OP_PENDING = 0, /* not acknowledged yet */
    OP_OK,          /* acknowledged with ok: true */
    OP_REFUSED,     /* acknowledged with ok: false */
} op_answer;

typedef struct op_target {
    char node_id[STATE_NODE_ID_MAX];
    op_answer answer;
    char detail[OPERATOR_DETAIL_MAX];
} op_target;

typedef struct operator_op {
    state_deployment *dep;
    struct evhttp_request *req; /* the operator's request, answered at the end */
    op_kind kind;
    op_step step;
    int64_t timeout_s;   /* the whole orchestration ends within this (the operator's timeout) */
    int64_t deadline_ms; /* monotonic time at which it ends, done or not */
    struct event *timer; /* the current step's deadline */
    int64_t command_id;  /* the current step's command */
    op_target *targets;  /* the current step's proxies */
    int n_targets;

    /* maintenance */
    bool on;
    int64_t resume_after_s; /* passed on: maintenance ends by itself after it */
    /* switchover */
    char node[STATE_NODE_NAME_MAX];
    char old_leader[STATE_NODE_NAME_MAX];
    bool promote;
    char promoted_by[STATE_NODE_ID_MAX];
    json_t *leader_answers; /* set_leader answers, kept through the resume step */
    bool leader_ok;         /* every set_leader was acknowledged ok */
    /* config */
    int64_t version;
    char *text;
    int64_t prepare_id; /* the config_prepare command */
} operator_op;

/* ---- answers ---- */

/* The current step's answers as [{"node_id", "ok", "detail"}]. */
static json_t *op_answers(const operator_op *op, const char *pending_detail)
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

static bool op_all_ok(const operator_op *op)
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
    free(op->targets);
    free(op->text);
    free(op);
}

/* Answer the operator (body stolen) and end the op. */
static void op_finish(operator_op *op, int code, json_t *body)
{
    log_info("deployment %s: %s finished (%d)", op->dep->name, op_kind_names[op->kind], code);
    op->dep->op = NULL;
    http_reply_json(op->req, code, body);
    op_free(op);
}

static void op_finish_error(operator_op *op, int code, const char *msg)
{
    op_finish(op, code, json_pack("{s:b, s:s}", "ok", 0, "error", msg));
}

static void op_pending_detail(const operator_op *op, char *buf, size_t len)
{
    snprintf(buf, len, "no answer within %" PRId64 "s", op->timeout_s);
}

/* ---- steps ---- */

/* Args of a maintenance command (resume_after_s > 0: it ends by itself then). */
static json_t *op_maintenance_args(bool on, int64_t resume_after_s)
{
    return json_pack("{s:b, s:I}", "on", on, "resume_after_s", (json_int_t)resume_after_s);
}

/* Milliseconds left before the orchestration's deadline (0 when it has passed). */
static int64_t op_left_ms(const operator_op *op)
{
    int64_t left = op->deadline_ms - control_mono_ms();
    return left > 0 ? left : 0;
}

/* Args of a fleet-wide pause that ends by itself (the dead-man time): the orchestration's
 * deadline plus OPERATOR_PAUSE_MARGIN_S, as a delay and as a wall-clock time, so that a
 * proxy that never hears from the control plane again, or hears this late, resumes then. */
static json_t *op_pause_args(const operator_op *op)
{
    int64_t end_ms = op_left_ms(op) + OPERATOR_PAUSE_MARGIN_S * 1000;
    return json_pack("{s:b, s:I, s:I}", "on", 1, "resume_after_s",
                     (json_int_t)((end_ms + 999) / 1000), "until_ms",
                     (json_int_t)(control_now_ms() + end_ms));
}

static void op_timeout(evutil_socket_t fd, short what, void *arg);
static void op_step_done(operator_op *op);

/* Queue a command (args stolen) that nobody waits for: rolling back after a failure. */
static void op_fire(state_deployment *dep, const char *type, json_t *args)
{
    state_proxy **live = NULL;
    int n = state_live_proxies(dep, &live);
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

/* Arm the timer for the orchestration's deadline. Returns 0, or -1 after ending the op. */
static int op_arm_deadline(operator_op *op)
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

/* The test hook OPERATOR_TEST_HOLD_ENV names the step just done: wait for the deadline. */
static bool op_test_hold(operator_op *op)
{
    const char *hold = getenv(OPERATOR_TEST_HOLD_ENV);
    const char *name = op_step_name(op->step);
    if (!hold || !name || strcmp(hold, name) != 0)
        return false;
    log_warning("deployment %s: %s holds after its %s step until its deadline (%s is set: a "
                "test hook)", op->dep->name, op_kind_names[op->kind], name, OPERATOR_TEST_HOLD_ENV);
    op->command_id = 0;
    op_arm_deadline(op);
    return true;
}

/* Start a step: queue the command (args stolen) for targets and wait. May end the op (no
 * target, or the store failed): the caller must not touch op afterwards. */
static void op_send(operator_op *op, op_step step, const char *type, json_t *args,
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
    if (step == STEP_PREPARE)
        op->prepare_id = op->command_id;
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

/* Send to every live proxy. */
static void op_send_live(operator_op *op, op_step step, const char *type, json_t *args)
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

static void op_send_set_leader(operator_op *op)
{
    if (leader_set(op->dep, op->node, op->dep->epoch + 1) != 0) {
        char msg[OPERATOR_DETAIL_MAX];
        snprintf(msg, sizeof(msg), "store unreachable: %s", store_error());
        if (op->promote)
            op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
        op_finish_error(op, 503, msg);
        return;
    }
    op_send_live(op, STEP_SET_LEADER, "set_leader",
                 json_pack("{s:s, s:I}", "leader", op->node, "epoch", (json_int_t)op->dep->epoch));
}

/* The proxy that runs the promote: a live one that sees the node up, else any live one. */
static state_proxy *op_promoter(operator_op *op)
{
    state_proxy **live = NULL, *found = NULL;
    int n = state_live_proxies(op->dep, &live);
    for (int i = 0; i < n && !found; i++) {
        size_t j;
        json_t *obs;
        json_array_foreach(live[i]->nodes, j, obs)
        {
            const char *name = json_string_value(json_object_get(obs, "name"));
            const char *health = json_string_value(json_object_get(obs, "health"));
            if (name && health && strcmp(name, op->node) == 0 && strcmp(health, "up") == 0)
                found = live[i];
        }
    }
    if (!found && n > 0)
        found = live[0];
    free(live);
    return found;
}

/* Two-phase apply failed (refusal or silence): abort everywhere and answer code. */
static void op_config_abort(operator_op *op, int code, const char *why)
{
    char pending[OPERATOR_DETAIL_MAX];
    state_proxy **targets = calloc(op->n_targets > 0 ? (size_t)op->n_targets : 1, sizeof(*targets));
    int n = 0;

    if (code == 504)
        op_pending_detail(op, pending, sizeof(pending));
    else
        snprintf(pending, sizeof(pending), "no answer yet (aborted)");
    json_t *answers = op_answers(op, pending);
    if (store_config_decide(op->dep->name, op->version, "aborted") != 0 ||
        store_command_cancel(op->prepare_id, "cancelled: the apply was aborted") != 0)
        log_error("deployment %s: cannot record the abort of version %" PRId64 ": %s",
                  op->dep->name, op->version, store_error());
    for (int i = 0; i < op->n_targets && targets; i++) {
        state_proxy *p = state_find_proxy(op->dep, op->targets[i].node_id);
        if (p)
            targets[n++] = p;
    }
    json_t *args = json_pack("{s:I}", "version", (json_int_t)op->version);
    if (n > 0 && store_command_create(op->dep->name, "config_abort", args, targets, n) < 0)
        log_error("deployment %s: cannot queue config_abort: %s", op->dep->name, store_error());
    json_decref(args);
    for (int i = 0; i < n; i++)
        agents_wake(targets[i]);
    free(targets);
    log_warning("deployment %s: configuration version %" PRId64 " aborted: %s", op->dep->name,
                op->version, why);
    op_finish(op, code,
              json_pack("{s:b, s:s, s:I, s:o}", "ok", 0, "error", why, "version",
                        (json_int_t)op->version, "proxies", answers));
}

/* Every target of the current step answered. */
static void op_step_done(operator_op *op)
{
    if (op->timer)
        evtimer_del(op->timer);
    if (op_test_hold(op))
        return;
    switch (op->step) {
    case STEP_MAINTENANCE:
    case STEP_RELOAD:
        op_finish(op, 200,
                  json_pack("{s:b, s:o}", "ok", op_all_ok(op), "proxies", op_answers(op, "")));
        return;
    case STEP_PAUSE: {
        if (!op_all_ok(op)) {
            json_t *answers = op_answers(op, "");
            op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
            op_finish(op, 409,
                      json_pack("{s:b, s:s, s:o}", "ok", 0, "error",
                                "a proxy refused maintenance; switchover abandoned", "proxies",
                                answers));
            return;
        }
        state_proxy *p = op_promoter(op);
        if (!p) {
            op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
            op_finish_error(op, 409, "no live proxy can run the promote");
            return;
        }
        snprintf(op->promoted_by, sizeof(op->promoted_by), "%s", p->node_id);
        int64_t lsn = op->old_leader[0] ? leader_highest_lsn(op->dep, op->old_leader) : 0;
        op_send(op, STEP_PROMOTE, "promote",
                json_pack("{s:s, s:s, s:I, s:I}", "node", op->node, "old", op->old_leader,
                          "wait_lsn", (json_int_t)lsn, "timeout_s",
                          (json_int_t)((op_left_ms(op) + 999) / 1000)),
                &p, 1);
        return;
    }
    case STEP_PROMOTE:
        op_send_set_leader(op);
        return;
    case STEP_SET_LEADER:
        if (!op->promote) {
            op_finish(op, 200,
                      json_pack("{s:b, s:s, s:I, s:o}", "ok", op_all_ok(op), "leader", op->node,
                                "epoch", (json_int_t)op->dep->epoch, "proxies",
                                op_answers(op, "")));
            return;
        }
        op->leader_answers = op_answers(op, "");
        op->leader_ok = op_all_ok(op);
        op_send_live(op, STEP_RESUME, "maintenance", op_maintenance_args(false, 0));
        return;
    case STEP_RESUME:
        op_finish(op, 200,
                  json_pack("{s:b, s:s, s:I, s:s, s:O}", "ok", op->leader_ok && op_all_ok(op),
                            "leader", op->node, "epoch", (json_int_t)op->dep->epoch, "promoted_by",
                            op->promoted_by, "proxies", op->leader_answers));
        return;
    case STEP_PREPARE:
        if (store_config_decide(op->dep->name, op->version, "committed") != 0) {
            op_config_abort(op, 503, "store unreachable: cannot record the commit");
            return;
        }
        log_info("deployment %s: configuration version %" PRId64 " committed", op->dep->name,
                 op->version);
        op_send_live(op, STEP_COMMIT, "config_commit",
                     json_pack("{s:I}", "version", (json_int_t)op->version));
        return;
    case STEP_COMMIT:
        op_finish(op, 200,
                  json_pack("{s:b, s:I, s:o}", "ok", 1, "version", (json_int_t)op->version,
                            "proxies", op_answers(op, "commit queued, not acknowledged yet")));
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
    snprintf(msg, sizeof(msg), "not every proxy answered within %" PRId64 "s", op->timeout_s);
    log_warning("deployment %s: %s: %s", op->dep->name, op_kind_names[op->kind], msg);
    switch (op->step) {
    case STEP_MAINTENANCE:
    case STEP_RELOAD:
        op_finish(op, 504,
                  json_pack("{s:b, s:s, s:o}", "ok", 0, "error", msg, "proxies",
                            op_answers(op, pending)));
        return;
    case STEP_PROMOTE:
        /* a promote that runs late could make two primaries: take it back */
        store_command_cancel(op->command_id, "cancelled: the switchover timed out");
        /* fall through */
    case STEP_PAUSE: {
        json_t *answers = op_answers(op, pending);
        op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
        op_finish(op, 504, json_pack("{s:b, s:s, s:o}", "ok", 0, "error", msg, "proxies", answers));
        return;
    }
    case STEP_SET_LEADER: {
        json_t *answers = op_answers(op, pending);
        if (op->promote)
            op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
        op_finish(op, 504,
                  json_pack("{s:b, s:s, s:s, s:I, s:o}", "ok", 0, "error", msg, "leader", op->node,
                            "epoch", (json_int_t)op->dep->epoch, "proxies", answers));
        return;
    }
    case STEP_RESUME:
        op_finish(op, 504,
                  json_pack("{s:b, s:s, s:s, s:I, s:s, s:O, s:o}", "ok", 0, "error", msg, "leader",
                            op->node, "epoch", (json_int_t)op->dep->epoch, "promoted_by",
                            op->promoted_by, "proxies", op->leader_answers, "resume",
                            op_answers(op, pending)));
        return;
    case STEP_PREPARE:
        op_config_abort(op, 504, msg);
        return;
    case STEP_COMMIT:
        op_step_done(op); /* committed: the commits stay queued */
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
        char why[OPERATOR_DETAIL_MAX];
        snprintf(why, sizeof(why), "proxy %s refused the configuration: %s", node_id, detail);
        op_config_abort(op, 409, why);
        return;
    }
    if (!ok && op->step == STEP_PROMOTE) {
        char why[OPERATOR_DETAIL_MAX];
        snprintf(why, sizeof(why), "promote of %s failed on proxy %s: %s", op->node, node_id,
                 detail);
        json_t *answers = op_answers(op, "");
        op_fire(op->dep, "maintenance", op_maintenance_args(false, 0));
        op_finish(op, 409, json_pack("{s:b, s:s, s:o}", "ok", 0, "error", why, "proxies", answers));
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

/* A new op for the call, or NULL after answering 409 (another one runs) or 400. */
static operator_op *op_begin(http_call *call, op_kind kind)
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
    state_proxy **targets = NULL; /* maintenance_exempt proxies are left out */
    int n = members_maintenance_targets(op->dep, &targets);
    if (n < 0) {
        op_finish_error(op, 500, "out of memory listing the live proxies");
        return;
    }
    op_send(op, STEP_MAINTENANCE, "maintenance", op_maintenance_args(on, resume_after_s), targets,
            n);
    free(targets);
}

void operator_reload(http_call *call)
{
    operator_op *op = op_begin(call, OP_RELOAD);
    if (!op)
        return;
    op_send_live(op, STEP_RELOAD, "reload", json_object());
}

void operator_switchover(http_call *call)
{
    const char *node = NULL;
    bool promote = false;
    if (!http_field_string(call, call->body, NULL, "node", true, OPERATOR_NODE_MAX, &node) ||
        !http_field_bool(call, call->body, NULL, "promote", false, &promote))
        return;
    if (!node[0]) {
        http_reply_error(call->req, 400, "field node must not be empty");
        return;
    }
    if (!leader_node_known(call->dep, node)) {
        http_reply_error(call->req, 404, "unknown node %s: no proxy of deployment %s observes it",
                         node, call->dep->name);
        return;
    }
    operator_op *op = op_begin(call, OP_SWITCHOVER);
    if (!op)
        return;
    snprintf(op->node, sizeof(op->node), "%s", node);
    snprintf(op->old_leader, sizeof(op->old_leader), "%s", call->dep->leader);
    op->promote = promote;
    log_info("deployment %s: switchover to %s%s requested", call->dep->name, node,
             promote ? " with promote" : "");
    if (promote)
        op_send_live(op, STEP_PAUSE, "maintenance", op_pause_args(op));
    else
        op_send_set_leader(op);
}

void operator_config_apply(http_call *call)
{
    const char *text = NULL;
    int64_t min_version = 0;
    if (!http_field_string(call, call->body, NULL, "text", true, OPERATOR_TEXT_MAX, &text))
        return;
    operator_op *op = op_begin(call, OP_CONFIG);
    if (!op)
        return;
    op->text = strdup(text);
    for (state_proxy *p = call->dep->proxies; p; p = p->next)
        if (p->config_version > min_version)
            min_version = p->config_version;
    op->version = op->text ? store_config_create(call->dep->name, text, min_version) : -1;
    if (op->version < 0) {
        char msg[OPERATOR_DETAIL_MAX];
        snprintf(msg, sizeof(msg), "store unreachable: %s", store_error());
        op_finish_error(op, op->text ? 503 : 500, msg);
        return;
    }
    log_info("deployment %s: configuration version %" PRId64 " proposed", call->dep->name,
             op->version);
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    if (n < 0) {
        op_finish_error(op, 500, "out of memory listing the live proxies");
        return;
    }
    json_t *args = json_pack("{s:I, s:s}", "version", (json_int_t)op->version, "text", text);
    op_send(op, STEP_PREPARE, "config_prepare", args, live, n);
    free(live);
}
