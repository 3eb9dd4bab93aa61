/* test_tls_sasl.c - unit tests for tls_strip_sasl_plus (proxy/tls.c): the node's
 * AuthenticationSASL without its channel-binding mechanisms, in whatever reads it comes in. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../proxy/tls.h"
#include "pgproto.h"

/* An Authentication message: 'R', length, code, then body bytes. */
static size_t auth_msg(uint8_t *out, uint32_t code, const char *body, size_t body_len)
{
    out[0] = 'R';
    pg_put_u32(out + 1, (uint32_t)(4 + 4 + body_len));
    pg_put_u32(out + 5, code);
    memcpy(out + 9, body, body_len);
    return 9 + body_len;
}

#define LIST(lit) lit, sizeof(lit) - 1 /* a mechanism list literal with its own NULs */

static void test_plus_dropped_length_fixed(void **state)
{
    uint8_t buf[256], want[256];
    (void)state;
    size_t n = auth_msg(buf, 10, LIST("SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"));
    size_t w = auth_msg(want, 10, LIST("SCRAM-SHA-256\0\0"));
    assert_int_equal(tls_strip_sasl_plus(buf, n), w);
    assert_memory_equal(buf, want, w);
}

static void test_following_messages_move_with_it(void **state)
{
    uint8_t buf[256], want[256];
    (void)state;
    size_t n = auth_msg(buf, 10, LIST("SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0\0"));
    memcpy(buf + n, "Z\0\0\0\5I", 6); /* anything after it in the same read */
    n += 6;
    size_t w = auth_msg(want, 10, LIST("SCRAM-SHA-256\0\0"));
    memcpy(want + w, "Z\0\0\0\5I", 6);
    w += 6;
    assert_int_equal(tls_strip_sasl_plus(buf, n), w);
    assert_memory_equal(buf, want, w);
}

static void test_other_messages_untouched(void **state)
{
    uint8_t buf[256], copy[256];
    (void)state;
    /* AuthenticationOk, then a SASLContinue that happens to hold "-PLUS" */
    size_t n = auth_msg(buf, 0, "", 0);
    n += auth_msg(buf + n, 11, LIST("r=x-PLUS\0"));
    memcpy(copy, buf, n);
    assert_int_equal(tls_strip_sasl_plus(buf, n), n);
    assert_memory_equal(buf, copy, n);
}

static void test_split_or_broken_messages_left_alone(void **state)
{
    uint8_t buf[256], copy[256];
    (void)state;
    size_t n = auth_msg(buf, 10, LIST("SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"));
    memcpy(copy, buf, n);
    for (size_t cut = 0; cut < n; cut++) { /* the message's end beyond this read */
        assert_int_equal(tls_strip_sasl_plus(buf, cut), cut);
        assert_memory_equal(buf, copy, n);
    }
    /* a list whose last name has no NUL within the message */
    n = auth_msg(buf, 10, LIST("SCRAM-SHA-256-PLUS\0SCRAM"));
    memcpy(copy, buf, n);
    size_t got = tls_strip_sasl_plus(buf, n);
    assert_true(got <= n);
    assert_int_equal(pg_get_u32(buf + 1) + 1, got); /* still one whole message */
    /* impossible lengths */
    memcpy(buf, "R\0\0\0\2", 5);
    assert_int_equal(tls_strip_sasl_plus(buf, 5), 5);
}

static void test_only_plus_leaves_an_empty_list(void **state)
{
    uint8_t buf[256], want[256];
    (void)state;
    size_t n = auth_msg(buf, 10, LIST("SCRAM-SHA-256-PLUS\0\0"));
    size_t w = auth_msg(want, 10, LIST("\0"));
    assert_int_equal(tls_strip_sasl_plus(buf, n), w);
    assert_memory_equal(buf, want, w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plus_dropped_length_fixed),
        cmocka_unit_test(test_following_messages_move_with_it),
        cmocka_unit_test(test_other_messages_untouched),
        cmocka_unit_test(test_split_or_broken_messages_left_alone),
        cmocka_unit_test(test_only_plus_leaves_an_empty_list),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
