/* switchover.c - the switchover operation: pause, fence, [catch up, promote,] switch, resume;
 * and unfence.
 *
 * Every step is one command (operator.c's machinery): a pause with a dead-man end to every
 * live proxy; the fence of the old leader, the catch-up and the promote to one proxy (the
 * runner: one that sees the target up); set_leader and the resume to every live proxy. The
 * operator's timeout bounds the whole operation. A failure before the promote was queued
 * rolls back (unfence, resume); after it, the fence is kept (the target may be a primary)
 * and traffic resumes. An operation left running by another replica is finished by the next
 * lease holder when its record says the promote succeeded, else rolled back.
 */
#include "agents.h"
#include "control.h"
#include "leader.h"
#include "log.h"
#include "maintenance.h"
#include "operator_internal.h"
#include "store.h"
#include "store_queue.h"
#include "store_worker.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Environment variable of the fault-injection tests: a switchover whose step it names
 * (pause, fence, catch_up, promote, switch, resume) is done holds there, acting on nothing
 * more, until its deadline, so that a test can kill the control plane after that step.
 * Never set it in production. */
#define SWITCHOVER_TEST_HOLD_ENV "PGRELAY_CONTROL_TEST_HOLD"

/* Remember what the current step did (its single or first answer). */
static void switchover_note(operator_op *op, const char *what)
{
    if (!op->record)
        op->record = json_object();
    json_object_set_new(op->record, op_step_name(op->step), json_string(what));
    store_queue_operation_note(op->dep->name, op->op_id, what);
}

static void switchover_roll_back(operator_op *op, int code, const char *error);

/* Start a step: record it in the store first (a step is recorded before it is acted on),
 * then queue its command, which carries the operation's id (args stolen); both by the store
 * worker, in one job. */
static void switchover_send(operator_op *op, op_step step, const char *type, json_t *args,
                            state_proxy *const *targets, int n)
{
    op_before before = {.record = true};
    op_send_before(op, step, type, args, targets, n, &before);
}

void switchover_not_recorded(operator_op *op, bool create_failed, bool leader_failed,
                             const char *error)
{
    char why[OPERATOR_DETAIL_MAX];
    if (create_failed) {
        snprintf(why, sizeof(why), "store unreachable: cannot record the operation: %s", error);
        op_finish_error(op, 503, why);
        return;
    }
    if (leader_failed)
        snprintf(why, sizeof(why), "switch step: store unreachable: %s", error);
    else
        snprintf(why, sizeof(why), "%s step: cannot record it: %s", op_step_name(op->step), error);
    op->promote_sent = op->promote_sent && op->step != STEP_PROMOTE;
    switchover_roll_back(op, 503, why);
}

/* The declared proxies that are not live (silent past proxy_timeout, or never seen), listed into
 * buf as "proxy-b (silent 12s), ..." (cut short with "..."): a switchover reaches none of them,
 * so nothing pauses them or tells them the new leader until they are back; they go on routing
 * to the old leader, whose fence is then all that keeps their writes off it. How many. */
static int switchover_silent(state_deployment *dep, char *buf, size_t len)
{
    int64_t now = control_now_ms();
    int n = 0;
    size_t off = 0;
    buf[0] = '\0';
    for (state_proxy *p = dep->proxies; p; p = p->next) {
        if (!p->declared || state_proxy_live(p, now))
            continue;
        char one[STATE_NODE_ID_MAX + 40];
        if (p->last_seen_ms > 0)
            snprintf(one, sizeof(one), "%s%s (silent %" PRId64 "s)", n ? ", " : "", p->node_id,
                     (now - p->last_seen_ms) / 1000);
        else
            snprintf(one, sizeof(one), "%s%s (never seen)", n ? ", " : "", p->node_id);
        n++;
        if (off + strlen(one) + 4 < len)
            off += (size_t)snprintf(buf + off, len - off, "%s", one);
        else if (off + 4 <= len && (off < 3 || strcmp(buf + off - 3, "...") != 0))
            off += (size_t)snprintf(buf + off, len - off, "...");
    }
    return n;
}

/* Args of the pause: it ends by itself at the deadline plus OPERATOR_PAUSE_MARGIN_S, as a
 * delay and as a wall-clock time, so that a proxy that never hears from the control plane
 * again, or hears this late, resumes then (the dead-man pause). */
static json_t *switchover_pause_args(const operator_op *op)
{
    int64_t end_ms = op_left_ms(op) + OPERATOR_PAUSE_MARGIN_S * 1000;
    return json_pack("{s:b, s:I, s:I}", "on", 1, "resume_after_s",
                     (json_int_t)((end_ms + 999) / 1000), "until_ms",
                     (json_int_t)(control_now_ms() + end_ms));
}

/* The proxy that fences, catches up and promotes: a live one that sees the node up, else any
 * live one. */
static state_proxy *switchover_runner(operator_op *op)
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

/* Some live proxy sees node up and in recovery. */
static bool switchover_in_recovery(state_deployment *dep, const char *node)
{
    state_proxy **live = NULL;
    bool found = false;
    int n = state_live_proxies(dep, &live);
    for (int i = 0; i < n && !found; i++) {
        size_t j;
        json_t *obs;
        json_array_foreach(live[i]->nodes, j, obs)
        {
            const char *name = json_string_value(json_object_get(obs, "name"));
            const char *health = json_string_value(json_object_get(obs, "health"));
            if (name && strcmp(name, node) == 0 && health && strcmp(health, "up") == 0 &&
                json_is_true(json_object_get(obs, "in_recovery")))
                found = true;
        }
    }
    free(live);
    return found;
}

/* Send a step to the runner (args stolen). */
static void switchover_send_runner(operator_op *op, op_step step, const char *type, json_t *args)
{
    state_proxy *p = state_find_proxy(op->dep, op->runner);
    if (!p) {
        char why[OPERATOR_DETAIL_MAX];
        json_decref(args);
        snprintf(why, sizeof(why), "proxy %s, which runs the fence and the promote, is gone",
                 op->runner);
        op->step = step;
        switchover_refused(op, "", why);
        return;
    }
    switchover_send(op, step, type, args, &p, 1);
}

/* The switch step: the new leader saved under a new epoch, the step recorded and set_leader
 * queued to every live proxy, in that order, by one store job. */
static void switchover_send_switch(operator_op *op)
{
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    op_before before = {.save_leader = true,
                        .epoch = leader_set_epoch(op->dep, op->dep->epoch + 1),
                        .record = true};
    op_send_before(op, STEP_SET_LEADER, "set_leader",
                   json_pack("{s:s, s:I}", "leader", op->node, "epoch", (json_int_t)before.epoch),
                   live, n > 0 ? n : 0, &before);
    free(live);
}

/* After the pause, the fence (or straight to the switch when there is no other leader). */
static void switchover_after_pause(operator_op *op)
{
    state_proxy *p = switchover_runner(op);
    if (!p) {
        switchover_refused(op, "", "no live proxy can run the fence and the promote");
        return;
    }
    snprintf(op->runner, sizeof(op->runner), "%s", p->node_id);
    if (op->old_leader[0] && strcmp(op->old_leader, op->node) != 0) {
        op->fenced = true; /* from now on it may be: a rollback lifts it */
        switchover_send_runner(op, STEP_FENCE, "fence",
                               json_pack("{s:s, s:b}", "node", op->old_leader, "force", op->force));
        return;
    }
    switchover_note(op, "no other leader to fence");
    if (op->promote) {
        op->promote_sent = true;
        switchover_send_runner(op, STEP_PROMOTE, "promote", json_pack("{s:s}", "node", op->node));
    } else {
        switchover_send_switch(op);
    }
}

/* The test hook SWITCHOVER_TEST_HOLD_ENV names the step just done: wait for the deadline. */
static bool switchover_test_hold(operator_op *op)
{
    const char *hold = getenv(SWITCHOVER_TEST_HOLD_ENV);
    const char *name = op_step_name(op->step);
    if (!hold || strcmp(hold, name) != 0)
        return false;
    log_warning("deployment %s: switchover holds after its %s step until its deadline (%s is "
                "set: a test hook)",
                op->dep->name, name, SWITCHOVER_TEST_HOLD_ENV);
    op->command_id = 0;
    op_arm_deadline(op);
    return true;
}

/* Record the end of the operation (state "done", "failed" or "rolled_back"). */
static void switchover_end(operator_op *op, const char *state, const char *outcome)
{
    store_queue_operation_end(op->dep->name, op->op_id, state, outcome);
}

/* The answer's body: the outcome, the leader and epoch, each step's record. */
static json_t *switchover_body(operator_op *op, bool ok, const char *error)
{
    /* "o" with a new reference: the op keeps its own record and answers ("O" on a fresh
     * json_object() or json_set on a fresh json_array() would leak it) */
    json_t *body =
        json_pack("{s:b, s:s, s:I, s:s, s:s, s:o}", "ok", ok, "leader", op->node, "epoch",
                  (json_int_t)op->dep->epoch, "promoted_by", op->runner, "runner", op->runner,
                  "steps", op->record ? json_incref(op->record) : json_object());
    if (error)
        json_object_set_new(body, "error", json_string(error));
    json_object_set_new(body, "proxies",
                        op->leader_answers ? json_incref(op->leader_answers) : json_array());
    if (op->force)
        json_object_set_new(body, "forced", json_true());
    return body;
}

/* The resume step: maintenance off on every live proxy; or, while the operator's maintenance
 * is on, its pause (with an end, renewed by maintenance.c) to the proxies it holds, waited for,
 * and maintenance off queued for the exempt ones. */
static void switchover_resume(operator_op *op)
{
    state_proxy **held, **rest;
    int nr = 0;
    int nh = maintenance_split(op->dep, false, &held, &rest, &nr);
    if (nh < 0) {
        op_finish_error(op, 500, "out of memory listing the live proxies");
    } else if (nh == 0) {
        switchover_send(op, STEP_RESUME, "maintenance", op_maintenance_args(false, 0), rest, nr);
    } else {
        store_queue_command(op->dep, "maintenance", op_maintenance_args(false, 0), rest, nr, NULL,
                            NULL);
        switchover_send(op, STEP_RESUME, "maintenance", maintenance_args(op->dep), held, nh);
    }
    free(held);
    free(rest);
}

void switchover_step_done(operator_op *op)
{
    const char *first = op->n_targets > 0 ? op->targets[0].detail : "";
    if (op->kind == OP_UNFENCE) {
        op_finish(op, 200,
                  json_pack("{s:b, s:s, s:s, s:o}", "ok", 1, "node", op->node, "detail", first,
                            "proxies", op_answers(op, "")));
        return;
    }
    if (op->step == STEP_PAUSE) {
        if (!op_all_ok(op)) {
            switchover_refused(op, "", "a proxy refused the pause");
            return;
        }
        char silent[OPERATOR_DETAIL_MAX / 2], note[OPERATOR_DETAIL_MAX];
        if (switchover_silent(op->dep, silent, sizeof(silent)) > 0) {
            snprintf(note, sizeof(note),
                     "every live proxy paused; not paused, declared but gone: %s (they reach "
                     "only the old leader, which the fence closes to them)",
                     silent);
            log_warning("deployment %s: switchover: %s", op->dep->name, note);
            switchover_note(op, note);
        } else {
            switchover_note(op, "every live proxy paused");
        }
    } else if (op->step == STEP_SET_LEADER) {
        op->leader_answers = op_answers(op, "");
        op->leader_ok = op_all_ok(op);
        switchover_note(op, op->leader_ok ? "every live proxy routes to the new leader"
                                          : "a proxy did not take the new leader");
    } else if (op->step != STEP_RESUME) {
        switchover_note(op, first);
    }
    if (switchover_test_hold(op))
        return;
    switch (op->step) {
    case STEP_PAUSE:
        switchover_after_pause(op);
        return;
    case STEP_FENCE:
        if (strncmp(first, "NOT FENCED", 10) == 0) {
            /* --force takes the risk of an old leader left writable, not that of a proxy
             * nobody can tell the new leader while it still routes writes to that one */
            char silent[OPERATOR_DETAIL_MAX / 2], why[OPERATOR_DETAIL_MAX];
            if (switchover_silent(op->dep, silent, sizeof(silent)) > 0) {
                snprintf(why, sizeof(why),
                         "%s is NOT FENCED and declared proxies nobody reaches may still route "
                         "writes to it: %s; refused even with --force: bring them back, or "
                         "delete-proxy the ones gone for good",
                         op->old_leader, silent);
                switchover_refused(op, "", why);
                return;
            }
            log_error("deployment %s: switchover goes on with %s NOT FENCED, as the operator "
                      "forced it: %s",
                      op->dep->name, op->old_leader, first);
        }
        if (!op->promote) {
            switchover_send_switch(op);
            return;
        }
        switchover_send_runner(op, STEP_CATCH_UP, "catch_up",
                               json_pack("{s:s, s:s, s:I, s:b}", "node", op->node, "old",
                                         op->old_leader, "timeout_ms", (json_int_t)op_left_ms(op),
                                         "force", op->force));
        return;
    case STEP_CATCH_UP:
        op->promote_sent = true;
        switchover_send_runner(op, STEP_PROMOTE, "promote", json_pack("{s:s}", "node", op->node));
        return;
    case STEP_PROMOTE:
        switchover_send_switch(op);
        return;
    case STEP_SET_LEADER:
        switchover_resume(op);
        return;
    case STEP_RESUME:
        switchover_note(op, op_all_ok(op) ? "every live proxy resumed" : "a proxy did not resume");
        switchover_end(op, op->leader_ok && op_all_ok(op) ? "done" : "failed",
                       op->leader_ok && op_all_ok(op) ? "switched" : "a proxy did not follow");
        op_finish(op, 200, switchover_body(op, op->leader_ok && op_all_ok(op), NULL));
        return;
    default:
        op_finish_error(op, 500, "switchover in an unknown step");
        return;
    }
}

/* Roll back what can be: unfence the old leader when nothing may have been promoted, resume
 * every proxy; then answer code with error. */
static void switchover_roll_back(operator_op *op, int code, const char *error)
{
    bool paused = op->step != STEP_PAUSE || op->n_targets > 0; /* resumed again in any case */
    /* a command that runs late (a promote could make two primaries): take them back */
    store_queue_operation_cancel(op->dep->name, op->op_id, "cancelled: the switchover ended");
    if (op->fenced && !op->promote_sent && op->runner[0]) {
        log_warning("deployment %s: switchover rolled back: lifting the fence of %s", op->dep->name,
                    op->old_leader);
        store_queue_command_one(op->dep, op->runner, "unfence",
                                json_pack("{s:s}", "node", op->old_leader));
        switchover_note(op, error);
        json_object_set_new(op->record, "rollback",
                            json_string("unfence queued, maintenance off queued"));
    } else {
        switchover_note(op, error);
        if (op->fenced)
            json_object_set_new(op->record, "rollback",
                                json_sprintf("%s stays fenced (a promote was sent); maintenance "
                                             "off queued",
                                             op->old_leader));
    }
    if (paused) /* off, or the operator's maintenance where it is on */
        maintenance_fire_resume(op->dep, false);
    log_warning("deployment %s: switchover to %s failed: %s", op->dep->name, op->node, error);
    switchover_end(op, op->promote_sent ? "failed" : "rolled_back", error);
    op_finish(op, code, switchover_body(op, false, error));
}

void switchover_timeout(operator_op *op, const char *msg, const char *pending)
{
    char why[OPERATOR_DETAIL_MAX];
    if (op->kind == OP_UNFENCE) {
        op_finish_error(op, 504, msg);
        return;
    }
    snprintf(why, sizeof(why), "%s step: %s%s%s", op_step_name(op->step), msg,
             pending[0] ? "; " : "", pending);
    switchover_roll_back(op, 504, why);
}

void switchover_refused(operator_op *op, const char *node_id, const char *detail)
{
    char why[OPERATOR_DETAIL_MAX];
    if (op->kind == OP_UNFENCE) {
        op_finish_error(op, 409, detail);
        return;
    }
    snprintf(why, sizeof(why), "%s step failed%s%s: %s", op_step_name(op->step),
             node_id[0] ? " on proxy " : "", node_id, detail);
    switchover_roll_back(op, 409, why);
}

/* The request's node names one that some proxy of the deployment observes; else the answer
 * (400 empty, 404 unknown) is sent and false returned. */
static bool switchover_node_known(http_call *call, const char *node)
{
    if (!node[0]) {
        http_reply_error(call->req, 400, "field node must not be empty");
        return false;
    }
    if (!leader_node_known(call->dep, node)) {
        http_reply_error(call->req, 404, "unknown node %s: no proxy of deployment %s observes it",
                         node, call->dep->name);
        return false;
    }
    return true;
}

void operator_switchover(http_call *call)
{
    const char *node = NULL;
    bool promote = false, force = false;
    if (!http_field_string(call, call->body, NULL, "node", true, OPERATOR_NODE_MAX, &node) ||
        !http_field_bool(call, call->body, NULL, "promote", false, &promote) ||
        !http_field_bool(call, call->body, NULL, "force", false, &force))
        return;
    if (!switchover_node_known(call, node))
        return;
    if (call->dep->leader_saving) { /* its epoch would be taken from a decision not yet saved */
        http_reply_error(call->req, 409,
                         "a leader decision of deployment %s is being stored; try again",
                         call->dep->name);
        return;
    }
    if (!promote && switchover_in_recovery(call->dep, node)) {
        http_reply_error(call->req, 409, "%s is in recovery; use --promote", node);
        return;
    }
    operator_op *op = op_begin(call, OP_SWITCHOVER);
    if (!op)
        return;
    snprintf(op->node, sizeof(op->node), "%s", node);
    snprintf(op->old_leader, sizeof(op->old_leader), "%s", call->dep->leader);
    op->promote = promote;
    op->force = force;
    log_info("deployment %s: switchover from %s to %s%s%s requested", call->dep->name,
             op->old_leader[0] ? op->old_leader : "(none)", node, promote ? " with promote" : "",
             force ? ", FORCED" : "");
    /* the operation recorded, then its first step, by one store job */
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    op_before before = {.create = true, .record = true};
    op_send_before(op, STEP_PAUSE, "maintenance", switchover_pause_args(op), live, n > 0 ? n : 0,
                   &before);
    free(live);
}

void operator_unfence(http_call *call)
{
    const char *node = NULL;
    if (!http_field_string(call, call->body, NULL, "node", true, OPERATOR_NODE_MAX, &node))
        return;
    if (!switchover_node_known(call, node))
        return;
    operator_op *op = op_begin(call, OP_UNFENCE);
    if (!op)
        return;
    snprintf(op->node, sizeof(op->node), "%s", node);
    state_proxy **live = NULL;
    int n = state_live_proxies(op->dep, &live);
    if (n <= 0) {
        free(live);
        op_finish_error(op, 409, "no live proxy can lift the fence");
        return;
    }
    log_warning("deployment %s: unfence of %s requested", call->dep->name, node);
    op_send(op, STEP_UNFENCE, "unfence", json_pack("{s:s}", "node", node), live, 1);
    free(live);
}

/* ---- the operation record: the agents' question, the operator's list, recovery ---- */

void operator_operation_status(http_call *call)
{
    const char *text = call->args[0];
    char *end = NULL;
    long long id = strtoll(text, &end, 10);
    if (!text[0] || *end || id <= 0) {
        http_reply_error(call->req, 404, "unknown operation %s", text);
        return;
    }
    operator_op *op = call->dep->op;
    bool running = op && op->kind == OP_SWITCHOVER && op->op_id == id;
    bool live = running && op->step == STEP_PROMOTE && op_left_ms(op) > 0;
    http_reply_json(call->req, 200,
                    json_pack("{s:I, s:b, s:s, s:I}", "id", (json_int_t)id, "live", live, "step",
                              running ? op_step_name(op->step) : "", "left_ms",
                              (json_int_t)(running ? op_left_ms(op) : 0)));
}

/* The operations view, read by the store worker: after the writes queued before it. */
typedef struct operations_job {
    store_job job;
    char deployment[CCONFIG_NAME_MAX];
    struct evhttp_request *req;
    json_t *list;
} operations_job;

static int operations_run(store_job *job)
{
    operations_job *j = (operations_job *)job;
    j->list = store_operations_list(j->deployment, 50, false);
    return j->list ? 0 : -1;
}

static void operations_done(store_job *job)
{
    operations_job *j = (operations_job *)job;
    if (job->rc != 0)
        http_reply_error(j->req, 503, "store unreachable: %s", job->error);
    else
        http_reply_json(j->req, 200, j->list);
    free(j);
}

void operator_operations(http_call *call)
{
    operations_job *j = calloc(1, sizeof(*j));
    if (!j) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    snprintf(j->deployment, sizeof(j->deployment), "%s", call->dep->name);
    j->req = call->req;
    j->job.run = operations_run;
    j->job.done = operations_done;
    store_worker_submit(&j->job);
}

/* Roll back one operation left running by a replica that crashed, stopped or lost the lease:
 * withdraw its pending commands, resume every proxy, lift the fence when nothing may have
 * been promoted (else the old leader stays fenced), and record it. */
static void operation_roll_back(json_t *row)
{
    int64_t id = json_integer_value(json_object_get(row, "id"));
    const char *dep_name = json_string_value(json_object_get(row, "deployment"));
    const char *old = json_string_value(json_object_get(row, "old_leader"));
    const char *runner = json_string_value(json_object_get(row, "runner"));
    bool fenced_maybe = strcmp(json_string_value(json_object_get(row, "step")), "fence") == 0 ||
                        json_is_true(json_object_get(row, "fenced"));
    bool promote_sent = json_is_true(json_object_get(row, "promote_sent"));
    char outcome[OPERATOR_DETAIL_MAX];
    state_deployment *dep = state_find_deployment(dep_name);

    /* every write queued, in this order, so the end is recorded after what it says was done */
    if (dep_name)
        store_queue_operation_cancel(dep_name, id, "cancelled: the operation was rolled back");
    size_t off =
        (size_t)snprintf(outcome, sizeof(outcome),
                         "rolled back by %s (the replica that ran it stopped at step "
                         "%s): maintenance off queued",
                         control.identity, json_string_value(json_object_get(row, "step")));
    if (dep) {
        maintenance_fire_resume(dep, true); /* off, or the operator's maintenance */
        if (fenced_maybe && !promote_sent && old && old[0]) {
            state_proxy *p = runner && runner[0] ? state_find_proxy(dep, runner) : NULL;
            if (!p)
                p = dep->proxies;
            if (p) {
                store_queue_command(dep, "unfence", json_pack("{s:s}", "node", old), &p, 1, NULL,
                                    NULL);
                snprintf(outcome + off, sizeof(outcome) - off, ", unfence of %s queued", old);
            }
        } else if (fenced_maybe && old && old[0]) {
            snprintf(outcome + off, sizeof(outcome) - off, ", %s stays fenced (a promote was sent)",
                     old);
        }
    }
    if (dep_name)
        store_queue_operation_end(dep_name, id, promote_sent ? "failed" : "rolled_back", outcome);
    log_warning("deployment %s: operation %" PRId64 " %s", dep_name ? dep_name : "?", id, outcome);
}

/* The record says the promote succeeded: the switch step was recorded (it follows an
 * acknowledged promote), or the promote step carries an outcome that is not a failure (a
 * refusal or a timeout is noted as "promote step ..." and ends the operation). */
static bool operation_promoted(json_t *row)
{
    const char *step = json_string_value(json_object_get(row, "step"));
    if (!json_is_true(json_object_get(row, "promote")) || !step)
        return false;
    if (strcmp(step, "switch") == 0)
        return true;
    if (strcmp(step, "promote") != 0)
        return false;
    json_t *steps = json_object_get(row, "steps");
    size_t n = json_array_size(steps);
    const char *detail =
        n > 0 ? json_string_value(json_object_get(json_array_get(steps, n - 1), "detail")) : NULL;
    return detail && strncmp(detail, "promote step", 12) != 0;
}

/* Finishing an operation whose promote succeeded, for the store worker, in this order: the
 * target saved as the leader under a new epoch (unless the record's switch stored it
 * already), the operation's late commands withdrawn, set_leader queued for every proxy. */
typedef struct operation_finish_job {
    store_job job;
    json_t *row;
    char deployment[CCONFIG_NAME_MAX];
    char node[STATE_NODE_NAME_MAX];
    bool save;
    int64_t epoch;
    int leader_rc; /* store_leadership_save's: > 0 refused */
    int64_t stored_epoch;
    char stored_leader[STATE_NODE_NAME_MAX];
    json_t *args; /* set_leader's */
    const char **ids;
    char (*id_text)[STATE_NODE_ID_MAX];
    int n;
    int64_t command_id;
} operation_finish_job;

static int operation_finish_run(store_job *job)
{
    operation_finish_job *j = (operation_finish_job *)job;
    int64_t id = json_integer_value(json_object_get(j->row, "id"));
    if (j->save) {
        j->leader_rc = store_leadership_save(j->deployment, j->node, j->epoch, &j->stored_epoch,
                                             j->stored_leader);
        if (j->leader_rc != 0)
            return -1;
    }
    if (store_operation_cancel_commands(id, "cancelled: the operation was finished by another "
                                            "replica") != 0)
        log_warning("operation %" PRId64 ": cannot withdraw its late commands: %s", id,
                    store_error());
    if (j->n > 0 && (j->command_id = store_command_create_ids(j->deployment, "set_leader", j->args,
                                                              j->ids, j->n)) < 0)
        log_error("deployment %s: cannot queue set_leader: %s", j->deployment, store_error());
    return 0;
}

static void operation_finish_free(operation_finish_job *j)
{
    json_decref(j->row);
    json_decref(j->args);
    free(j->ids);
    free(j->id_text);
    free(j);
}

static void operation_finish_done(store_job *job)
{
    operation_finish_job *j = (operation_finish_job *)job;
    state_deployment *dep = control.active ? state_find_deployment(j->deployment) : NULL;
    int64_t id = json_integer_value(json_object_get(j->row, "id"));
    const char *old = json_string_value(json_object_get(j->row, "old_leader"));
    const char *step = json_string_value(json_object_get(j->row, "step"));
    char outcome[OPERATOR_DETAIL_MAX];
    if (!dep) { /* no longer ours: the next holder recovers it */
        operation_finish_free(j);
        operation_recovery_release();
        return;
    }
    if (job->rc != 0) { /* the leader could not be stored: rolled back instead */
        if (j->leader_rc > 0)
            log_error("deployment %s: operation %" PRId64 ": cannot store %s as the leader: "
                      "the store holds leader %s at epoch %" PRId64,
                      dep->name, id, j->node, j->stored_leader[0] ? j->stored_leader : "(none)",
                      j->stored_epoch);
        else
            log_error("deployment %s: operation %" PRId64 ": cannot store %s as the leader: %s",
                      dep->name, id, j->node, job->error);
        operation_roll_back(j->row);
        operation_finish_free(j);
        operation_recovery_release();
        return;
    }
    if (j->save)
        leader_saved(dep, j->node, j->epoch);
    for (int i = 0; j->command_id > 0 && i < j->n; i++) {
        state_proxy *p = state_find_proxy(dep, j->ids[i]);
        if (p)
            agents_wake(p);
    }
    maintenance_fire_resume(dep, true); /* off, or the operator's maintenance */
    snprintf(outcome, sizeof(outcome),
             "finished by %s (the replica that ran it stopped after the promote, at step %s): "
             "%s is the leader at epoch %" PRId64 ", set_leader and the resume queued%s%s%s",
             control.identity, step ? step : "?", j->node, j->save ? j->epoch : dep->epoch,
             old && old[0] ? "; " : "", old && old[0] ? old : "",
             old && old[0] ? " stays fenced" : "");
    store_queue_operation_end(dep->name, id, "done", outcome); /* after the resume */
    log_warning("deployment %s: operation %" PRId64 " %s", dep->name, id, outcome);
    operation_finish_free(j);
    operation_recovery_release();
}

/* Finish an operation whose promote succeeded, left running by a replica that crashed,
 * stopped or lost the lease: the target is the leader under a new epoch (unless the record's
 * switch already stored it), set_leader and the resume are queued for every proxy, and the
 * old leader stays fenced; rolled back instead when the leadership cannot be stored. */
static void operation_finish(json_t *row, state_deployment *dep)
{
    const char *node = json_string_value(json_object_get(row, "node"));
    const char *step = json_string_value(json_object_get(row, "step"));
    operation_finish_job *j = calloc(1, sizeof(*j));
    int n = 0;
    for (state_proxy *p = dep->proxies; p; p = p->next)
        n++;
    if (j) {
        j->ids = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->ids));
        j->id_text = calloc(n > 0 ? (size_t)n : 1, sizeof(*j->id_text));
    }
    if (!node || !node[0] || !j || !j->ids || !j->id_text) {
        if (j) {
            free(j->ids);
            free(j->id_text);
            free(j);
        }
        operation_roll_back(row);
        return;
    }
    j->row = json_incref(row);
    snprintf(j->deployment, sizeof(j->deployment), "%s", dep->name);
    snprintf(j->node, sizeof(j->node), "%s", node);
    j->save = strcmp(step ? step : "", "switch") != 0 || strcmp(dep->leader, node) != 0;
    j->epoch = j->save ? leader_set_epoch(dep, dep->epoch + 1) : dep->epoch;
    for (state_proxy *p = dep->proxies; p; p = p->next) {
        snprintf(j->id_text[j->n], STATE_NODE_ID_MAX, "%s", p->node_id);
        j->ids[j->n] = j->id_text[j->n];
        j->n++;
    }
    j->args = json_pack("{s:s, s:I}", "leader", node, "epoch", (json_int_t)j->epoch);
    j->job.run = operation_finish_run;
    j->job.done = operation_finish_done;
    operation_recovery_hold(); /* released once its resume and end are queued */
    store_worker_submit(&j->job);
}

void switchover_recover(json_t *row)
{
    state_deployment *dep =
        state_find_deployment(json_string_value(json_object_get(row, "deployment")));
    if (dep && operation_promoted(row))
        operation_finish(row, dep);
    else
        operation_roll_back(row);
}
