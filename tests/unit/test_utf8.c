/* test_utf8.c - unit tests for proxy/utf8.c: what counts as UTF-8, and the display copy that
 * session.c stores for user, database and application_name. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../proxy/utf8.h"

/* utf8_decode on a byte string literal (its own final NUL excluded). */
#define DECODE(lit, cp) utf8_decode((const uint8_t *)(lit), sizeof(lit) - 1, (cp))

static void test_decode_well_formed(void **state)
{
    uint32_t cp = 0;
    (void)state;
    assert_int_equal(DECODE("A", &cp), 1);
    assert_int_equal(cp, 'A');
    assert_int_equal(DECODE("\xc3\xa9", &cp), 2); /* é */
    assert_int_equal(cp, 0xe9);
    assert_int_equal(DECODE("\xe2\x82\xac", &cp), 3); /* € */
    assert_int_equal(cp, 0x20ac);
    assert_int_equal(DECODE("\xf0\x9f\x90\x98", &cp), 4); /* U+1F418 */
    assert_int_equal(cp, 0x1f418);
    assert_int_equal(DECODE("\xf4\x8f\xbf\xbf", &cp), 4); /* U+10FFFF, the last */
    assert_int_equal(cp, 0x10ffff);
    assert_int_equal(DECODE("\xc2\x80", &cp), 2); /* the first two-byte character */
    assert_int_equal(cp, 0x80);
}

static void test_decode_refuses_what_is_not_utf8(void **state)
{
    uint32_t cp = 0;
    (void)state;
    assert_int_equal(DECODE("\x80", &cp), 0); /* stray continuation */
    assert_int_equal(DECODE("\xbf", &cp), 0);
    assert_int_equal(DECODE("\xc3", &cp), 0); /* cut short */
    assert_int_equal(DECODE("\xe2\x82", &cp), 0);
    assert_int_equal(DECODE("\xf0\x9f\x90", &cp), 0);
    assert_int_equal(DECODE("\xc3\x41", &cp), 0);         /* bad continuation */
    assert_int_equal(DECODE("\xc0\x80", &cp), 0);         /* overlong NUL */
    assert_int_equal(DECODE("\xc1\xbf", &cp), 0);         /* overlong */
    assert_int_equal(DECODE("\xe0\x80\xaf", &cp), 0);     /* overlong '/' */
    assert_int_equal(DECODE("\xf0\x8f\xbf\xbf", &cp), 0); /* overlong */
    assert_int_equal(DECODE("\xed\xa0\x80", &cp), 0);     /* surrogate U+D800 */
    assert_int_equal(DECODE("\xed\xbf\xbf", &cp), 0);     /* surrogate U+DFFF */
    assert_int_equal(DECODE("\xf4\x90\x80\x80", &cp), 0); /* U+110000 */
    assert_int_equal(DECODE("\xf8\x88\x80\x80\x80", &cp), 0);
    assert_int_equal(DECODE("\xff", &cp), 0);
    assert_int_equal(utf8_decode((const uint8_t *)"A", 0, &cp), 0); /* nothing readable */
}

static void test_controls(void **state)
{
    (void)state;
    assert_true(utf8_is_control(0x00));
    assert_true(utf8_is_control(0x1b)); /* ESC */
    assert_true(utf8_is_control(0x1f));
    assert_false(utf8_is_control(0x20));
    assert_false(utf8_is_control(0x7e));
    assert_true(utf8_is_control(0x7f)); /* DEL */
    assert_true(utf8_is_control(0x9b)); /* C1 CSI */
    assert_false(utf8_is_control(0xa0));
    assert_true(utf8_is_control(0x202e)); /* right-to-left override */
    assert_true(utf8_is_control(0x2066)); /* left-to-right isolate */
    assert_false(utf8_is_control(0x20ac));
}

/* The attack: 80 bytes of é; 63 bytes would cut the 32nd in half. */
static void test_copy_cuts_at_a_character_boundary(void **state)
{
    char src[81], dst[64];
    (void)state;
    for (int i = 0; i < 40; i++)
        memcpy(src + 2 * i, "\xc3\xa9", 2);
    src[80] = '\0';
    utf8_copy_printable(dst, sizeof(dst), src);
    assert_int_equal(strlen(dst), 62);
    for (int i = 0; i < 31; i++)
        assert_memory_equal(dst + 2 * i, "\xc3\xa9", 2);

    utf8_copy_printable(dst, sizeof(dst), "\xe2\x82\xac\xe2\x82\xac");
    assert_string_equal(dst, "\xe2\x82\xac\xe2\x82\xac");
    char small[6];
    utf8_copy_printable(small, sizeof(small), "\xe2\x82\xac\xe2\x82\xac"); /* 5 bytes of room */
    assert_string_equal(small, "\xe2\x82\xac");
    char one[1];
    utf8_copy_printable(one, sizeof(one), "abc");
    assert_string_equal(one, "");
}

static void test_copy_replaces_invalid_bytes_and_controls(void **state)
{
    char dst[64];
    (void)state;
    utf8_copy_printable(dst, sizeof(dst), "a\x1b[2Jb");
    assert_string_equal(dst, "a?[2Jb");
    utf8_copy_printable(dst, sizeof(dst), "x\xff\xfey");
    assert_string_equal(dst, "x??y");
    utf8_copy_printable(dst, sizeof(dst), "\xc3"); /* cut short by the end of the string */
    assert_string_equal(dst, "?");
    utf8_copy_printable(dst, sizeof(dst),
                        "1\xc2\x9b"
                        "2\xe2\x80\xae"
                        "3"); /* C1, bidi */
    assert_string_equal(dst, "1?2?3");
    utf8_copy_printable(dst, sizeof(dst), "tab\there\r\n\x7f");
    assert_string_equal(dst, "tab?here???");
    utf8_copy_printable(dst, sizeof(dst), "caf\xc3\xa9 \xe2\x82\xac");
    assert_string_equal(dst, "caf\xc3\xa9 \xe2\x82\xac"); /* valid text is kept as it is */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_decode_well_formed),
        cmocka_unit_test(test_decode_refuses_what_is_not_utf8),
        cmocka_unit_test(test_controls),
        cmocka_unit_test(test_copy_cuts_at_a_character_boundary),
        cmocka_unit_test(test_copy_replaces_invalid_bytes_and_controls),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
