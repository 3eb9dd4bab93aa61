/* operator_internal.h - what the orchestrations share (operator.c) with the switchover
 * operation (switchover.c): the op, its steps, and sending a step's command. */
#ifndef PGRELAY_OPERATOR_INTERNAL_H
#define PGRELAY_OPERATOR_INTERNAL_H

#include "operator.h"

#include <event2/event.h>
#include <jansson.h>

#define OPERATOR_DETAIL_MAX 512
#define OPERATOR_NODE_MAX   (STATE_NODE_NAME_MAX - 1)

/* What an orchestration does. */
typedef enum op_kind {
    OP_MAINTENANCE, /* maintenance on or off on every live proxy */
    OP_RELOAD,      /* reload on every live proxy */
    OP_SWITCHOVER,  /* pause, fence, [catch up, promote,] switch, resume (switchover.c) */
    OP_CONFIG,      /* config_prepare everywhere, then config_commit or config_abort
                       (config_apply.c) */
    OP_UNFENCE,     /* one proxy lifts a node's fence (switchover.c) */
} op_kind;

/* Where an orchestration is. */
typedef enum op_step {
    STEP_MAINTENANCE, /* OP_MAINTENANCE: waiting for the maintenance acks */
    STEP_RELOAD,      /* OP_RELOAD: waiting for the reload acks */
    STEP_PAUSE,       /* switchover: maintenance on everywhere (with a dead-man end) */
    STEP_FENCE,       /* switchover: one proxy fences the old leader */
    STEP_CATCH_UP,    /* switchover with promote: the target replays the fenced WAL */
    STEP_PROMOTE,     /* switchover with promote: one proxy promotes the node */
    STEP_SET_LEADER,  /* switchover: set_leader everywhere */
    STEP_RESUME,      /* switchover: maintenance off everywhere */
    STEP_PREPARE,     /* config: config_prepare to every live proxy */
    STEP_CONFIG_HOLD, /* config: prepared everywhere, held by the test hook (config_apply.c) */
    STEP_COMMIT,      /* config: config_commit to exactly the proxies that prepared */
    STEP_UNFENCE,     /* OP_UNFENCE: waiting for the unfence ack */
} op_step;

/* A switchover step's name (the log, the record, the test hook): "pause", "fence", ... */
const char *op_step_name(op_step step);

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
    uint64_t serial; /* this op among all since start (a store job finds it again by it) */
    state_deployment *dep;
    struct evhttp_request *req; /* the operator's request, answered at the end */
    op_kind kind;
    op_step step;
    int64_t timeout_s;   /* the whole orchestration ends within this (the operator's timeout) */
    int64_t deadline_ms; /* monotonic time at which it ends, done or not */
    struct event *timer; /* the deadline */
    int64_t command_id;  /* the current step's command (0 while it is on its way) */
    op_target *targets;  /* the current step's proxies */
    int n_targets;
    int *by_id;     /* targets' indexes in node_id order (an ack finds its target) */
    int in_store;   /* store jobs the op waits for (the deadline waits for them too) */
    bool timed_out; /* the deadline passed while in_store: handled once they are back */
    bool finishing; /* answered once the store writes queued before are done */
    int finish_code;
    json_t *finish_body;

    /* maintenance */
    bool on;
    int64_t resume_after_s; /* passed on: maintenance ends by itself after it */
    int64_t started_ms;     /* wall clock of the request (the operator's end counts from it) */
    /* switchover, unfence */
    int64_t op_id; /* the durable operation (pgrelay.operations): switchover, config */
    char node[STATE_NODE_NAME_MAX];
    char old_leader[STATE_NODE_NAME_MAX];
    bool promote;
    bool force;                     /* the operator takes the risk of an unfenced old leader */
    char runner[STATE_NODE_ID_MAX]; /* the proxy that fences, catches up and promotes */
    bool fenced;                    /* the fence was sent: the old leader may be fenced */
    bool promote_sent;              /* a promote was queued: the target may be a primary */
    json_t *record;                 /* what each step did: {"step": detail} */
    json_t *leader_answers;         /* set_leader answers, kept through the resume step */
    bool leader_ok;                 /* every set_leader was acknowledged ok */
    /* config */
    int64_t version;
    char *text;
    int64_t prepare_id; /* the config_prepare command */
    int config_code;    /* a rollback's answer status while its write is on its way */
    char config_head[OPERATOR_DETAIL_MAX]; /* "version N committed on K of M proxies" */
} operator_op;

/* The current step's answers as [{"node_id", "ok", "detail"}]. */
json_t *op_answers(const operator_op *op, const char *pending_detail);
bool op_all_ok(const operator_op *op);

/* The current step's target node_id, or NULL (a binary search). */
op_target *op_target_find(operator_op *op, const char *node_id);

/* Answer the operator (body stolen) and end the op. */
void op_finish(operator_op *op, int code, json_t *body);
void op_finish_error(operator_op *op, int code, const char *msg);

/* "no answer within Ns" */
void op_pending_detail(const operator_op *op, char *buf, size_t len);

/* Milliseconds left before the deadline (0 when it has passed). */
int64_t op_left_ms(const operator_op *op);

/* Arm the timer for the deadline. 0, or -1 after ending the op. */
int op_arm_deadline(operator_op *op);

/* Args of a maintenance command (resume_after_s > 0: it ends by itself then). */
json_t *op_maintenance_args(bool on, int64_t resume_after_s);

/* What a switchover step writes before its command, in the same store job: the operation
 * created (its first step), the leader saved (the switch step), the step recorded with the
 * op's runner, fenced and promote_sent (every step; the command then carries the operation's
 * id as args.operation). */
typedef struct op_before {
    bool create;      /* create the operation (op->op_id is set from it) */
    bool save_leader; /* save op->node as the leader at epoch */
    int64_t epoch;
    bool record; /* record the step */
} op_before;

/* Start a step: queue the command (args stolen) for targets and wait. The command is written
 * by the store worker (before it, what `before` says, if not NULL); the step goes on when it is
 * back. May end the op (no target, out of memory, the store failed): the caller must not touch
 * op afterwards. */
void op_send(operator_op *op, op_step step, const char *type, json_t *args,
             state_proxy *const *targets, int n);
void op_send_before(operator_op *op, op_step step, const char *type, json_t *args,
                    state_proxy *const *targets, int n, const op_before *before);
void op_send_live(operator_op *op, op_step step, const char *type, json_t *args);

/* The op is found again by its serial when a store job comes back (NULL: it ended). */
operator_op *op_find(const char *deployment, uint64_t serial);

/* The op waits for one more store job (its deadline with it); op_store_back when it is back:
 * false when the op ended meanwhile (the caller must not touch it). */
void op_store_wait(operator_op *op);
bool op_store_back(operator_op *op);

/* A new op for the call, or NULL after answering 409 (another one runs) or 400. */
operator_op *op_begin(http_call *call, op_kind kind);

/* switchover.c: the current switchover step is done, timed out, or a proxy refused it. */
void switchover_step_done(operator_op *op);
void switchover_timeout(operator_op *op, const char *msg, const char *pending);
void switchover_refused(operator_op *op, const char *node_id, const char *detail);

/* config_apply.c: the current config step is done, timed out, or a proxy refused the prepare. */
void config_apply_step_done(operator_op *op);
void config_apply_timeout(operator_op *op);
void config_apply_refused(operator_op *op, const char *node_id, const char *detail);

/* switchover.c: what op_before asked to write first could not be (the leader, when
 * leader_failed, else the operation or the step's record): roll back. */
void switchover_not_recorded(operator_op *op, bool create_failed, bool leader_failed,
                             const char *error);

/* config_apply.c: the prepare command is in the store (op->command_id). */
void config_apply_prepare_sent(operator_op *op);

/* switchover.c, for recovery.c: finish (its promote succeeded) or roll back one switchover
 * left running by another replica (a store_operations_list row). */
void switchover_recover(json_t *row);

/* config_apply.c, for recovery.c: the store worker's reads for the config operations among
 * running (store_operations_list rows): the prepare command's answers (answers_ok,
 * answers_total). 0, or -1 when one could not be read (store_error()). Then, on the loop: each deployment's desired version (versions:
 * {deployment: version}), the committed applies watched again (committed, NULL when it could
 * not be read), and each running apply finished or rolled back. */
int config_recover_read(json_t *running);
void config_recover(json_t *running, json_t *committed, json_t *versions);

/* config_apply.c: stop watching the committed versions' pending proxies (lease lost,
 * shutdown); the next holder reads them again from the store. */
void config_watch_stop(void);

#endif
