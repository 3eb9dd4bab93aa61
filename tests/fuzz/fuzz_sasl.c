/* fuzz_sasl.c - libFuzzer target: tls_strip_sasl_plus (proxy/tls.c), which rewrites the node's
 * bytes before login when the node is on TLS.
 *
 * Input: the bytes of one read from the node. The result must be no longer than the input,
 * hold no whole AuthenticationSASL that still offers a "-PLUS" mechanism, keep every whole
 * message's type in order, and be left as it is by a second pass.
 */
#include "pgproto.h"
#include "tls.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Types of the whole messages from the start of p[0..n), as the relay's scanner sees them;
 * the number of them (at most cap kept). */
static size_t message_types(const uint8_t *p, size_t n, uint8_t *types, size_t cap)
{
    size_t off = 0, count = 0;
    while (off + PG_MSG_HEADER_LEN <= n) {
        uint32_t len = pg_get_u32(p + off + 1);
        if (len < 4 || len > n - off - 1)
            break;
        if (count < cap)
            types[count] = p[off];
        count++;
        off += 1 + (size_t)len;
    }
    return count;
}

/* No whole AuthenticationSASL in p[0..n) names a mechanism ending in -PLUS. */
static void check_no_plus(const uint8_t *p, size_t n)
{
    size_t off = 0;
    while (off + PG_MSG_HEADER_LEN <= n) {
        uint32_t len = pg_get_u32(p + off + 1);
        if (len < 4 || len > n - off - 1)
            break;
        size_t end = off + 1 + len, in = off + PG_MSG_HEADER_LEN + 4;
        if (p[off] == PG_MSG_AUTHENTICATION && len >= 8 &&
            pg_get_u32(p + off + PG_MSG_HEADER_LEN) == 10) {
            while (in < end && p[in] != '\0') {
                size_t name = strnlen((const char *)p + in, end - in);
                if (in + name >= end)
                    break;
                if (name >= 5 && memcmp(p + in + name - 5, "-PLUS", 5) == 0)
                    abort();
                in += name + 1;
            }
        }
        off = end;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *buf = malloc(size + 1), *again = malloc(size + 1);
    uint8_t before[64], after[64];
    if (!buf || !again)
        abort();
    memcpy(buf, data, size);
    size_t types_in = message_types(buf, size, before, sizeof(before));
    size_t n = tls_strip_sasl_plus(buf, size);
    if (n > size)
        abort();
    size_t types_out = message_types(buf, n, after, sizeof(after));
    size_t kept = types_in < sizeof(before) ? types_in : sizeof(before);
    if (types_out != types_in || memcmp(before, after, kept) != 0)
        abort();
    check_no_plus(buf, n);
    memcpy(again, buf, n);
    if (tls_strip_sasl_plus(again, n) != n || memcmp(again, buf, n) != 0)
        abort();
    free(buf);
    free(again);
    return 0;
}
