/* ui_assets.h - the web UI's files, built into pgrelay-control (ui_assets.c serves them). */
#ifndef PGRELAY_UI_ASSETS_H
#define PGRELAY_UI_ASSETS_H

#include <stddef.h>

/* One file of control/ui/, as the generated table holds it. */
typedef struct ui_asset {
    const char *name;          /* file name, served as /ui/NAME */
    const char *content_type;  /* from the extension */
    const unsigned char *data; /* the bytes (NUL-terminated, len excludes it) */
    size_t len;                /* size in bytes */
} ui_asset;

/* Generated at build time by control/ui/gen_assets.sh (build/gen/ui_data.c). */
extern const ui_asset ui_asset_table[];
extern const size_t ui_asset_count;

struct http_call;

/* GET / and /ui: a redirect to /ui/. */
void ui_redirect(struct http_call *call);
/* GET /ui/ and /ui/NAME: index.html or the named file; 404 for anything else. */
void ui_serve(struct http_call *call);

#endif
