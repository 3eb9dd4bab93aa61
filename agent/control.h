/* control.h - the agent's side of the control plane: registration, telemetry, commands. */
#ifndef PGRELAY_AGENT_CONTROL_H
#define PGRELAY_AGENT_CONTROL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "agent.h"

/* What the control threads tell the agent's event loop. */
typedef enum control_msg_type {
    CONTROL_MSG_LEADER = 1, /* the control plane's leader and epoch ("" = no opinion) */
    CONTROL_MSG_UNREACHABLE, /* no endpoint answered for control_grace_period */
} control_msg_type;

typedef struct control_msg {
    uint32_t type;                 /* control_msg_type */
    uint64_t epoch;
    char leader[CONFIG_NAME_MAX];
} control_msg;

/* Start the reporter and poller threads when [control] endpoint is set and the agent runs
 * under a master. Returns the descriptor the event loop reads control_msg from, or -1. */
int control_start(agent *a);

/* Run one command from the control plane (poller thread). Returns 0 (ok) or -1, with a
 * one-line detail for the acknowledgement. */
struct json_t;
int control_run_command(const char *type, struct json_t *args, char *detail, size_t len);

/* Apply the deployment's desired configuration (version, text) when this proxy is on another
 * one: checked as config_prepare checks, written and reloaded as config_commit does. 0, or -1
 * with a one-line detail. */
int control_config_converge(int64_t version, const char *text, char *detail, size_t len);

/* At start: the configuration version last applied (PATH.version beside the running file), when
 * the shared memory has none. */
void control_config_init(const char *path);

/* Thread-side context the commands use (set by control_start). */
typedef struct control_ctx {
    shm_segment *shm;
    int master_fd;         /* the agent's channel to the master */
    int loop_fd;           /* control_msg to the agent's event loop */
    char node_id[64];
} control_ctx;

extern control_ctx control;

/* Ask the event loop to follow leader/epoch (also used by the set_leader command). */
void control_send_leader(const char *leader, uint64_t epoch);

/* Have the reporter send the metrics (with this agent's node observations) now rather than at
 * its next interval; called from the agent's loop when its view of the nodes changed. */
void control_report_now(void);

/* Epochs from the control plane: whole numbers from 0 to 2^53 (what JSON carries exactly);
 * anything else is garbage and must not move the agent's epoch, which only grows. */
#define CONTROL_EPOCH_MAX ((json_int_t)1 << 53)
bool control_epoch_valid(json_t *epoch);

#endif
