/* fuzz_startup.c - libFuzzer target: the startup-phase packet parser (pg_startup_length/parse).
 *
 * The input is what a client sends first. Whatever it is, the length check and the parser must
 * not read outside the packet, and what they accept must hold: strings that end inside the
 * packet, a user, lengths that match the kind of request.
 */
#include "pgproto.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Does s point into pkt and end there with a NUL? */
static void check_string(const char *s, const uint8_t *pkt, size_t len)
{
    if (!s)
        return;
    const char *start = (const char *)pkt, *end = (const char *)pkt + len;
    if (s < start || s >= end || !memchr(s, '\0', (size_t)(end - s)))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Every prefix the worker can have read so far: 0 (wait), -1 (refuse) or the length. */
    for (size_t have = 0; have <= size && have <= 8; have++) {
        long len = pg_startup_length(data, have);
        if ((have < 4 && len != 0) || (have >= 4 && len != -1 && len < PG_STARTUP_MIN_LEN))
            abort();
    }
    long len = pg_startup_length(data, size);
    if (len <= 0 || (size_t)len > size)
        return 0;

    /* The packet alone in a buffer of its exact size, so that any overread is caught. */
    uint8_t *pkt = malloc((size_t)len);
    if (!pkt)
        return 0;
    memcpy(pkt, data, (size_t)len);
    pg_startup st;
    const char *err = NULL, *sqlstate = NULL;
    if (pg_startup_parse(pkt, (size_t)len, &st, &err, &sqlstate) == 0) {
        switch (st.kind) {
        case PG_STARTUP_SSL:
        case PG_STARTUP_GSSENC:
            if (len != PG_STARTUP_MIN_LEN)
                abort();
            break;
        case PG_STARTUP_CANCEL:
            if (len != PG_CANCEL_REQUEST_LEN || st.cancel_pid != pg_get_u32(pkt + 8))
                abort();
            break;
        case PG_STARTUP_MESSAGE:
            if (PG_PROTOCOL_MAJOR(st.code) != 3 || !st.user || !st.user[0] || !st.database)
                abort();
            check_string(st.user, pkt, (size_t)len);
            check_string(st.database, pkt, (size_t)len);
            check_string(st.application_name, pkt, (size_t)len);
            break;
        default:
            abort();
        }
    } else if (!err || !err[0] || !sqlstate || strlen(sqlstate) != 5) {
        abort(); /* a refusal always says why, with a SQLSTATE */
    }
    free(pkt);
    return 0;
}
