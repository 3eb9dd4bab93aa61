/* ctl_render.h - pgrelayctl's output: JSON answers as aligned tables, or as indented JSON. */
#ifndef PGRELAY_CTL_RENDER_H
#define PGRELAY_CTL_RENDER_H

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>

#define CTL_STATEMENT_SHOWN 60 /* statement characters in the table form of show-queries */

/* How a cell shows its JSON value. Common to all: null is "-", true/false are yes/no, arrays
 * are joined with ",", objects are "key=value" pairs joined with ",". */
typedef enum ctl_cell_kind {
    CTL_CELL_PLAIN,     /* as above */
    CTL_CELL_TIME,      /* a number is seconds (or, from 10^11 on, milliseconds) since the
                         * epoch, shown as local "YYYY-MM-DD HH:MM:SS"; 0 is "never" */
    CTL_CELL_STATEMENT, /* text cut to CTL_STATEMENT_SHOWN characters */
} ctl_cell_kind;

/* One column of a table: the header is the JSON key. */
typedef struct ctl_column {
    const char *key;
    ctl_cell_kind kind;
} ctl_column;

/* Is v an array whose every element is an object? */
bool ctl_is_rows(const json_t *v);

/* rows (an array of objects) as columns under a header line; "(none)" when empty. A missing
 * key is "-". cols NULL: every key that any row has, in order of first appearance. */
void ctl_render_table(FILE *out, const json_t *rows, const ctl_column *cols, size_t ncols);

/* The scalar members of obj as "key  value" lines (keys aligned), skipping arrays, objects
 * and the keys in skip (NULL-terminated; NULL for none). */
void ctl_render_fields(FILE *out, const json_t *obj, const char *const *skip);

/* v as indented JSON and a newline. */
void ctl_render_json(FILE *out, const json_t *v);

#endif
