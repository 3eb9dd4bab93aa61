/* test_config.c - unit tests for common/config.c: pgrelay.ini parsing, validation, messages. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "config.h"
#include "log.h"

/* A config is ~55 KB: keep one, zeroed before each test. */
static config cfg;

static int setup(void **state)
{
    (void)state;
    memset(&cfg, 0x5a, sizeof(cfg)); /* config_load_string must not depend on prior contents */
    return 0;
}

static int load(const char *text)
{
    return config_load_string(&cfg, "t.ini", text);
}

static int ncpu(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* Load text and expect exactly these error lines (NULL-terminated list), in this order. */
static void expect_errors(const char *text, ...)
{
    const char *want[CONFIG_MAX_ERRORS];
    int n = 0;
    va_list ap;
    va_start(ap, text);
    for (const char *e; (e = va_arg(ap, const char *)) != NULL;)
        want[n++] = e;
    va_end(ap);

    int got = load(text);
    if (got != n) {
        for (int i = 0; i < cfg.n_errors; i++)
            print_message("  got error: %s\n", cfg.errors[i]);
    }
    assert_int_equal(got, n);
    assert_int_equal(cfg.n_errors, n);
    for (int i = 0; i < n; i++)
        assert_string_equal(cfg.errors[i], want[i]);
}

static const char *good_config = "; pgrelay test config\n"                /* 1 */
                                 "[pgrelay]\n"                             /* 2 */
                                 "listen_addr = 0.0.0.0\n"                 /* 3 */
                                 "listen_port = 7432\n"                    /* 4 */
                                 "workers = 3\n"                           /* 5 */
                                 "max_client_conn = 50   ; inline note\n"  /* 6 */
                                 "client_login_timeout = 250ms\n"          /* 7 */
                                 "server_connect_timeout = 2m\n"           /* 8 */
                                 "shutdown_timeout = 1h\n"                 /* 9 */
                                 "tcp_keepalive = off\n"                   /* 10 */
                                 "log_level = debug\n"                     /* 11 */
                                 "\n"                                      /* 12 */
                                 "# the write node\n"                      /* 13 */
                                 "[node.pg1]\n"                            /* 14 */
                                 "host = 127.0.0.1\n"                      /* 15 */
                                 "port = 5433\n"                           /* 16 */
                                 "role = primary\n"                        /* 17 */
                                 "\n"                                      /* 18 */
                                 "[node.pg_2-b]\n"                         /* 19 */
                                 "host = /var/run/postgresql\n"            /* 20 */
                                 "role = replica\n";                       /* 21 */

static void test_good_config(void **state)
{
    (void)state;
    assert_int_equal(load(good_config), 0);
    assert_int_equal(cfg.n_errors, 0);
    assert_string_equal(cfg.path, "t.ini");
    assert_string_equal(cfg.listen_addr, "0.0.0.0");
    assert_int_equal(cfg.listen_port, 7432);
    assert_int_equal(cfg.workers, 3);
    assert_int_equal(cfg.max_client_conn, 50);
    assert_int_equal(cfg.client_login_timeout_ms, 250);
    assert_int_equal(cfg.server_connect_timeout_ms, 120000);
    assert_int_equal(cfg.shutdown_timeout_ms, 3600000);
    assert_false(cfg.tcp_keepalive);
    assert_int_equal(cfg.log_level, LOG_LVL_DEBUG);

    assert_int_equal(cfg.n_nodes, 2);
    assert_string_equal(cfg.nodes[0].name, "pg1");
    assert_string_equal(cfg.nodes[0].host, "127.0.0.1");
    assert_int_equal(cfg.nodes[0].port, 5433);
    assert_int_equal(cfg.nodes[0].role, NODE_ROLE_PRIMARY);
    assert_int_equal(cfg.nodes[0].line, 14);
    assert_string_equal(cfg.nodes[1].name, "pg_2-b");
    assert_string_equal(cfg.nodes[1].host, "/var/run/postgresql");
    assert_int_equal(cfg.nodes[1].port, 5432); /* default */
    assert_int_equal(cfg.nodes[1].role, NODE_ROLE_REPLICA);
    assert_int_equal(cfg.nodes[1].line, 19);
    assert_int_equal(config_first_primary(&cfg), 0);
}

static void test_defaults(void **state)
{
    (void)state;
    assert_int_equal(load("[node.a]\nhost = db\nrole = primary\n"), 0);
    assert_string_equal(cfg.listen_addr, "127.0.0.1");
    assert_int_equal(cfg.listen_port, 6432);
    assert_int_equal(cfg.workers, ncpu()); /* default 0 = one per CPU */
    assert_int_equal(cfg.max_client_conn, 1000);
    assert_int_equal(cfg.client_login_timeout_ms, 60000);
    assert_int_equal(cfg.server_connect_timeout_ms, 5000);
    assert_int_equal(cfg.shutdown_timeout_ms, 30000);
    assert_true(cfg.tcp_keepalive);
    assert_int_equal(cfg.log_level, LOG_LVL_INFO);
    assert_string_equal(cfg.logfile, "");
    assert_false(cfg.syslog);
    assert_int_equal(cfg.syslog_facility, 0); /* daemon */
    assert_string_equal(cfg.syslog_ident, "pgrelay");
    assert_string_equal(cfg.admin_socket, CONFIG_DEFAULT_ADMIN_SOCKET);
    assert_int_equal(cfg.admin_socket_mode, 0600);
    assert_string_equal(cfg.admin_socket_group, "");
    assert_string_equal(cfg.admin_users, "");
    assert_int_equal(cfg.read_listen_port, 0);
    assert_int_equal(cfg.read_fallback, READ_FALLBACK_LEADER);
    assert_int_equal(cfg.max_replica_lag_bytes, 16777216);
    assert_int_equal(cfg.max_replica_lag_ms, 30000);
    assert_int_equal(cfg.no_leader_wait_ms, 5000);
    assert_int_equal(cfg.leader_change_grace_ms, 10000);
    assert_int_equal(cfg.on_leader_change, ON_LEADER_CHANGE_CLOSE_IDLE);
    assert_true(cfg.agent);
    assert_string_equal(cfg.agent_path, "");
    /* [agent] */
    assert_string_equal(cfg.monitor_user, "postgres");
    assert_string_equal(cfg.monitor_password, "");
    assert_string_equal(cfg.monitor_dbname, "postgres");
    assert_int_equal(cfg.health_interval_ms, 1000);
    assert_int_equal(cfg.health_timeout_ms, 2000);
    assert_int_equal(cfg.fall, 3);
    assert_int_equal(cfg.rise, 2);
    /* node */
    assert_int_equal(cfg.n_nodes, 1);
    assert_int_equal(cfg.nodes[0].port, 5432);
    assert_int_equal(cfg.nodes[0].line, 1);
    assert_string_equal(cfg.nodes[0].monitor_user, "");
    assert_string_equal(cfg.nodes[0].monitor_password, "");
    assert_string_equal(cfg.nodes[0].monitor_dbname, "");
    /* an empty [pgrelay] section changes nothing */
    assert_int_equal(load("[pgrelay]\n[node.a]\nhost = db\nrole = primary\n"), 0);
    assert_int_equal(cfg.listen_port, 6432);
    assert_int_equal(cfg.nodes[0].line, 2);
}

static void test_workers_zero_is_cpu_count(void **state)
{
    (void)state;
    assert_int_equal(load("[pgrelay]\nworkers = 0\n[node.a]\nhost = h\nrole = primary\n"), 0);
    assert_int_equal(cfg.workers, ncpu());
    assert_true(cfg.workers >= 1);
    assert_int_equal(load("[pgrelay]\nworkers = 256\n[node.a]\nhost = h\nrole = primary\n"), 0);
    assert_int_equal(cfg.workers, 256);
}

/* Set one [pgrelay] key and return the loaded config's error count. */
static int load_key(const char *key, const char *value)
{
    char text[512];
    snprintf(text, sizeof(text), "[pgrelay]\n%s = %s\n[node.a]\nhost = h\nrole = primary\n", key,
             value);
    return load(text);
}

static void test_durations_in_file(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int ms;
    } cases[] = {
        {"7", 7000},  {"7s", 7000},    {"1500ms", 1500},  {"3m", 180000},     {"5min", 300000},
        {"2h", 7200000}, {"0", 0},     {"0ms", 0},        {"10 s", 10000},    {"1ms", 1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        assert_int_equal(load_key("client_login_timeout", cases[i].text), 0);
        assert_int_equal(cfg.client_login_timeout_ms, cases[i].ms);
    }
    assert_int_equal(load_key("shutdown_timeout", "45"), 0);
    assert_int_equal(cfg.shutdown_timeout_ms, 45000);
    assert_int_equal(load_key("server_connect_timeout", "1ms"), 0);
    assert_int_equal(cfg.server_connect_timeout_ms, 1);
}

static void test_bools(void **state)
{
    (void)state;
    static const char *yes[] = {"on", "true", "yes", "1", "ON", "True", "YES"};
    static const char *no[] = {"off", "false", "no", "0", "OFF", "False", "No"};
    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        assert_int_equal(config_parse_bool(yes[i]), 1);
        assert_int_equal(config_parse_bool(no[i]), 0);
        assert_int_equal(load_key("tcp_keepalive", no[i]), 0);
        assert_false(cfg.tcp_keepalive);
        assert_int_equal(load_key("tcp_keepalive", yes[i]), 0);
        assert_true(cfg.tcp_keepalive);
    }
    assert_int_equal(config_parse_bool(""), -1);
    assert_int_equal(config_parse_bool("2"), -1);
    assert_int_equal(config_parse_bool("onn"), -1);
    assert_int_equal(config_parse_bool("enabled"), -1);

    expect_errors("[pgrelay]\ntcp_keepalive = maybe\n[node.a]\nhost = h\nrole = primary\n",
                  "t.ini:2: [pgrelay] tcp_keepalive: \"maybe\" is not a boolean (on or off)",
                  NULL);
}

static void test_enums(void **state)
{
    (void)state;
    static const struct {
        const char *word;
        int level;
    } levels[] = {{"error", LOG_LVL_ERROR},
                  {"warning", LOG_LVL_WARNING},
                  {"info", LOG_LVL_INFO},
                  {"DEBUG", LOG_LVL_DEBUG}};
    for (size_t i = 0; i < sizeof(levels) / sizeof(levels[0]); i++) {
        assert_int_equal(load_key("log_level", levels[i].word), 0);
        assert_int_equal(cfg.log_level, levels[i].level);
    }
    expect_errors("[pgrelay]\nlog_level = verbose\n[node.a]\nhost = h\nrole = primary\n",
                  "t.ini:2: [pgrelay] log_level: \"verbose\" is not one of: error, warning, info, "
                  "debug",
                  NULL);
    assert_int_equal(load("[node.a]\nhost = h\nrole = Replica\n"), 0);
    assert_int_equal(cfg.nodes[0].role, NODE_ROLE_REPLICA);
    assert_int_equal(config_first_primary(&cfg), -1);
    expect_errors("[node.a]\nhost = h\nrole = leader\n",
                  "t.ini:3: [node.a] role: \"leader\" is not one of: primary, replica",
                  "t.ini:1: [node.a]: missing required key \"role\" (primary or replica)", NULL);
}

static void test_unknown_key(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\n"
                  "listen_port = 7000\n"
                  "\n"
                  "listen_prot = 7001\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:4: [pgrelay]: unknown key \"listen_prot\"", NULL);
    assert_int_equal(cfg.listen_port, 7000);

    /* a [pgrelay] key inside a node, a node key inside [pgrelay] */
    expect_errors("[pgrelay]\n"
                  "host = h\n"
                  "[node.a]\n"
                  "host = h\n"
                  "workers = 2\n"
                  "role = primary\n",
                  "t.ini:2: [pgrelay]: unknown key \"host\"",
                  "t.ini:5: [node.a]: unknown key \"workers\"", NULL);

    /* the error text also works through the plain string search the brief asks for */
    assert_int_equal(load("[pgrelay]\nfoo_bar = 1\n[node.a]\nhost = h\nrole = primary\n"), 1);
    assert_non_null(strstr(cfg.errors[0], "t.ini:2:"));
    assert_non_null(strstr(cfg.errors[0], "foo_bar"));
}

static void test_unknown_section(void **state)
{
    (void)state;
    /* keys of an unknown section are not reported one by one */
    expect_errors("[pgrelays]\n"
                  "workers = 2\n"
                  "whatever = 3\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:1: unknown section [pgrelays] (known: [pgrelay], [agent], [control], [node.NAME])", NULL);
    assert_int_equal(cfg.workers, ncpu()); /* workers = 2 was not applied */

    /* a section without keys is still seen */
    expect_errors("[node.a]\nhost = h\nrole = primary\n\n[database]\n",
                  "t.ini:5: unknown section [database] (known: [pgrelay], [agent], [control], [node.NAME])", NULL);
}

static void test_bad_node_name(void **state)
{
    (void)state;
    expect_errors("[node.]\nhost = h\n[node.a]\nhost = h\nrole = primary\n",
                  "t.ini:1: [node.]: node name must be 1 to 63 letters, digits, '_' or '-'", NULL);
    expect_errors("[node.a]\nhost = h\nrole = primary\n[node.b.c]\n",
                  "t.ini:4: [node.b.c]: node name must be 1 to 63 letters, digits, '_' or '-'",
                  NULL);
    assert_int_equal(cfg.n_nodes, 1);
}

static void test_bad_duration(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\n"
                  "shutdown_timeout = 5x\n"
                  "client_login_timeout = -1\n"
                  "server_connect_timeout = 0\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:2: [pgrelay] shutdown_timeout: \"5x\" is not a duration (examples: 250ms, "
                  "5s, 2m, 7d)",
                  "t.ini:3: [pgrelay] client_login_timeout: \"-1\" is not a duration (examples: "
                  "250ms, 5s, 2m, 7d)",
                  "t.ini:4: [pgrelay] server_connect_timeout: 0 is out of range (at least 1ms)",
                  NULL);
    /* the defaults stay in place */
    assert_int_equal(cfg.shutdown_timeout_ms, 30000);
    assert_int_equal(cfg.client_login_timeout_ms, 60000);
    assert_int_equal(cfg.server_connect_timeout_ms, 5000);

    assert_int_equal(load_key("shutdown_timeout", "600h"), 1);
    assert_string_equal(cfg.errors[0],
                        "t.ini:2: [pgrelay] shutdown_timeout: 600h is out of range (at most 24d)");
    assert_int_equal(load_key("shutdown_timeout", "99999999999999999999s"), 1);
    assert_string_equal(cfg.errors[0], "t.ini:2: [pgrelay] shutdown_timeout: "
                                       "\"99999999999999999999s\" is not a duration (examples: "
                                       "250ms, 5s, 2m, 7d)");
}

static void test_bad_int(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\n"
                  "listen_port = 70000\n"
                  "workers = -1\n"
                  "max_client_conn = 0\n"
                  "[node.a]\n"
                  "host = h\n"
                  "port = 0\n"
                  "role = primary\n",
                  "t.ini:2: [pgrelay] listen_port: 70000 is out of range (1 to 65535)",
                  "t.ini:3: [pgrelay] workers: -1 is out of range (0 to 256)",
                  "t.ini:4: [pgrelay] max_client_conn: 0 is out of range (1 to 1000000)",
                  "t.ini:7: [node.a] port: 0 is out of range (1 to 65535)", NULL);
    assert_int_equal(cfg.listen_port, 6432);
    assert_int_equal(cfg.nodes[0].port, 5432);

    expect_errors("[pgrelay]\n"
                  "workers = 257\n"
                  "listen_port = 12ab\n"
                  "max_client_conn = 99999999999999999999\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:2: [pgrelay] workers: 257 is out of range (0 to 256)",
                  "t.ini:3: [pgrelay] listen_port: \"12ab\" is not an integer",
                  "t.ini:4: [pgrelay] max_client_conn: \"99999999999999999999\" is not an integer",
                  NULL);
}

static void test_no_node(void **state)
{
    (void)state;
    static const char *msg =
        "t.ini: no database node: add a [node.NAME] section with host, port and role";
    expect_errors("", msg, NULL);
    expect_errors("[pgrelay]\nworkers = 2\n", msg, NULL);
    expect_errors("; nothing but a comment\n\n", msg, NULL);
    assert_int_equal(cfg.n_nodes, 0);
    assert_int_equal(config_first_primary(&cfg), -1);
}

static void test_node_missing_keys(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\n"
                  "workers = 1\n"
                  "[node.a]\n"
                  "role = primary\n"
                  "[node.b]\n"
                  "host = h\n"
                  "[node.c]\n",
                  "t.ini:3: [node.a]: missing required key \"host\"",
                  "t.ini:5: [node.b]: missing required key \"role\" (primary or replica)",
                  "t.ini:7: [node.c]: missing required key \"host\"",
                  "t.ini:7: [node.c]: missing required key \"role\" (primary or replica)", NULL);
    assert_int_equal(cfg.n_nodes, 3);

    /* an empty host is refused where it is written, and is still missing */
    expect_errors("[node.a]\nhost =\nrole = primary\n",
                  "t.ini:2: [node.a] host: value must not be empty",
                  "t.ini:1: [node.a]: missing required key \"host\"", NULL);
}

static void test_duplicate_node(void **state)
{
    (void)state;
    expect_errors("[node.a]\n"
                  "host = first\n"
                  "role = primary\n"
                  "\n"
                  "[node.b]\n"
                  "host = h\n"
                  "role = replica\n"
                  "[node.a]\n"
                  "host = second\n"
                  "bogus = 1\n",
                  "t.ini:8: [node.a]: node defined twice (first at line 1)", NULL);
    assert_int_equal(cfg.n_nodes, 2);
    assert_string_equal(cfg.nodes[0].host, "first"); /* keys of the duplicate are ignored */
}

static void test_key_outside_section(void **state)
{
    (void)state;
    expect_errors("workers = 2\n"
                  "; comment\n"
                  "listen_port = 7000\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:1: key \"workers\" is outside any section (put it under [pgrelay])",
                  "t.ini:3: key \"listen_port\" is outside any section (put it under [pgrelay])",
                  NULL);
    assert_int_equal(cfg.listen_port, 6432);
}

static void test_syntax_error(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\n"
                  "workers = 2\n"
                  "this line has no equals sign\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:3: syntax error (expected [section], key = value, or a ; comment)", NULL);
    assert_int_equal(cfg.workers, 2); /* lines around it still count */
    assert_int_equal(cfg.n_nodes, 1);
}

static void test_crlf_and_whitespace(void **state)
{
    (void)state;
    expect_errors("[pgrelay]\r\n"
                  "  workers=2\r\n"
                  "bogus = 1\r\n"
                  "\r\n"
                  "[ node.a ]   ; the primary\r\n"
                  "host=h\r\n"
                  "role   =   primary\r\n",
                  "t.ini:3: [pgrelay]: unknown key \"bogus\"", NULL);
    assert_int_equal(cfg.workers, 2);
    assert_int_equal(cfg.n_nodes, 1);
    assert_string_equal(cfg.nodes[0].name, "a");
    assert_int_equal(cfg.nodes[0].line, 5);
    assert_string_equal(cfg.nodes[0].host, "h");
    /* no final newline */
    assert_int_equal(load("[node.a]\nhost = h\nrole = primary"), 0);
    assert_int_equal(cfg.nodes[0].role, NODE_ROLE_PRIMARY);
}

static void test_string_value(void **state)
{
    (void)state;
    char text[1024];
    char host[CONFIG_HOST_MAX + 1];
    memset(host, 'h', CONFIG_HOST_MAX);
    host[CONFIG_HOST_MAX] = '\0';
    /* shorter than inih's line limit: fine */
    snprintf(text, sizeof(text), "[node.a]\nhost = %.150s\nrole = primary\n", host);
    assert_int_equal(load(text), 0);
    assert_int_equal(strlen(cfg.nodes[0].host), 150);
}

static void test_many_errors_capped(void **state)
{
    (void)state;
    static char text[100 * 32];
    size_t off = 0;
    off += (size_t)snprintf(text + off, sizeof(text) - off, "[pgrelay]\n");
    for (int i = 0; i < 100; i++)
        off += (size_t)snprintf(text + off, sizeof(text) - off, "bad%d = 1\n", i);
    assert_int_equal(load(text), CONFIG_MAX_ERRORS);
    assert_string_equal(cfg.errors[0], "t.ini:2: [pgrelay]: unknown key \"bad0\"");
    assert_string_equal(cfg.errors[CONFIG_MAX_ERRORS - 1],
                        "t.ini:65: [pgrelay]: unknown key \"bad63\"");
}

static void test_load_file(void **state)
{
    (void)state;
    char path[] = "/tmp/pgrelay-test-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    FILE *fp = fdopen(fd, "w");
    assert_non_null(fp);
    fputs(good_config, fp);
    fputs("oops = 1\n", fp); /* line 22, inside [node.pg_2-b] */
    fclose(fp);

    assert_int_equal(config_load(&cfg, path), 1);
    char want[256];
    snprintf(want, sizeof(want), "%s:22: [node.pg_2-b]: unknown key \"oops\"", path);
    assert_string_equal(cfg.errors[0], want);
    assert_string_equal(cfg.path, path);
    assert_int_equal(cfg.listen_port, 7432);
    assert_int_equal(cfg.nodes[1].line, 19);
    unlink(path);

    assert_int_equal(config_load(&cfg, "/nonexistent/pgrelay.ini"), 1);
    assert_string_equal(cfg.errors[0],
                        "/nonexistent/pgrelay.ini: cannot open: No such file or directory");
}

static void test_parse_duration(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        long ms;
    } good[] = {
        {"0", 0},
        {"5", 5000},
        {"5s", 5000},
        {"250ms", 250},
        {"2m", 120000},
        {"2min", 120000},
        {"1h", 3600000},
        {" 5s", 5000},
        {"5 ms", 5},
        {"007", 7000},
        {"2147483647ms", 2147483647L}, /* INT_MAX */
        {"2147483s", 2147483000L},
        {"35791m", 2147460000L},
        {"596h", 2145600000L},
        {"1d", 86400000L},
        {"24d", 2073600000L},
    };
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        long ms = -12345;
        if (config_parse_duration(good[i].text, &ms) != 0)
            fail_msg("\"%s\" refused", good[i].text);
        assert_int_equal(ms, good[i].ms);
    }

    static const char *bad[] = {
        "",       "   ",     "5x",        "-1",         "+5",          "s",
        "ms",     "1.5s",    "5 x",       "5sec",       "5hh",         "0x10",
        "5s5",    "2147483648ms", "2147484s", "35792m",  "597h",        "99999999999999999999",
        "9223372036854775807", "9223372036854775807ms", "9223372036854775808", "1e3", "25d", "1dd",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        long ms = -12345;
        if (config_parse_duration(bad[i], &ms) != -1)
            fail_msg("\"%s\" accepted as %ld", bad[i], ms);
        assert_int_equal(ms, -12345); /* untouched on failure */
    }
}

static void test_format_value(void **state)
{
    (void)state;
    assert_int_equal(load(good_config), 0);
    static const struct {
        const char *name;
        const char *want;
    } cases[] = {
        {"listen_addr", "0.0.0.0"},       {"listen_port", "7432"},
        {"client_login_timeout", "250ms"}, {"server_connect_timeout", "120s"},
        {"tcp_keepalive", "off"},         {"log_level", "debug"},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        const config_key *key = NULL;
        for (size_t i = 0; i < config_n_keys; i++)
            if (strcmp(config_keys[i].section, "pgrelay") == 0 &&
                strcmp(config_keys[i].name, cases[c].name) == 0)
                key = &config_keys[i];
        assert_non_null(key);
        char buf[64];
        config_format_value(&cfg, key, &cfg, buf, sizeof(buf));
        assert_string_equal(buf, cases[c].want);
    }
    /* node keys format from the node */
    for (size_t i = 0; i < config_n_keys; i++) {
        if (strcmp(config_keys[i].section, "node") != 0)
            continue;
        char buf[64];
        config_format_value(&cfg, &config_keys[i], &cfg.nodes[1], buf, sizeof(buf));
        if (strcmp(config_keys[i].name, "role") == 0)
            assert_string_equal(buf, "replica");
        else if (strcmp(config_keys[i].name, "port") == 0)
            assert_string_equal(buf, "5432");
        else if (strcmp(config_keys[i].name, "host") == 0)
            assert_string_equal(buf, "/var/run/postgresql");
    }
}

/* Every key has a help line and a sane default that itself parses. */
static void test_key_table(void **state)
{
    (void)state;
    assert_true(config_n_keys >= 12);
    for (size_t i = 0; i < config_n_keys; i++) {
        const config_key *k = &config_keys[i];
        assert_non_null(k->help);
        assert_true(strcmp(k->section, "pgrelay") == 0 || strcmp(k->section, "agent") == 0 ||
                    strcmp(k->section, "control") == 0 || strcmp(k->section, "node") == 0);
        assert_ptr_equal(config_find(k->section, k->name), k); /* names are unique per section */
        if (k->type == KEY_DURATION) {
            long ms;
            assert_int_equal(config_parse_duration(k->def, &ms), 0);
            assert_true(ms >= k->min && ms <= k->max);
        }
        if (k->type == KEY_ENUM)
            assert_non_null(k->words);
    }
}

static void test_agent_section(void **state)
{
    (void)state;
    assert_int_equal(load("[pgrelay]\n"                     /* 1 */
                          "agent = off\n"                   /* 2 */
                          "agent_path = /opt/pgrelay-agent\n" /* 3 */
                          "[agent]\n"                       /* 4 */
                          "monitor_user = mon\n"            /* 5 */
                          "monitor_password = s3cret\n"     /* 6 */
                          "monitor_dbname = health\n"       /* 7 */
                          "health_interval = 500ms\n"       /* 8 */
                          "health_timeout = 3\n"            /* 9 */
                          "fall = 5\n"                      /* 10 */
                          "rise = 1\n"                      /* 11 */
                          "[node.a]\n"                      /* 12 */
                          "host = h\n"                      /* 13 */
                          "role = primary\n"                /* 14 */
                          "monitor_user = other\n"),        /* 15 */
                     0);
    assert_false(cfg.agent);
    assert_string_equal(cfg.agent_path, "/opt/pgrelay-agent");
    assert_string_equal(cfg.monitor_user, "mon");
    assert_string_equal(cfg.monitor_password, "s3cret");
    assert_string_equal(cfg.monitor_dbname, "health");
    assert_int_equal(cfg.health_interval_ms, 500);
    assert_int_equal(cfg.health_timeout_ms, 3000);
    assert_int_equal(cfg.fall, 5);
    assert_int_equal(cfg.rise, 1);
    assert_string_equal(cfg.nodes[0].monitor_user, "other");
    assert_string_equal(cfg.nodes[0].monitor_dbname, "");

    /* keys belong to their own section */
    expect_errors("[pgrelay]\n"
                  "fall = 2\n"
                  "[agent]\n"
                  "workers = 2\n"
                  "health_interval = 5ms\n"
                  "rise = 0\n"
                  "[node.a]\n"
                  "host = h\n"
                  "role = primary\n",
                  "t.ini:2: [pgrelay]: unknown key \"fall\"",
                  "t.ini:4: [agent]: unknown key \"workers\"",
                  "t.ini:5: [agent] health_interval: 5ms is out of range (at least 10ms)",
                  "t.ini:6: [agent] rise: 0 is out of range (1 to 1000)", NULL);
    assert_int_equal(cfg.workers, ncpu());
    assert_int_equal(cfg.fall, 3);
}

static void test_routing_keys(void **state)
{
    (void)state;
    assert_int_equal(load("[pgrelay]\n"
                          "read_listen_port = 6433\n"
                          "read_fallback = none\n"
                          "max_replica_lag_bytes = 1024\n"
                          "max_replica_lag_seconds = 5\n"
                          "no_leader_wait = 1500ms\n"
                          "leader_change_grace = 0\n"
                          "on_leader_change = close_all\n"
                          "syslog = on\n"
                          "syslog_facility = local3\n"
                          "[node.a]\nhost = h\nrole = primary\n"),
                     0);
    assert_int_equal(cfg.read_listen_port, 6433);
    assert_int_equal(cfg.read_fallback, READ_FALLBACK_NONE);
    assert_int_equal(cfg.max_replica_lag_bytes, 1024);
    assert_int_equal(cfg.max_replica_lag_ms, 5000);
    assert_int_equal(cfg.no_leader_wait_ms, 1500);
    assert_int_equal(cfg.leader_change_grace_ms, 0);
    assert_int_equal(cfg.on_leader_change, ON_LEADER_CHANGE_CLOSE_ALL);
    assert_true(cfg.syslog);
    assert_int_equal(cfg.syslog_facility, 5); /* daemon, user, local0, ... local3 */
    expect_errors("[pgrelay]\nread_fallback = primary\n[node.a]\nhost = h\nrole = primary\n",
                  "t.ini:2: [pgrelay] read_fallback: \"primary\" is not one of: leader, none",
                  NULL);
}

static void test_mode(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        int mode;
    } good[] = {{"0660", 0660}, {"660", 0660}, {"0", 0}, {"0777", 0777}, {"0600", 0600}};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
        assert_int_equal(load_key("admin_socket_mode", good[i].text), 0);
        assert_int_equal(cfg.admin_socket_mode, good[i].mode);
    }
    static const char *bad[] = {"0999", "01000", "-1", "rw-rw----", "0x1ff", "8"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char want[128];
        snprintf(want, sizeof(want),
                 "t.ini:2: [pgrelay] admin_socket_mode: \"%s\" is not an octal mode such as 0660",
                 bad[i]);
        assert_int_equal(load_key("admin_socket_mode", bad[i]), 1);
        assert_string_equal(cfg.errors[0], want);
        assert_int_equal(cfg.admin_socket_mode, 0600);
    }
    const config_key *k = config_find("pgrelay", "admin_socket_mode");
    assert_non_null(k);
    assert_int_equal(k->type, KEY_MODE);
    char buf[16];
    assert_int_equal(load_key("admin_socket_mode", "0660"), 0);
    config_format_value(&cfg, k, &cfg, buf, sizeof(buf));
    assert_string_equal(buf, "0660");
    assert_int_equal(load_key("admin_socket_mode", "7"), 0);
    config_format_value(&cfg, k, &cfg, buf, sizeof(buf));
    assert_string_equal(buf, "0007");
}

static void test_find(void **state)
{
    (void)state;
    assert_non_null(config_find("pgrelay", "workers"));
    assert_non_null(config_find("agent", "fall"));
    assert_non_null(config_find("node", "host"));
    assert_non_null(config_find("node", "monitor_user"));
    assert_non_null(config_find("agent", "monitor_user"));
    assert_ptr_not_equal(config_find("node", "monitor_user"), config_find("agent", "monitor_user"));
    assert_null(config_find("pgrelay", "host"));
    assert_null(config_find("agent", "workers"));
    assert_null(config_find("node.a", "host"));
    assert_null(config_find("pgrelay", ""));
}

/* ---- Once bugs, now fixed: kept as regression tests ----------------------------------------- */

/* config_error: with a file name of CONFIG_ERROR_LEN bytes or more, snprintf's return value
 * (the untruncated length) is used as the offset, so vsnprintf writes past errors[i]. */
static void test_long_file_name_does_not_overflow_errors(void **state)
{
    (void)state;
    static char name[600 + 1];
    memset(name, 'n', 600);
    memset(&cfg, 0, sizeof(cfg));
    assert_int_equal(config_load_string(&cfg, name, ""), 1);
    assert_int_equal(strlen(cfg.errors[0]), CONFIG_ERROR_LEN - 1);
    for (size_t i = 0; i < CONFIG_ERROR_LEN; i++)
        assert_int_equal(cfg.errors[1][i], 0); /* nothing written into the next slot */
}

/* An indented "key = value" line is taken by inih (INI_ALLOW_MULTILINE) as a continuation of
 * the previous key's value: host silently becomes "port = 5433". */
static void test_indented_key_is_a_key_not_a_continuation(void **state)
{
    (void)state;
    int n = load("[node.a]\nhost = x\n  port = 5433\nrole = primary\n");
    assert_true(n > 0 || (strcmp(cfg.nodes[0].host, "x") == 0 && cfg.nodes[0].port == 5433));
}

/* inih reads lines of at most INI_MAX_LINE (200) bytes: a longer line is cut, its first part
 * taken as the value (host truncated to 192 characters) and the rest reported as a syntax error
 * on the wrong line (3 instead of 2). CONFIG_HOST_MAX allows 255. */
static void test_line_longer_than_inih_buffer_is_read_whole(void **state)
{
    (void)state;
    char text[1024];
    char host[251];
    memset(host, 'h', 250);
    host[250] = '\0';
    snprintf(text, sizeof(text), "[node.a]\nhost = %s\nrole = primary\n", host);
    int n = load(text);
    if (n == 0) {
        assert_string_equal(cfg.nodes[0].host, host);
    } else {
        for (int i = 0; i < n; i++)
            assert_non_null(strstr(cfg.errors[i], "t.ini:2:"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_good_config, setup),
        cmocka_unit_test_setup(test_defaults, setup),
        cmocka_unit_test_setup(test_workers_zero_is_cpu_count, setup),
        cmocka_unit_test_setup(test_durations_in_file, setup),
        cmocka_unit_test_setup(test_bools, setup),
        cmocka_unit_test_setup(test_enums, setup),
        cmocka_unit_test_setup(test_unknown_key, setup),
        cmocka_unit_test_setup(test_unknown_section, setup),
        cmocka_unit_test_setup(test_bad_node_name, setup),
        cmocka_unit_test_setup(test_bad_duration, setup),
        cmocka_unit_test_setup(test_bad_int, setup),
        cmocka_unit_test_setup(test_no_node, setup),
        cmocka_unit_test_setup(test_node_missing_keys, setup),
        cmocka_unit_test_setup(test_duplicate_node, setup),
        cmocka_unit_test_setup(test_key_outside_section, setup),
        cmocka_unit_test_setup(test_syntax_error, setup),
        cmocka_unit_test_setup(test_crlf_and_whitespace, setup),
        cmocka_unit_test_setup(test_string_value, setup),
        cmocka_unit_test_setup(test_many_errors_capped, setup),
        cmocka_unit_test_setup(test_load_file, setup),
        cmocka_unit_test_setup(test_parse_duration, setup),
        cmocka_unit_test_setup(test_format_value, setup),
        cmocka_unit_test_setup(test_key_table, setup),
        cmocka_unit_test_setup(test_agent_section, setup),
        cmocka_unit_test_setup(test_routing_keys, setup),
        cmocka_unit_test_setup(test_mode, setup),
        cmocka_unit_test_setup(test_find, setup),
        cmocka_unit_test_setup(test_long_file_name_does_not_overflow_errors, setup),
        cmocka_unit_test_setup(test_indented_key_is_a_key_not_a_continuation, setup),
        cmocka_unit_test_setup(test_line_longer_than_inih_buffer_is_read_whole, setup),
    };
    return cmocka_run_group_tests_name("config", tests, NULL, NULL);
}
