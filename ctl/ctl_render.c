/* ctl_render.c - pgrelayctl's output: JSON arrays of objects as aligned tables, JSON as JSON. */
#include "ctl_render.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CTL_COLUMN_GAP    "  "
#define CTL_ELLIPSIS      "..."
#define CTL_TIME_MS_FROM  100000000000.0 /* 10^11: larger timestamps are milliseconds */
#define CTL_MS_PER_S      1000.0
#define CTL_TIME_FORMAT   "%Y-%m-%d %H:%M:%S"
#define CTL_TIME_TEXT_MAX 32
#define CTL_JSON_INDENT   2

bool ctl_is_rows(const json_t *v)
{
    size_t i;
    json_t *row;

    if (!json_is_array(v))
        return false;
    json_array_foreach(v, i, row) if (!json_is_object(row)) return false;
    return true;
}

/* Printed columns of a UTF-8 string (code points; no wide characters assumed). */
static size_t ctl_text_width(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xc0) != 0x80)
            n++;
    return n;
}

static void ctl_put_scalar(FILE *f, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_STRING:
        fputs(json_string_value(v), f);
        break;
    case JSON_INTEGER:
        fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        break;
    case JSON_REAL:
        fprintf(f, "%g", json_real_value(v));
        break;
    case JSON_TRUE:
        fputs("yes", f);
        break;
    case JSON_FALSE:
        fputs("no", f);
        break;
    case JSON_NULL:
        fputs("-", f);
        break;
    case JSON_ARRAY:
    case JSON_OBJECT:
        fputs("...", f);
        break;
    }
}

static void ctl_put_time(FILE *f, const json_t *v)
{
    char text[CTL_TIME_TEXT_MAX];
    struct tm tm;

    if (!json_is_number(v)) {
        ctl_put_scalar(f, v);
        return;
    }
    double t = json_number_value(v);
    if (t == 0) {
        fputs("never", f);
        return;
    }
    if (t >= CTL_TIME_MS_FROM)
        t /= CTL_MS_PER_S;
    time_t secs = (time_t)t;
    if (!localtime_r(&secs, &tm) || strftime(text, sizeof(text), CTL_TIME_FORMAT, &tm) == 0) {
        ctl_put_scalar(f, v);
        return;
    }
    fputs(text, f);
}

/* The text of one cell (malloc'd, one line), or NULL when out of memory. */
static char *ctl_cell(const json_t *v, ctl_cell_kind kind)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    size_t i;
    const char *key;
    json_t *item;

    if (!f)
        return NULL;
    if (!v) {
        fputs("-", f);
    } else if (kind == CTL_CELL_TIME) {
        ctl_put_time(f, v);
    } else if (json_is_array(v)) {
        json_array_foreach(v, i, item)
        {
            if (i > 0)
                fputc(',', f);
            ctl_put_scalar(f, item);
        }
    } else if (json_is_object(v)) {
        i = 0;
        json_object_foreach((json_t *)v, key, item)
        {
            fprintf(f, "%s%s=", i++ > 0 ? "," : "", key);
            ctl_put_scalar(f, item);
        }
    } else {
        ctl_put_scalar(f, v);
    }
    if (fclose(f) != 0) {
        free(text);
        return NULL;
    }
    /* Keep a row on one line. */
    for (char *c = text; *c; c++)
        if ((unsigned char)*c < ' ' || *c == 0x7f)
            *c = ' ';
    if (kind == CTL_CELL_STATEMENT && ctl_text_width(text) > CTL_STATEMENT_SHOWN) {
        /* Keep CTL_STATEMENT_SHOWN - 3 code points and "...": the at least 4 bytes dropped
         * make room for it. */
        size_t kept = 0, at = 0;
        for (; text[at] && kept < CTL_STATEMENT_SHOWN - strlen(CTL_ELLIPSIS); at++)
            if (((unsigned char)text[at] & 0xc0) != 0x80)
                kept++;
        while (((unsigned char)text[at] & 0xc0) == 0x80)
            at++;
        strcpy(text + at, CTL_ELLIPSIS);
    }
    return text;
}

static void ctl_put_padded(FILE *out, const char *text, size_t width, bool last)
{
    fputs(text, out);
    if (last) {
        fputc('\n', out);
        return;
    }
    for (size_t w = ctl_text_width(text); w < width; w++)
        fputc(' ', out);
    fputs(CTL_COLUMN_GAP, out);
}

/* Every key of every row, in order of first appearance. */
static ctl_column *ctl_all_columns(const json_t *rows, size_t *ncols)
{
    ctl_column *cols = NULL;
    size_t n = 0, i, c;
    json_t *row, *v;
    const char *key;

    json_array_foreach(rows, i, row){
        json_object_foreach(row, key, v){for (c = 0; c < n && strcmp(cols[c].key, key) != 0; c++);
    if (c < n)
        continue;
    ctl_column *grown = realloc(cols, (n + 1) * sizeof(*cols));
    if (!grown) {
        free(cols);
        return NULL;
    }
    cols = grown;
    cols[n++] = (ctl_column){key, CTL_CELL_PLAIN};
}
}
*ncols = n;
return cols;
}

void ctl_render_table(FILE *out, const json_t *rows, const ctl_column *cols, size_t ncols)
{
    size_t nrows = json_array_size(rows);
    ctl_column *all = NULL;
    char **cells = NULL;
    size_t *width = NULL;
    size_t r, c;

    if (nrows == 0) {
        fputs("(none)\n", out);
        return;
    }
    if (!cols) {
        if (!(all = ctl_all_columns(rows, &ncols)))
            goto done;
        cols = all;
    }
    if (ncols == 0)
        goto done;
    cells = calloc(nrows * ncols, sizeof(*cells));
    width = calloc(ncols, sizeof(*width));
    if (!cells || !width)
        goto done;
    for (c = 0; c < ncols; c++)
        width[c] = ctl_text_width(cols[c].key);
    for (r = 0; r < nrows; r++)
        for (c = 0; c < ncols; c++) {
            json_t *row = json_array_get(rows, r);
            char *cell = ctl_cell(json_object_get(row, cols[c].key), cols[c].kind);
            if (!cell)
                goto done;
            cells[r * ncols + c] = cell;
            if (ctl_text_width(cell) > width[c])
                width[c] = ctl_text_width(cell);
        }
    for (c = 0; c < ncols; c++)
        ctl_put_padded(out, cols[c].key, width[c], c + 1 == ncols);
    for (r = 0; r < nrows; r++)
        for (c = 0; c < ncols; c++)
            ctl_put_padded(out, cells[r * ncols + c], width[c], c + 1 == ncols);
done:
    if (cells)
        for (r = 0; r < nrows * ncols; r++)
            free(cells[r]);
    free(cells);
    free(width);
    free(all);
}

static bool ctl_skipped(const char *key, const char *const *skip)
{
    for (; skip && *skip; skip++)
        if (strcmp(key, *skip) == 0)
            return true;
    return false;
}

void ctl_render_fields(FILE *out, const json_t *obj, const char *const *skip)
{
    const char *key;
    json_t *v;
    size_t width = 0;

    json_object_foreach((json_t *)obj, key, v)
    {
        if (!json_is_array(v) && !json_is_object(v) && !ctl_skipped(key, skip) &&
            ctl_text_width(key) > width)
            width = ctl_text_width(key);
    }
    json_object_foreach((json_t *)obj, key, v)
    {
        if (json_is_array(v) || json_is_object(v) || ctl_skipped(key, skip))
            continue;
        char *cell = ctl_cell(v, CTL_CELL_PLAIN);
        ctl_put_padded(out, key, width, false);
        fprintf(out, "%s\n", cell ? cell : "?");
        free(cell);
    }
}

void ctl_render_json(FILE *out, const json_t *v)
{
    json_dumpf(v, out, JSON_INDENT(CTL_JSON_INDENT) | JSON_ENCODE_ANY);
    fputc('\n', out);
}
