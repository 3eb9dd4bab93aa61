/* fuzz_cancel.c - libFuzzer target: the cancel-request path, from the client's packet to the
 * decision to forward it (pg_startup_parse, then cancel_handle_request over shared memory).
 *
 * Input: byte 0 says how many session slots to fill (low 3 bits); each slot takes 6 bytes
 * (secret, the random tag of its pid, flags: in use, reached a node); the rest is what the
 * client sends. A CancelRequest must be forwarded exactly when its key names a slot in use whose
 * pid and secret match and whose session has reached a node; nothing else may be read or sent.
 * Connecting to the node is stubbed: it counts and fails.
 */
#include "cancel.h"
#include "config.h"
#include "log.h"
#include "net.h"
#include "pgproto.h"
#include "worker.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv);

#define FUZZ_SLOTS      8 /* session slots in the fake segment */
#define FUZZ_SLOT_BYTES 6 /* input bytes per filled slot */

static shm_segment *fuzz_shm;
static worker *fuzz_worker;
static config fuzz_cfg;
static int fuzz_forwarded; /* net_connect_nonblock calls: cancels cancel_send tried to send */

worker *worker_self;

/* Stubs for what cancel.c reaches outside the scanner and shared memory. */
int net_connect_nonblock(const struct sockaddr_storage *addr, socklen_t len, bool keepalive,
                         int *err)
{
    (void)addr;
    (void)len;
    (void)keepalive;
    fuzz_forwarded++;
    *err = ECONNREFUSED;
    return -1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    log_current_level = LOG_LVL_ERROR; /* every refused key is a warning */
    if (config_load_string(&fuzz_cfg, "fuzz.ini",
                           "[pgrelay]\nlisten_port = 6432\n[node.pg1]\nhost = 127.0.0.1\n"
                           "port = 5432\nrole = primary\n") != 0)
        abort();
    /* Exactly the slots, on the heap: a slot index off by one is an ASan report. */
    fuzz_shm = calloc(1, sizeof(shm_segment) + FUZZ_SLOTS * sizeof(shm_session));
    fuzz_worker = calloc(1, sizeof(worker));
    if (!fuzz_shm || !fuzz_worker)
        abort();
    fuzz_shm->max_sessions = FUZZ_SLOTS;
    fuzz_shm->n_workers = 1;
    fuzz_worker->shm = fuzz_shm;
    fuzz_worker->cfg = &fuzz_cfg;
    fuzz_worker->row = &fuzz_shm->workers[0];
    worker_self = fuzz_worker;
    return 0;
}

/* The key cancel_key_issue would give slot idx with this tag. */
static uint32_t slot_pid(uint32_t idx, uint32_t tag)
{
    return ((tag & 0x3ffu) << 20) | (idx + 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t n_slots = data[0] & 7;
    if (size < 1 + n_slots * FUZZ_SLOT_BYTES)
        return 0;
    const uint8_t *p = data + 1;
    memset(fuzz_shm->sessions, 0, FUZZ_SLOTS * sizeof(shm_session));
    for (uint32_t i = 0; i < n_slots; i++, p += FUZZ_SLOT_BYTES) {
        shm_session *s = &fuzz_shm->sessions[i];
        uint8_t flags = p[5];
        atomic_store(&s->state, flags & 1 ? SESSION_IDLE : SESSION_FREE);
        s->id = i + 1;
        s->cancel_pid = slot_pid(i, ((uint32_t)p[4] << 2) | (flags >> 6));
        s->cancel_secret = pg_get_u32(p);
        atomic_store(&s->backend_valid, (flags & 2) ? 1 : 0);
        s->node_addrlen = (flags & 4) ? sizeof(struct sockaddr_in) : 0;
        s->node_addr.ss_family = AF_INET;
        s->backend_pid = 4242;
        snprintf(s->node_name, sizeof(s->node_name), "pg1");
    }
    const uint8_t *pkt_in = p;
    size_t n = size - (size_t)(p - data);

    long len = pg_startup_length(pkt_in, n);
    if (len <= 0 || (size_t)len > n)
        return 0;
    uint8_t *pkt = malloc((size_t)len);
    if (!pkt)
        return 0;
    memcpy(pkt, pkt_in, (size_t)len);
    pg_startup st;
    const char *err, *sqlstate;
    if (pg_startup_parse(pkt, (size_t)len, &st, &err, &sqlstate) == 0 &&
        st.kind == PG_STARTUP_CANCEL) {
        /* What must happen, worked out independently of cancel.c. */
        bool expect = false;
        uint32_t idx = st.cancel_pid & 0xfffffu;
        if (idx >= 1 && idx <= n_slots) {
            const shm_session *s = &fuzz_shm->sessions[idx - 1];
            expect = atomic_load(&s->state) != SESSION_FREE && s->cancel_pid == st.cancel_pid &&
                     s->cancel_secret == st.cancel_secret && atomic_load(&s->backend_valid) &&
                     s->node_addrlen > 0;
        }
        fuzz_forwarded = 0;
        cancel_handle_request(fuzz_worker, st.cancel_pid, st.cancel_secret, "fuzz", -1);
        if (fuzz_forwarded != (expect ? 1 : 0))
            abort();
    }
    free(pkt);
    return 0;
}
