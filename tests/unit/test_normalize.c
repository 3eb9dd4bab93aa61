/* test_normalize.c - literals of running statements become $n before they leave the proxy. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "../../agent/normalize.h"

static void check(const char *in, const char *want)
{
    char out[512];
    normalize_sql(in, out, sizeof(out));
    assert_string_equal(out, want);
}

static void test_string_and_number_literals_become_parameters(void **state)
{
    (void)state;
    check("SELECT * FROM t WHERE name = 'bob' AND age > 42",
          "SELECT * FROM t WHERE name = $1 AND age > $2");
    check("select 1.5e3, 0.25, 7", "select $1, $2, $3");
    check("insert into t values ('it''s', E'a\\'b', $$x'y$$, $q$ $$ $q$)",
          "insert into t values ($1, $2, $3, $4)");
}

static void test_identifiers_comments_and_parameters_stay(void **state)
{
    (void)state;
    check("select col1, t2.x from \"Tab 'x' 3\" t2 -- 'no'\n where id = $1 and v = 5 /* 9 */",
          "select col1, t2.x from \"Tab 'x' 3\" t2 -- 'no'\n where id = $1 and v = $2 /* 9 */");
    check("select $2 + 10", "select $2 + $3");
}

static void test_unterminated_and_truncated_text_is_safe(void **state)
{
    (void)state;
    check("select 'open", "select $1");
    check("select $tag$ open", "select $1");
    char out[8];
    normalize_sql("select 'abc' from somewhere", out, sizeof(out));
    assert_string_equal(out, "select ");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_string_and_number_literals_become_parameters),
        cmocka_unit_test(test_identifiers_comments_and_parameters_stay),
        cmocka_unit_test(test_unterminated_and_truncated_text_is_safe),
    };
    return cmocka_run_group_tests_name("normalize", tests, NULL, NULL);
}
