/* ctl_plans.c - pgrelayctl show-plans: the control plane's query plans, each with its tree as
 * EXPLAIN's text form reads. */
#include "ctl.h"
#include "ctl_http.h"
#include "ctl_render.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CTL_PLANS_PATH      "/api/v1/deployments/%s/plans%s%s%s%s"
#define CTL_PLAN_TEXT_SHOWN 200 /* characters of a statement's text in the table form */

/* One detail line of a plan node ("Filter: (t.id = 5)"); lists are joined with ", ". */
static void ctl_plan_detail(FILE *out, const json_t *node, const char *key, int indent)
{
    json_t *v = json_object_get(node, key);
    if (!v)
        return;
    fprintf(out, "%*s%s: ", indent, "", key);
    if (json_is_string(v)) {
        fputs(json_string_value(v), out);
    } else if (json_is_array(v)) {
        size_t i;
        json_t *e;
        json_array_foreach(v, i, e)
            fprintf(out, "%s%s", i ? ", " : "", json_is_string(e) ? json_string_value(e) : "?");
    } else {
        char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
        fputs(text ? text : "?", out);
        free(text);
    }
    fputc('\n', out);
}

/* A plan node and its children, as EXPLAIN (FORMAT TEXT, VERBOSE) prints them: the top node
 * at the margin, each child as "->  " under its parent, its details six columns further in. */
static void ctl_plan_node(FILE *out, const json_t *node, int depth)
{
    static const char *const details[] = {
        "Output", "Index Cond", "Recheck Cond", "Hash Cond",       "Merge Cond", "Join Filter",
        "Filter", "Sort Key",   "Group Key",    "One-Time Filter", NULL};
    const char *type = json_string_value(json_object_get(node, "Node Type"));
    const char *operation = json_string_value(json_object_get(node, "Operation"));
    if (type && operation && strcmp(type, "ModifyTable") == 0)
        type = operation; /* "Insert on t" */
    const char *join = json_string_value(json_object_get(node, "Join Type"));
    const char *strategy = json_string_value(json_object_get(node, "Strategy"));
    const char *index = json_string_value(json_object_get(node, "Index Name"));
    const char *schema = json_string_value(json_object_get(node, "Schema"));
    const char *rel = json_string_value(json_object_get(node, "Relation Name"));
    const char *alias = json_string_value(json_object_get(node, "Alias"));
    const char *func = json_string_value(json_object_get(node, "Function Name"));
    if (!func) /* "CTE Scan on d", "Subquery Scan on s": named like a function, unqualified */
        func = json_string_value(json_object_get(node, "CTE Name"));
    if (!func && type && strcmp(type, "Subquery Scan") == 0)
        func = alias;
    int label_indent = depth ? 6 * depth - 4 : 0;
    int detail_indent = depth ? 6 * depth + 2 : 2;

    fprintf(out, "%*s%s", label_indent, "", depth ? "->  " : "");
    if (type && strcmp(type, "Aggregate") == 0 && strategy && strcmp(strategy, "Plain") != 0)
        fprintf(out, "%s",
                strcmp(strategy, "Hashed") == 0   ? "HashAggregate"
                : strcmp(strategy, "Sorted") == 0 ? "GroupAggregate"
                                                  : "MixedAggregate");
    else if (join && strcmp(join, "Inner") != 0 && type) {
        /* "Hash Join" with a Left join type reads "Hash Left Join" */
        const char *sp = strstr(type, " Join");
        fprintf(out, "%.*s %s%s", sp ? (int)(sp - type) : (int)strlen(type), type, join,
                sp ? sp : "");
    } else
        fputs(type ? type : "?", out);
    if (index)
        fprintf(out, " using %s", index);
    if (rel)
        fprintf(out, " on %s%s%s", schema ? schema : "", schema ? "." : "", rel);
    else if (func)
        fprintf(out, " on %s%s%s", schema ? schema : "", schema ? "." : "", func);
    if (alias && ((rel && strcmp(alias, rel) != 0) || (func && strcmp(alias, func) != 0)))
        fprintf(out, " %s", alias);
    json_t *startup = json_object_get(node, "Startup Cost");
    json_t *total = json_object_get(node, "Total Cost");
    if (json_is_number(startup) && json_is_number(total))
        fprintf(out, "  (cost=%.2f..%.2f rows=%lld width=%lld)", json_number_value(startup),
                json_number_value(total),
                (long long)json_integer_value(json_object_get(node, "Plan Rows")),
                (long long)json_integer_value(json_object_get(node, "Plan Width")));
    fputc('\n', out);
    for (int i = 0; details[i]; i++)
        ctl_plan_detail(out, node, details[i], detail_indent);
    size_t i;
    json_t *child;
    json_array_foreach(json_object_get(node, "Plans"), i, child)
        ctl_plan_node(out, child, depth + 1);
}

/* A plan as EXPLAIN's FORMAT JSON gives it ([{"Plan": {...}}]), as its text form. */
static void ctl_plan_tree(FILE *out, const json_t *plan, const char *indent)
{
    json_t *top = json_object_get(json_array_get(plan, 0), "Plan");
    if (!top) {
        fprintf(out, "%s(no plan)\n", indent);
        return;
    }
    /* rendered into memory, then each line behind the indent */
    char *buf = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&buf, &len);
    if (!mem)
        return;
    ctl_plan_node(mem, top, 0);
    fclose(mem);
    for (char *line = buf; line && *line;) {
        char *nl = strchr(line, '\n');
        fprintf(out, "%s%.*s\n", indent, nl ? (int)(nl - line) : (int)strlen(line), line);
        line = nl ? nl + 1 : NULL;
    }
    free(buf);
}

static const char *ctl_str(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "-";
}

/* One plan (or one change) as a block: what it is about, then its tree(s). */
static void ctl_plan_block(FILE *out, const json_t *p, bool change)
{
    char text[CTL_PLAN_TEXT_SHOWN + 4];
    ctl_one_line(text, sizeof(text), ctl_str(p, "text"), CTL_PLAN_TEXT_SHOWN);
    fprintf(out, "plan %s  node %s  database %s  user %s", ctl_str(p, "id"), ctl_str(p, "node"),
            ctl_str(p, "database"), ctl_str(p, "user"));
    if (!change) {
        fprintf(out, "  reason %s  duration %lld ms", ctl_str(p, "reason"),
                (long long)json_integer_value(json_object_get(p, "duration_ms")));
        json_t *changes = json_object_get(p, "changes");
        if (json_integer_value(changes) > 0)
            fprintf(out, "  shape changes %lld", (long long)json_integer_value(changes));
    }
    fprintf(out, "  (proxy %s)\n  %s\n", ctl_str(p, "node_id"), text);
    if (change) {
        fprintf(out, "  before:\n");
        ctl_plan_tree(out, json_object_get(p, "old_plan"), "    ");
        fprintf(out, "  after:\n");
        ctl_plan_tree(out, json_object_get(p, "new_plan"), "    ");
    } else if (json_is_string(json_object_get(p, "error"))) {
        fprintf(out, "  no plan: %s\n", ctl_str(p, "error"));
    } else {
        ctl_plan_tree(out, json_object_get(p, "plan"), "  ");
    }
    fputc('\n', out);
}

ctl_exit ctl_cmd_show_plans(ctl_ctx *ctx)
{
    ctl_answer ans = {0};
    char *name = ctl_http_escape(ctx->http, ctx->deployment);
    char *query = ctx->query ? ctl_http_escape(ctx->http, ctx->query) : NULL;
    char *path = NULL;
    ctl_exit rc = CTL_EXIT_FAILED;

    if (!name || (ctx->query && !query) ||
        asprintf(&path, CTL_PLANS_PATH, name, ctx->changed ? "?changed=1" : "",
                 query ? (ctx->changed ? "&" : "?") : "", query ? "query=" : "",
                 query ? query : "") < 0) {
        path = NULL;
        ctl_error("out of memory");
        goto done;
    }
    if ((rc = ctl_http_request(ctx->http, "GET", path, NULL, ctx->timeout_s, &ans)) !=
        CTL_EXIT_OK) {
        ctl_error("%s", ans.message);
        goto done;
    }
    if (!ctl_is_rows(ans.body)) {
        ctl_answer_fail(&ans, CTL_EXIT_UNREACHABLE,
                        "malformed answer: expected an array of objects");
        ctl_error("%s", ans.message);
        rc = ans.rc;
        goto done;
    }
    if (ctx->format == CTL_FORMAT_JSON) {
        ctl_render_json(stdout, ans.body);
    } else if (json_array_size(ans.body) == 0) {
        printf("(none)\n");
    } else {
        size_t i;
        json_t *p;
        json_array_foreach(ans.body, i, p) ctl_plan_block(stdout, p, ctx->changed);
    }
done:
    ctl_answer_free(&ans);
    free(path);
    free(name);
    free(query);
    return rc;
}
