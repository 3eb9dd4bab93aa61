/* ui_assets.c - serves the web UI: the files of control/ui/, built into the binary
 * (ui_asset_table, generated at build time), under /ui/; / and /ui redirect there.
 *
 * The pages are static: everything they show comes from /api/v1/ with the admin token the
 * operator typed (kept in the tab's sessionStorage), so these routes need no token. The
 * security headers (Content-Security-Policy and the rest) are added to every answer by
 * http.c. */
#include "ui_assets.h"
#include "http.h"

#include <event2/buffer.h>
#include <string.h>

#define UI_PREFIX "/ui/"
#define UI_INDEX  "index.html"

void ui_redirect(http_call *call)
{
    static const char body[] = "see /ui/\n";
    evhttp_add_header(evhttp_request_get_output_headers(call->req), "Location", UI_PREFIX);
    struct evbuffer *buf = evbuffer_new();
    if (buf)
        evbuffer_add(buf, body, sizeof(body) - 1);
    evhttp_add_header(evhttp_request_get_output_headers(call->req), "Content-Type",
                      "text/plain; charset=utf-8");
    http_reply_buffer(call->req, 302, buf);
    if (buf)
        evbuffer_free(buf);
}

static const ui_asset *ui_find(const char *name)
{
    for (size_t i = 0; i < ui_asset_count; i++)
        if (strcmp(ui_asset_table[i].name, name) == 0)
            return &ui_asset_table[i];
    return NULL;
}

void ui_serve(http_call *call)
{
    const char *name = call->nargs > 0 ? call->args[0] : UI_INDEX;
    const ui_asset *a = ui_find(name);
    if (!a) {
        http_reply_error(call->req, 404, "no such file in the web UI: %s", name);
        return;
    }
    struct evkeyvalq *h = evhttp_request_get_output_headers(call->req);
    /* the assets change only with the binary: revalidate rather than keep stale copies */
    evhttp_add_header(h, "Cache-Control", "no-cache");
    struct evbuffer *buf = evbuffer_new();
    if (!buf) {
        http_reply_error(call->req, 500, "out of memory");
        return;
    }
    /* static data: referenced, not copied */
    evbuffer_add_reference(buf, a->data, a->len, NULL, NULL);
    evhttp_add_header(h, "Content-Type", a->content_type);
    http_reply_buffer(call->req, 200, buf);
    evbuffer_free(buf);
}
