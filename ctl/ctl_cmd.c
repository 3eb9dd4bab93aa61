/* ctl_cmd.c - pgrelayctl's commands: one request each, its answer checked, then rendered. */
#include "ctl.h"
#include "ctl_http.h"
#include "ctl_render.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CTL_API_DEPLOYMENTS "/api/v1/deployments"
#define CTL_FAILURES_SHOWN  5   /* failing proxies named in a one-line error */
#define CTL_NAMES_MAX       512 /* deployment names listed in an error */

#define CTL_COLUMNS(a) (a), (sizeof(a) / sizeof((a)[0]))

static const ctl_column ctl_deployment_columns[] = {
    {"name", CTL_CELL_PLAIN},
    {"proxies", CTL_CELL_PLAIN},
    {"live", CTL_CELL_PLAIN},
};

static const ctl_column ctl_proxy_columns[] = {
    {"node_id", CTL_CELL_PLAIN},        {"hostname", CTL_CELL_PLAIN},
    {"version", CTL_CELL_PLAIN},        {"last_seen", CTL_CELL_TIME},
    {"live", CTL_CELL_PLAIN},           {"epoch", CTL_CELL_PLAIN},
    {"leader", CTL_CELL_PLAIN},         {"maintenance", CTL_CELL_PLAIN},
    {"config_version", CTL_CELL_PLAIN}, {"status", CTL_CELL_PLAIN},
};

static const ctl_column ctl_node_columns[] = {
    {"name", CTL_CELL_PLAIN},      {"host", CTL_CELL_PLAIN},   {"port", CTL_CELL_PLAIN},
    {"role", CTL_CELL_PLAIN},      {"leader", CTL_CELL_PLAIN}, {"health", CTL_CELL_PLAIN},
    {"lag_bytes", CTL_CELL_PLAIN},
};

static const ctl_column ctl_query_columns[] = {
    {"node_id", CTL_CELL_PLAIN},     {"session", CTL_CELL_PLAIN},
    {"client", CTL_CELL_PLAIN},      {"application_name", CTL_CELL_PLAIN},
    {"user", CTL_CELL_PLAIN},        {"database", CTL_CELL_PLAIN},
    {"node", CTL_CELL_PLAIN},        {"state", CTL_CELL_PLAIN},
    {"duration_ms", CTL_CELL_PLAIN}, {"as_of", CTL_CELL_TIME},
    {"text", CTL_CELL_STATEMENT},
};

/* show-metrics: one row per proxy ("all" of its nodes) and one per node it reported. */
static const ctl_column ctl_metrics_columns[] = {
    {"node_id", CTL_CELL_PLAIN},     {"node", CTL_CELL_PLAIN},         {"live", CTL_CELL_PLAIN},
    {"sessions", CTL_CELL_PLAIN},    {"statements_s", CTL_CELL_PLAIN}, {"bytes_in_s", CTL_CELL_PLAIN},
    {"bytes_out_s", CTL_CELL_PLAIN}, {"errors_s", CTL_CELL_PLAIN},     {"latency_ms", CTL_CELL_PLAIN},
    {"p99_ms", CTL_CELL_PLAIN},
};

/* The per-proxy answers of an operation. */
static const ctl_column ctl_result_columns[] = {
    {"node_id", CTL_CELL_PLAIN},
    {"ok", CTL_CELL_PLAIN},
    {"detail", CTL_CELL_PLAIN},
};

static const ctl_column ctl_config_proxy_columns[] = {
    {"node_id", CTL_CELL_PLAIN},
    {"config_version", CTL_CELL_PLAIN},
};

static ctl_exit ctl_report(const ctl_answer *ans)
{
    ctl_error("%s", ans->message);
    return ans->rc;
}

/* "/api/v1/deployments/NAME/what" (malloc'd), or NULL when out of memory. */
static char *ctl_deployment_path(ctl_ctx *ctx, const char *what)
{
    char *name = ctl_http_escape(ctx->http, ctx->deployment);
    char *path = NULL;
    if (name && asprintf(&path, CTL_API_DEPLOYMENTS "/%s/%s", name, what) < 0)
        path = NULL;
    free(name);
    if (!path)
        ctl_error("out of memory");
    return path;
}

ctl_exit ctl_resolve_deployment(ctl_ctx *ctx)
{
    ctl_answer ans;
    char names[CTL_NAMES_MAX] = "";
    size_t i, used = 0;
    json_t *row;
    ctl_exit rc;

    if ((rc = ctl_http_request(ctx->http, "GET", CTL_API_DEPLOYMENTS, NULL, ctx->timeout_s,
                               &ans)) != CTL_EXIT_OK) {
        ctl_report(&ans);
        goto done;
    }
    json_array_foreach(ans.body, i, row)
    {
        if (!json_is_string(json_object_get(row, "name")))
            break;
    }
    if (!ctl_is_rows(ans.body) || i < json_array_size(ans.body)) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: deployments are not an array of objects with a name");
        rc = ctl_report(&ans);
        goto done;
    }
    switch (json_array_size(ans.body)) {
    case 0:
        ctl_error("%s: there are no deployments yet (no agent has registered)", ans.endpoint);
        rc = CTL_EXIT_NOT_FOUND;
        break;
    case 1:
        ctx->resolved_deployment =
            strdup(json_string_value(json_object_get(json_array_get(ans.body, 0), "name")));
        if (!ctx->resolved_deployment) {
            ctl_error("out of memory");
            rc = CTL_EXIT_FAILED;
            break;
        }
        ctx->deployment = ctx->resolved_deployment;
        if (ctx->verbose)
            fprintf(stderr, CTL_PROG ": deployment %s (the only one)\n", ctx->deployment);
        break;
    default:
        json_array_foreach(ans.body, i, row)
        {
            if (used < sizeof(names))
                used += (size_t)snprintf(names + used, sizeof(names) - used, "%s%s", i ? ", " : "",
                                         json_string_value(json_object_get(row, "name")));
        }
        ctl_error("there are %zu deployments (%s): choose one with --deployment NAME or "
                  "PGRELAYCTL_DEPLOYMENT",
                  json_array_size(ans.body), names);
        rc = CTL_EXIT_USAGE;
    }
done:
    ctl_answer_free(&ans);
    return rc;
}

/* A rate or latency as the table shows it: one decimal ("0" for nothing), or null as is. */
static json_t *ctl_metric_value(const json_t *v)
{
    if (!json_is_number(v))
        return json_null();
    double x = json_number_value(v);
    return x == 0.0 ? json_string("0") : json_sprintf("%.1f", x);
}

/* One table row of show-metrics from a proxy or node entry of the metrics answer. */
static json_t *ctl_metrics_row(const json_t *proxy, const char *node, const json_t *sessions,
                               const json_t *rates, const json_t *latency, const json_t *p99)
{
    return json_pack("{s:O, s:s, s:O, s:O, s:o, s:o, s:o, s:o, s:o, s:o}", "node_id",
                     json_object_get(proxy, "node_id"), "node", node, "live",
                     json_object_get(proxy, "live"), "sessions", sessions ? sessions : json_null(),
                     "statements_s", ctl_metric_value(json_object_get(rates, "statements")),
                     "bytes_in_s", ctl_metric_value(json_object_get(rates, "bytes_in")),
                     "bytes_out_s", ctl_metric_value(json_object_get(rates, "bytes_out")),
                     "errors_s", ctl_metric_value(json_object_get(rates, "errors")), "latency_ms",
                     ctl_metric_value(latency), "p99_ms", ctl_metric_value(p99));
}

/* The metrics answer (a list of proxies, each with its nodes) as rows for a table. */
static json_t *ctl_metrics_rows(const json_t *body)
{
    json_t *rows = json_array();
    size_t i, j;
    json_t *p, *n;
    json_array_foreach(body, i, p)
    {
        json_t *row = ctl_metrics_row(p, "(all)",
                                      json_object_get(json_object_get(p, "sample"), "clients"),
                                      json_object_get(p, "rates"), json_object_get(p, "latency_ms"),
                                      json_object_get(p, "p99_ms"));
        if (row)
            json_array_append_new(rows, row);
        json_array_foreach(json_object_get(p, "nodes"), j, n)
        {
            const char *name = json_string_value(json_object_get(n, "name"));
            row = ctl_metrics_row(p, name ? name : "?", json_object_get(n, "sessions"),
                                  json_object_get(n, "rates"), json_object_get(n, "latency_ms"),
                                  json_object_get(n, "p99_ms"));
            if (row)
                json_array_append_new(rows, row);
        }
    }
    return rows;
}

/* The answer as table rows, when it is not already one row per line of the table. */
typedef json_t *(*ctl_rows_fn)(const json_t *body);

/* GET a list and print it: path NULL is the deployments list, else a deployment's what. The
 * table shows to_rows(answer) when to_rows is given; JSON is always the answer as it is. */
static ctl_exit ctl_show(ctl_ctx *ctx, const char *what, ctl_rows_fn to_rows,
                         const ctl_column *cols, size_t ncols)
{
    ctl_answer ans = {0};
    char *path = what ? ctl_deployment_path(ctx, what) : strdup(CTL_API_DEPLOYMENTS);
    ctl_exit rc = CTL_EXIT_FAILED;

    if (!path)
        goto done;
    if ((rc = ctl_http_request(ctx->http, "GET", path, NULL, ctx->timeout_s, &ans)) !=
        CTL_EXIT_OK) {
        ctl_report(&ans);
        goto done;
    }
    if (!ctl_is_rows(ans.body)) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: expected an array of objects");
        rc = ctl_report(&ans);
        goto done;
    }
    if (ctx->format == CTL_FORMAT_JSON) {
        ctl_render_json(stdout, ans.body);
    } else {
        json_t *rows = to_rows ? to_rows(ans.body) : json_incref(ans.body);
        ctl_render_table(stdout, rows, cols, ncols);
        json_decref(rows);
    }
done:
    ctl_answer_free(&ans);
    free(path);
    return rc;
}

ctl_exit ctl_cmd_show_deployments(ctl_ctx *ctx)
{
    return ctl_show(ctx, NULL, NULL, CTL_COLUMNS(ctl_deployment_columns));
}

ctl_exit ctl_cmd_show_proxies(ctl_ctx *ctx)
{
    return ctl_show(ctx, "proxies", NULL, CTL_COLUMNS(ctl_proxy_columns));
}

ctl_exit ctl_cmd_show_nodes(ctl_ctx *ctx)
{
    return ctl_show(ctx, "nodes", NULL, CTL_COLUMNS(ctl_node_columns));
}

ctl_exit ctl_cmd_show_queries(ctl_ctx *ctx)
{
    return ctl_show(ctx, "queries", NULL, CTL_COLUMNS(ctl_query_columns));
}

ctl_exit ctl_cmd_show_metrics(ctl_ctx *ctx)
{
    return ctl_show(ctx, "metrics", ctl_metrics_rows, CTL_COLUMNS(ctl_metrics_columns));
}

static const ctl_column ctl_operation_columns[] = {
    {"id", CTL_CELL_PLAIN},    {"kind", CTL_CELL_PLAIN},    {"node", CTL_CELL_PLAIN},
    {"old_leader", CTL_CELL_PLAIN}, {"promote", CTL_CELL_PLAIN}, {"force", CTL_CELL_PLAIN},
    {"created", CTL_CELL_TIME}, {"state", CTL_CELL_PLAIN},   {"steps", CTL_CELL_PLAIN},
    {"outcome", CTL_CELL_STATEMENT},
};

/* One row per operation, its steps as "pause fence ... resume". */
static json_t *ctl_operation_rows(const json_t *body)
{
    json_t *rows = json_array();
    size_t i, j;
    json_t *op, *step;
    json_array_foreach(body, i, op)
    {
        char steps[512] = "";
        size_t off = 0;
        json_array_foreach(json_object_get(op, "steps"), j, step)
        {
            const char *name = json_string_value(json_object_get(step, "step"));
            if (name && strcmp(name, "begin") != 0 && off < sizeof(steps))
                off += (size_t)snprintf(steps + off, sizeof(steps) - off, "%s%s", off ? " " : "",
                                        name);
        }
        json_t *row = json_deep_copy(op);
        if (row) {
            json_object_set_new(row, "steps", json_string(steps));
            json_array_append_new(rows, row);
        }
    }
    return rows;
}

ctl_exit ctl_cmd_show_operations(ctl_ctx *ctx)
{
    return ctl_show(ctx, "operations", ctl_operation_rows, CTL_COLUMNS(ctl_operation_columns));
}

/* Is body an operation's answer: an object with a boolean "ok" (required when strict) and, if
 * there is a "proxies", an array of objects? */
static bool ctl_is_result(const json_t *body, bool strict)
{
    json_t *ok = json_object_get(body, "ok");
    json_t *proxies = json_object_get(body, "proxies");
    if (!json_is_object(body))
        return false;
    if (ok ? !json_is_boolean(ok) : strict)
        return false;
    if (proxies && !ctl_is_rows(proxies))
        return false;
    return ok || proxies;
}

/* "proxy-b: detail; proxy-c: no answer" for the proxies that did not say ok. */
static void ctl_failures(const json_t *body, char *out, size_t outlen)
{
    size_t i, used = 0, shown = 0, failed = 0;
    json_t *row;

    out[0] = '\0';
    json_array_foreach(json_object_get(body, "proxies"), i, row)
    {
        if (json_is_true(json_object_get(row, "ok")))
            continue;
        failed++;
        if (shown >= CTL_FAILURES_SHOWN || used >= outlen)
            continue;
        const char *id = json_string_value(json_object_get(row, "node_id"));
        const char *detail = json_string_value(json_object_get(row, "detail"));
        used += (size_t)snprintf(out + used, outlen - used, "%s%s: %s", shown ? "; " : "",
                                 id ? id : "?", detail && detail[0] ? detail : "failed");
        shown++;
    }
    if (failed > shown && used < outlen)
        snprintf(out + used, outlen - used, "; and %zu more", failed - shown);
}

static void ctl_render_result(const ctl_ctx *ctx, const json_t *body)
{
    const char *key;
    json_t *v;

    if (ctx->format == CTL_FORMAT_JSON) {
        ctl_render_json(stdout, body);
        return;
    }
    /* The error text goes to stderr, with the endpoint. */
    static const char *const skip[] = {"error", NULL};
    ctl_render_fields(stdout, body, skip);
    json_object_foreach((json_t *)body, key, v)
    {
        if (!ctl_is_rows(v))
            continue;
        fputc('\n', stdout);
        if (strcmp(key, "proxies") == 0)
            ctl_render_table(stdout, v, CTL_COLUMNS(ctl_result_columns));
        else
            ctl_render_table(stdout, v, NULL, 0);
    }
}

/* POST body (consumed) to the deployment's what and print the per-proxy answers. The HTTP
 * timeout leaves the server op_timeout_s plus a margin. action names it in errors. */
static ctl_exit ctl_operation(ctl_ctx *ctx, const char *what, const char *action, json_t *body,
                              long op_timeout_s)
{
    ctl_answer ans = {0};
    char failures[CTL_MESSAGE_MAX / 2];
    char *path = ctl_deployment_path(ctx, what);
    double timeout_s = (double)op_timeout_s + CTL_OP_TIMEOUT_MARGIN_S;
    ctl_exit rc = CTL_EXIT_FAILED;

    if (!path || !body) {
        if (!body)
            ctl_error("out of memory");
        goto done;
    }
    if (timeout_s < ctx->timeout_s)
        timeout_s = ctx->timeout_s;
    rc = ctl_http_request(ctx->http, "POST", path, body, timeout_s, &ans);
    bool detailed = ctl_is_result(ans.body, rc == CTL_EXIT_OK);
    if (rc == CTL_EXIT_OK && !detailed) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: expected an object with a boolean \"ok\" and "
                        "\"proxies\" an array of objects");
        rc = ctl_report(&ans);
        goto done;
    }
    if (detailed)
        ctl_render_result(ctx, ans.body);
    if (rc == CTL_EXIT_OK && json_is_true(json_object_get(ans.body, "ok")))
        goto done;
    const char *state = json_string_value(json_object_get(ans.body, "state"));
    if (rc == CTL_EXIT_OK && state && strcmp(state, "committed") == 0) {
        /* config apply: in force, but not on every proxy yet */
        ctl_failures(ans.body, failures, sizeof(failures));
        ctl_answer_fail(&ans, CTL_EXIT_COMMITTED,
                        "%s: version %lld is committed (the deployment's configuration, in force "
                        "on the proxies that acknowledged it) but not yet on %zu of %zu proxies: "
                        "%s; each takes it by itself once it answers and can write its file "
                        "(fix what it answered, or delete-proxy one that is gone for good); "
                        "'" CTL_PROG " show-operations' shows when it is everywhere",
                        action, (long long)json_integer_value(json_object_get(ans.body, "version")),
                        json_array_size(json_object_get(ans.body, "pending")),
                        json_array_size(json_object_get(ans.body, "proxies")), failures);
    } else if (detailed && !ans.has_error_text) {
        /* No text from the server: name the proxies that refused or stayed silent. */
        ctl_failures(ans.body, failures, sizeof(failures));
        ctl_answer_fail(&ans, rc == CTL_EXIT_OK ? CTL_EXIT_FAILED : rc, "%s failed%s%s", action,
                        failures[0] ? ": " : "", failures);
    } else if (rc == CTL_EXIT_OK) {
        ctl_answer_fail(&ans, CTL_EXIT_FAILED, "%s",
                        json_string_value(json_object_get(ans.body, "error")));
    }
    rc = ctl_report(&ans);
done:
    json_decref(body);
    ctl_answer_free(&ans);
    free(path);
    return rc;
}

ctl_exit ctl_cmd_switchover(ctl_ctx *ctx)
{
    json_t *body = json_pack("{s:s, s:b, s:b, s:I}", "node", ctx->node, "promote", ctx->promote,
                             "force", ctx->force, "timeout_s", (json_int_t)ctx->op_timeout_s);
    return ctl_operation(ctx, "switchover", "switchover", body, ctx->op_timeout_s);
}

ctl_exit ctl_cmd_unfence(ctl_ctx *ctx)
{
    json_t *body = json_pack("{s:s, s:I}", "node", ctx->argv[0], "timeout_s",
                             (json_int_t)ctx->op_timeout_s);
    return ctl_operation(ctx, "unfence", "unfence", body, ctx->op_timeout_s);
}

ctl_exit ctl_cmd_maintenance(ctl_ctx *ctx)
{
    json_t *body = json_pack("{s:b, s:I}", "on", ctx->maintenance_on, "timeout_s",
                             (json_int_t)ctx->op_timeout_s);
    if (body && ctx->resume_after_s > 0)
        json_object_set_new(body, "resume_after_s", json_integer(ctx->resume_after_s));
    return ctl_operation(ctx, "maintenance", "maintenance", body, ctx->op_timeout_s);
}

ctl_exit ctl_cmd_reload(ctl_ctx *ctx)
{
    return ctl_operation(ctx, "reload", "reload", json_object(), CTL_OP_TIMEOUT_DEFAULT_S);
}

ctl_exit ctl_cmd_config_apply(ctl_ctx *ctx)
{
    json_t *body = json_object();
    if (body &&
        json_object_set_new(body, "text", json_stringn(ctx->config_text, ctx->config_len)) != 0) {
        json_decref(body);
        body = NULL;
    }
    /* without --timeout the control plane's default (the same 30 s) applies */
    if (body && ctx->op_timeout_given &&
        json_object_set_new(body, "timeout_s", json_integer(ctx->op_timeout_s)) != 0) {
        json_decref(body);
        body = NULL;
    }
    /* the control plane may add its commit step's minimum to timeout_s */
    return ctl_operation(ctx, "config", "config apply", body,
                         ctx->op_timeout_s + CTL_CONFIG_COMMIT_MIN_S);
}

ctl_exit ctl_read_config_file(ctl_ctx *ctx, const char *path)
{
    bool is_stdin = strcmp(path, "-") == 0;
    const char *name = is_stdin ? "standard input" : path;
    FILE *f = is_stdin ? stdin : fopen(path, "r");
    size_t cap = CTL_CONFIG_MAX + 1, len = 0, n;
    char *text = NULL;
    ctl_exit rc = CTL_EXIT_USAGE;

    if (!f) {
        ctl_error("config apply: cannot open %s: %s", name, strerror(errno));
        goto done;
    }
    if (!(text = malloc(cap + 1))) {
        ctl_error("out of memory");
        rc = CTL_EXIT_FAILED;
        goto done;
    }
    while (len < cap && (n = fread(text + len, 1, cap - len, f)) > 0)
        len += n;
    if (ferror(f)) {
        ctl_error("config apply: cannot read %s: %s", name, strerror(errno));
        goto done;
    }
    if (len > CTL_CONFIG_MAX) {
        ctl_error("config apply: %s is larger than %u MiB", name, CTL_CONFIG_MAX >> 20);
        goto done;
    }
    text[len] = '\0';
    json_t *probe = json_stringn(text, len);
    if (!probe || memchr(text, '\0', len)) {
        ctl_error("config apply: %s is not UTF-8 text", name);
        json_decref(probe);
        goto done;
    }
    json_decref(probe);
    ctx->config_text = text;
    ctx->config_len = len;
    text = NULL;
    rc = CTL_EXIT_OK;
done:
    if (f && !is_stdin)
        fclose(f);
    free(text);
    return rc;
}

ctl_exit ctl_cmd_config_show(ctl_ctx *ctx)
{
    ctl_answer ans = {0};
    char *path = ctl_deployment_path(ctx, "config");
    ctl_exit rc = CTL_EXIT_FAILED;
    static const char *const skip[] = {"text", NULL};

    if (!path)
        goto done;
    if ((rc = ctl_http_request(ctx->http, "GET", path, NULL, ctx->timeout_s, &ans)) !=
        CTL_EXIT_OK) {
        ctl_report(&ans);
        goto done;
    }
    json_t *version = json_object_get(ans.body, "version");
    json_t *text = json_object_get(ans.body, "text");
    json_t *proxies = json_object_get(ans.body, "proxies");
    if (!json_is_object(ans.body) || !(json_is_integer(version) || json_is_null(version)) ||
        !(json_is_string(text) || json_is_null(text)) || (proxies && !ctl_is_rows(proxies))) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: expected {\"version\": integer, \"text\": string, "
                        "\"proxies\": [objects]}");
        rc = ctl_report(&ans);
        goto done;
    }
    if (ctx->format == CTL_FORMAT_JSON) {
        ctl_render_json(stdout, ans.body);
        goto done;
    }
    ctl_render_fields(stdout, ans.body, skip);
    fputc('\n', stdout);
    if (json_is_string(text) && json_string_length(text) > 0) {
        const char *t = json_string_value(text);
        size_t len = json_string_length(text);
        fwrite(t, 1, len, stdout);
        if (t[len - 1] != '\n')
            fputc('\n', stdout);
    } else {
        fputs("(no configuration has been applied through the control plane)\n", stdout);
    }
    fputc('\n', stdout);
    if (proxies)
        ctl_render_table(stdout, proxies, CTL_COLUMNS(ctl_config_proxy_columns));
    else
        fputs("(no proxies)\n", stdout);
done:
    ctl_answer_free(&ans);
    free(path);
    return rc;
}

/* ---- declared membership ---- */

/* METHOD the deployment's what (body consumed, may be NULL) and print the proxy it answers. */
static ctl_exit ctl_member_request(ctl_ctx *ctx, const char *method, const char *what, json_t *body)
{
    ctl_answer ans = {0};
    char *path = ctl_deployment_path(ctx, what);
    ctl_exit rc = CTL_EXIT_FAILED;
    static const char *const skip[] = {"error", NULL};

    if (!path)
        goto done;
    if ((rc = ctl_http_request(ctx->http, method, path, body, ctx->timeout_s, &ans)) !=
        CTL_EXIT_OK) {
        ctl_report(&ans);
        goto done;
    }
    if (!json_is_object(ans.body) || !json_is_string(json_object_get(ans.body, "node_id"))) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: expected an object with a node_id");
        rc = ctl_report(&ans);
        goto done;
    }
    if (ctx->format == CTL_FORMAT_JSON)
        ctl_render_json(stdout, ans.body);
    else
        ctl_render_fields(stdout, ans.body, skip);
done:
    json_decref(body);
    ctl_answer_free(&ans);
    free(path);
    return rc;
}

/* "proxies/ESCAPED-ID" + suffix (malloc'd), or NULL when out of memory. */
static char *ctl_proxy_what(ctl_ctx *ctx, const char *node_id, const char *suffix)
{
    char *id = ctl_http_escape(ctx->http, node_id);
    char *what = NULL;
    if (id && asprintf(&what, "proxies/%s%s", id, suffix) < 0)
        what = NULL;
    free(id);
    if (!what)
        ctl_error("out of memory");
    return what;
}

ctl_exit ctl_cmd_create_proxy(ctl_ctx *ctx)
{
    return ctl_member_request(ctx, "POST", "proxies", json_pack("{s:s}", "node_id", ctx->argv[0]));
}

ctl_exit ctl_cmd_delete_proxy(ctl_ctx *ctx)
{
    char *what = ctl_proxy_what(ctx, ctx->argv[0], "");
    ctl_exit rc = what ? ctl_member_request(ctx, "DELETE", what, NULL) : CTL_EXIT_FAILED;
    free(what);
    return rc;
}

ctl_exit ctl_check_proxy_options(ctl_ctx *ctx)
{
    for (int i = 1; i < ctx->argc; i++) {
        const char *eq = strchr(ctx->argv[i], '=');
        if (!eq || eq == ctx->argv[i]) {
            ctl_error("set-proxy-options: \"%s\" is not KEY=VALUE", ctx->argv[i]);
            return CTL_EXIT_USAGE;
        }
    }
    return CTL_EXIT_OK;
}

ctl_exit ctl_cmd_set_proxy_options(ctl_ctx *ctx)
{
    json_t *options = json_object();
    for (int i = 1; options && i < ctx->argc; i++) {
        const char *eq = strchr(ctx->argv[i], '=');
        char *key = strndup(ctx->argv[i], (size_t)(eq - ctx->argv[i]));
        if (!key || json_object_set_new(options, key, json_string(eq + 1)) != 0) {
            json_decref(options);
            options = NULL;
        }
        free(key);
    }
    char *what = ctl_proxy_what(ctx, ctx->argv[0], "/options");
    if (!options || !what) {
        json_decref(options);
        free(what);
        if (what)
            ctl_error("out of memory (or an option value is not UTF-8)");
        return CTL_EXIT_FAILED;
    }
    ctl_exit rc = ctl_member_request(ctx, "POST", what, json_pack("{s:o}", "options", options));
    free(what);
    return rc;
}
